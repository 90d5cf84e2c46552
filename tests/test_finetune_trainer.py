"""Fine-tuning through the Trainer and the CLI: `finetune` config section, adapter-only
checkpoints that resume exactly (policy, frozen reference, optimizer), `grpo-ar export`."""

import pytest
import torch

pytest.importorskip("peft", reason="the peft extra is not installed")
pytest.importorskip("lycoris", reason="the lycoris extra is not installed")

from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.checkpoint import latest_checkpoint, load_tensors  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402
from tiny import char_tokenizer, tiny_llama  # noqa: E402

ROWS = [{"prompt": f"{i}+{i}=", "answer": 2 * i} for i in range(8)]


def base_dir(tmp_path):
    """A tiny Llama + char tokenizer saved as a transformers folder (what model.path names)."""
    path = tmp_path / "base"
    if not path.exists():
        tok = char_tokenizer()
        tiny_llama(vocab_size=len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def make(tmp_path, run, method, overrides=()):
    from grpo_ar.cli import build_model_and_adapter

    cfg = load_config(
        None,
        [
            f"model.path={base_dir(tmp_path)}",
            "sampling.max_new_tokens=6",
            "trainer.batch_size=4",
            "trainer.lr=3e-2",
            "algorithm.group_size=4",
            f"finetune.method={method}",
            "finetune.rank=4",
            f"log.run_dir={tmp_path / run}",
            "log.progress=false",
            *overrides,
        ],
    )
    model, adapter = build_model_and_adapter(cfg)
    rows = [
        {"prompt": r["prompt"], "rewards": {"numeric_answer": {"answer": r["answer"]}}}
        for r in ROWS
    ]
    return Trainer(cfg, model, adapter, load_rows(rows))


@pytest.mark.parametrize("method", ["peft", "lycoris"])
def test_adapter_checkpoint_holds_only_the_adapter_and_resumes_exactly(tmp_path, method):
    long = ["trainer.steps=4", "trainer.iterations=2", "algorithm.grpo_iters=2"]
    full = make(tmp_path, "full", method, long)
    hist_full = full.train()
    part = make(tmp_path, "part", method, ["trainer.steps=2", "trainer.iterations=1"] + long[2:])
    part.train()  # ends an iteration: the checkpoint carries a refreshed (frozen) reference
    ckpt = latest_checkpoint(tmp_path / "part")
    saved = load_tensors(ckpt / "model.safetensors")
    assert set(saved) == set(part.finetune.state_dict())
    assert (
        sum(t.numel() for t in saved.values()) < sum(p.numel() for p in part.model.parameters()) / 5
    )
    assert set(load_tensors(ckpt / "reference.safetensors")) == set(saved)
    resumed = make(tmp_path, "part", method, long)
    resumed.resume()
    hist_rest = resumed.train()
    assert [h["reward/mean"] for h in hist_rest] == [h["reward/mean"] for h in hist_full[2:]]
    a, b = full.finetune.state_dict(), resumed.finetune.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_resume_with_another_finetune_method_is_refused(tmp_path):
    from grpo_ar.config import ConfigError

    make(tmp_path, "run", "lycoris", ["trainer.steps=1"]).train()
    other = make(tmp_path, "run", "peft", ["trainer.steps=2"])
    with pytest.raises(ConfigError, match="set finetune.method=lycoris"):
        other.resume()


def test_soft_sync_with_lora_is_refused_at_construction(tmp_path):
    soft = ["algorithm.reference_refresh=soft", "algorithm.reference_mix_alpha=0.6"]
    with pytest.raises(ValueError, match="not exact here: peft lora"):
        make(tmp_path, "soft", "peft", soft)


@pytest.mark.parametrize("method", ["full", "peft", "lycoris"])
def test_cli_export_gives_a_plain_model_equal_to_the_policy(tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ar.cli import main

    tr = make(tmp_path, "run", method, ["trainer.steps=2"])
    tr.train()
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    x = tok(["1+1=", "7+2="], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = tr.model(input_ids=x).logits, merged(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cli_eval_loads_an_adapter_checkpoint(tmp_path, capsys):
    import json

    import yaml

    from grpo_ar.cli import main

    tr = make(tmp_path, "run", "lycoris", ["trainer.steps=1"])
    tr.train()
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cfg["data"].update(
        train=str(data), rewards=[{"name": "numeric_answer", "args": {"answer": "$answer"}}]
    )
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "eval.yaml"), "--checkpoint", str(tmp_path / "run")]) == 0
    assert "eval/greedy/reward" in capsys.readouterr().out
