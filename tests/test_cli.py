"""CLI end to end, in-process: `grpo-ar train | train --resume | eval | report` on a tiny saved
Llama with a char tokenizer, plus config errors and the bf16 <-> fp16 resume refusal."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_ar.cli import main
from grpo_ar.config import ConfigError, load_config, save_config
from grpo_ar.train.trainer import Trainer
from grpo_ar.types import Entry, RewardSpec
from tiny import char_tokenizer, save_char_llama, tiny_llama

PROBLEMS = [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7), (6, 3)]


def _write_jsonl(path: Path, pairs) -> None:
    # a random model rarely gets a sum right; the digit-format reward gives the groups variance
    rewards = lambda a, b: {  # noqa: E731
        "numeric_answer": {"answer": a + b},
        "regex_format": {"pattern": "[0-9]", "weight": 0.5},
    }
    rows = [{"prompt": f"{a}+{b}=", "rewards": rewards(a, b)} for a, b in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _config_text(root: Path, run_dir: Path) -> str:
    return f"""
[model]
path = "{root / "model"}"
device = "cpu"

[sampling]
max_new_tokens = 4

[algorithm]
group_size = 2
beta = 0.0

[trainer]
steps = 2
batch_size = 2
lr = 1e-2
seed = 1

[data]
train = "{root / "train.jsonl"}"
eval = "{root / "eval.jsonl"}"

[log]
run_dir = "{run_dir}"
progress = false
samples_per_step = 3
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model + tokenizer (no chat template), train/eval JSONL and a config."""
    root = tmp_path_factory.mktemp("cli")
    tok = save_char_llama(root / "model")
    assert getattr(tok, "chat_template", None) is None
    _write_jsonl(root / "train.jsonl", PROBLEMS)
    _write_jsonl(root / "eval.jsonl", [(1, 1), (4, 4)])
    (root / "run.toml").write_text(_config_text(root, root / "run"), encoding="utf-8")
    return root


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def trained(workspace):
    """`grpo-ar train run.toml` for 2 steps; returns (run_dir, exit code, stdout)."""
    torch.manual_seed(0)
    buf = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(buf):
        rc = main(["train", str(workspace / "run.toml")])
    return workspace / "run", rc, buf.getvalue()


def test_train_writes_the_run_directory(trained):
    run_dir, rc, out = trained
    assert rc == 0
    assert f"run directory: {run_dir}" in out
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl"):
        assert (run_dir / name).is_file(), name

    # the resolved config is written and loads back to what ran
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.trainer.steps == 2 and cfg.algorithm.group_size == 2
    assert cfg.sampling.max_new_tokens == 4

    rows = _metrics(run_dir)
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert 0.0 <= r["reward/mean"] <= 1.5  # numeric_answer + 0.5 * regex_format
        assert 0 < r["completion/length_mean"] <= 4
        assert r["lr"] == pytest.approx(1e-2, rel=1e-6, abs=0)
    evals = [r for r in rows if "eval/greedy/reward" in r]
    assert [r["step"] for r in evals] == [0, 2]  # before training and at the end

    samples = [json.loads(s) for s in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2]  # samples_per_step = 3
    prompts = {f"{a}+{b}=" for a, b in PROBLEMS}
    assert all(s["prompt"] in prompts and isinstance(s["output"], str) for s in samples)
    assert all(s["reward"] in (0.0, 0.5, 1.0, 1.5) for s in samples)
    assert any(r["grad_norm"] > 0 for r in train_rows)  # some group had reward variance

    ckpt = _latest(run_dir)
    assert ckpt.name == "step_000002"
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        assert (ckpt / name).is_file(), name
    assert not (ckpt / "reference.safetensors").exists()  # beta = 0: no reference model
    state = json.loads((ckpt / "state.json").read_text())
    assert "step" in json.dumps(state) and "dtype" in json.dumps(state)


def test_train_changes_the_saved_weights(trained, workspace):
    run_dir, rc, _ = trained
    assert rc == 0
    init = load_file(workspace / "model" / "model.safetensors")
    after = load_file(_latest(run_dir) / "model.safetensors")
    diff = max((after[k] - init[k]).abs().max().item() for k in init if k in after)
    assert diff > 1e-4  # lr = 1e-2 moves the policy


def test_resume_continues_and_matches_an_uninterrupted_run(trained, workspace, tmp_path):
    run_dir, rc, _ = trained
    assert rc == 0
    # continue the 2-step run to 4 steps in a copy, so the other tests see the 2-step run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever state we are in
    args = ["train", "--resume", str(resumed_dir), "--set", "trainer.steps=4"]
    args += ["--set", f"log.run_dir={resumed_dir}"]
    assert main(args) == 0
    rows = _metrics(resumed_dir)
    train_steps = [r["step"] for r in rows if "reward/mean" in r]
    assert train_steps == [1, 2, 3, 4]  # appended: 3 and 4, no step repeated
    assert [r["step"] for r in rows if "eval/greedy/reward" in r] == [0, 2, 4]
    assert _latest(resumed_dir).name == "step_000004"
    assert load_config(resumed_dir / "config.yaml").trainer.steps == 4

    # the same 4 steps without interruption end in the same weights
    straight = tmp_path / "straight"
    torch.manual_seed(0)
    args = ["train", str(workspace / "run.toml"), "--set", "trainer.steps=4"]
    assert main([*args, "--set", f"log.run_dir={straight}"]) == 0
    a = load_file(_latest(resumed_dir) / "model.safetensors")
    b = load_file(_latest(straight) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    straight_rows = [r for r in _metrics(straight) if "reward/mean" in r]
    resumed_rows = [r for r in rows if "reward/mean" in r]
    assert [r["reward/mean"] for r in straight_rows] == [r["reward/mean"] for r in resumed_rows]


def test_eval_prints_json(trained, workspace, capsys):
    assert trained[1] == 0
    capsys.readouterr()
    assert main(["eval", str(workspace / "run.toml"), "--samples", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    for mode in ("greedy", "sampled"):
        assert 0.0 <= out[f"eval/{mode}/reward"] <= 1.5
        # greedy: 2 prompts x 1 output, sampled: 2 x 2; numeric_answer scores 0 or 1 each
        assert out[f"eval/{mode}/numeric_answer"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    names = ("reward", "numeric_answer", "regex_format")
    assert set(out) == {f"eval/{m}/{n}" for m in ("greedy", "sampled") for n in names}


def test_report_prints_a_table(trained, capsys):
    run_dir, rc, _ = trained
    assert rc == 0
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:6] == [
        "step",
        "reward/mean",
        "kl",
        "entropy",
        "completion/length_mean",
        "time/step",
    ]
    assert "eval/greedy/reward" in header
    body = [line.split() for line in lines[1:]]
    assert len(body) == len(_metrics(run_dir))
    assert all(len(row) == len(header) for row in body)
    assert [row[0] for row in body] == ["0", "1", "2", "2"]
    assert body[0][1] == "-"  # the step-0 eval row has no training reward


def test_report_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_config_error_exits_2_with_the_message(workspace, capsys):
    rc = main(["train", str(workspace / "run.toml"), "--set", "trainer.bogus=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "grpo-ar: error: unknown key trainer.bogus" in err
    assert "valid keys of trainer" in err


def test_validation_error_exits_2(workspace, capsys):
    rc = main(["train", str(workspace / "run.toml"), "--set", "algorithm.group_size=1"])
    assert rc == 2
    assert "algorithm.group_size=1: need >= 2" in capsys.readouterr().err


def test_missing_model_path_and_data_exit_2(workspace, tmp_path, capsys):
    cfg = workspace / "run.toml"
    assert main(["eval", str(cfg), "--set", "model.path="]) == 2
    assert "model.path is empty" in capsys.readouterr().err
    assert main(["eval", str(cfg), "--set", "data.train="]) == 2
    assert "data.train is empty" in capsys.readouterr().err


def test_train_needs_a_config_or_resume(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
    assert "train needs a CONFIG file or --resume RUN_DIR" in capsys.readouterr().err


# -- bf16 <-> fp16 resume refusal -----------------------------------------------------------


def _trainer(cfg):
    from grpo_ar.adapters.text import TextAdapter

    tok = char_tokenizer()
    entries = [Entry("1+2=", (RewardSpec("numeric_answer", 1.0, {"answer": 3}),))] * 2
    return Trainer(cfg, tiny_llama(len(tok)), TextAdapter(tok, cfg.sampling), entries)


def _dtype_cfg(run_dir: Path, dtype: str):
    return load_config(
        overrides=[
            f"model.dtype={dtype}",
            "algorithm.group_size=2",
            "algorithm.beta=0",
            "trainer.batch_size=2",
            "trainer.steps=2",
            "sampling.max_new_tokens=2",
            f"log.run_dir={run_dir}",
        ]
    )


@pytest.mark.parametrize("saved, now", [("bfloat16", "float16"), ("float16", "bfloat16")])
def test_resume_refuses_switching_between_bf16_and_fp16(tmp_path, saved, now):
    _trainer(_dtype_cfg(tmp_path, saved)).save()
    t = _trainer(_dtype_cfg(tmp_path, now))
    with pytest.raises(ConfigError) as e:
        t.resume()
    msg = str(e.value)
    assert saved in msg and now in msg
    assert "bf16" in msg and "fp16" in msg
    assert t.step == 0


@pytest.mark.parametrize("saved, now", [("bfloat16", "float32"), ("float32", "float16")])
def test_resume_allows_other_dtype_changes(tmp_path, saved, now):
    first = _trainer(_dtype_cfg(tmp_path, saved))
    first.step = 1
    first.save()
    t = _trainer(_dtype_cfg(tmp_path, now))
    t.resume()
    assert t.step == 1


def test_cli_resume_in_the_other_half_precision_exits_2(tmp_path, workspace, capsys):
    cfg = load_config(workspace / "run.toml", ["model.dtype=bfloat16", f"log.run_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    _trainer(cfg).save()
    rc = main(["train", "--resume", str(tmp_path), "--set", "model.dtype=float16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bfloat16" in err and "float16" in err and "bf16" in err


def test_eval_scores_a_checkpoint(trained, workspace, capsys):
    """`eval --checkpoint RUN_DIR` loads the run's latest weights; a missing one exits 2."""
    run_dir, rc, _ = trained
    assert rc == 0
    config = str(workspace / "run.toml")
    assert main(["eval", config, "--checkpoint", str(run_dir)]) == 0
    assert "eval/greedy/reward" in json.loads(capsys.readouterr().out)
    assert main(["eval", config, "--checkpoint", str(run_dir / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
