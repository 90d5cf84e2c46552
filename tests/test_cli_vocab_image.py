"""`grpo-ar train` with model.adapter = "chameleon" / "emu3": checkpoints saved by
`save_pretrained` (tiny random-init real classes), built through the ADAPTERS registry and the
[chameleon] / [emu3] config sections, one GRPO step with the offline image reward."""

import json

import pytest
import torch
from vocab_models import chameleon_tokenizer, emu3_tokenizer, tiny_chameleon, tiny_emu3

from grpo_ar.adapters.chameleon import chameleon_decoder, save_chameleon_decoder
from grpo_ar.cli import main
from grpo_ar.config import load_config
from grpo_ar.errors import ConfigError
from grpo_ar.testing import cli_train


def save_run(root, family):
    """Checkpoint, tokenizer (and Chameleon's decoder) and data under root; the overrides."""
    lm = root / "lm"
    if family == "chameleon":
        tok = chameleon_tokenizer()
        model = tiny_chameleon(tok)
        torch.manual_seed(1)
        decoder = save_chameleon_decoder(chameleon_decoder(model.model.vqmodel.config), root / "vq")
        extra = [f"chameleon.decoder_path={decoder}", "chameleon.layout=lumina_mgpt"]
    else:
        tok = emu3_tokenizer()
        model = tiny_emu3(tok)
        extra = ['emu3.negative_prompt="ugly"']
    model.save_pretrained(lm)
    tok.save_pretrained(lm)
    data = root / "train.jsonl"
    rows = [{"prompt": p, "rewards": "aesthetic_proxy"} for p in ("a red cat", "blue sky")]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return [
        f"model.path={lm}", f"{family}.grid=[4, 6]", "sampling.cfg_scale=2.0",
        f"data.train={data}", "algorithm.group_size=2", "trainer.batch_size=2",
        "trainer.steps=1", "trainer.lr=1e-3", f"log.run_dir={root / 'run'}",
        "log.progress=false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("family,tokens", [("chameleon", 31), ("emu3", 31)])
def test_cli_trains_a_saved_checkpoint_and_its_export(tmp_path, family, tokens):
    overrides = save_run(tmp_path, family)
    metrics, samples = cli_train(tmp_path, family, overrides)
    assert len(metrics) == 1 and 0.0 <= metrics[0]["reward/mean"] <= 1.0
    assert metrics[0]["completion/length_mean"] == tokens
    assert samples and (tmp_path / "run" / samples[0]["output"]).is_file()
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert f"max_new_tokens: {tokens}" in written
    # the exported folder holds what the next run needs: weights, tokenizer (Chameleon: decoder)
    out, again = tmp_path / "export", tmp_path / "again"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    drop = ("model.path=", "chameleon.decoder_path=", "log.run_dir=")
    overrides = [o for o in overrides if not o.startswith(drop)]
    overrides += [f"model.path={out}", f"log.run_dir={again / 'run'}"]
    if family == "chameleon":
        overrides.append(f"chameleon.decoder_path={out}")
    again.mkdir()
    metrics, _ = cli_train(again, family, overrides)
    assert len(metrics) == 1 and metrics[0]["completion/length_mean"] == tokens


def test_sections_refuse_bad_values():
    with pytest.raises(ConfigError, match="chameleon.decoder_path is empty"):
        load_config(None, ["model.adapter=chameleon"])
    with pytest.raises(ConfigError, match="chameleon.layout='lumina': use chameleon or"):
        load_config(None, ["model.adapter=chameleon", "chameleon.decoder_path=x",
                           "chameleon.layout=lumina"])  # fmt: skip
    with pytest.raises(ConfigError, match="emu3.uncond='image_start': use one of negative, masked"):
        load_config(None, ["model.adapter=emu3", "emu3.uncond=image_start"])
    with pytest.raises(ConfigError, match=r"emu3.grid=\[4\]: give \[h, w\]"):
        load_config(None, ["model.adapter=emu3", "emu3.grid=[4]"])


def test_the_docs_configs_load(tmp_path):
    """The TOML examples of docs/chameleon_emu3.md are valid configs (keys and values)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "chameleon_emu3.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    adapters = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"{i}.toml"
        path.write_text(block)
        cfg = load_config(path, [])
        adapters.append((cfg.model.adapter, cfg.adapter_config.grid, cfg.sampling.cfg_scale))
    assert adapters == [("emu3", [90, 90], 3.0), ("chameleon", [32, 32], 3.0)]
