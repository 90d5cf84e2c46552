"""`grpo-ar train` builds an AR image model from config alone: saved LM + saved VQ tokenizer,
class-conditioned prompts from JSONL, the offline aesthetic proxy as reward."""

import json

from test_vq import K, tiny_vqmodel

from grpo_ar.cli import build_model_and_adapter, main
from grpo_ar.config import load_config
from grpo_ar.types import Entry
from tiny import tiny_llama

BOS, OFFSET, GRID = 1, 8, (4, 6)


def image_run(tmp_path):
    lm_dir, vq_dir = tmp_path / "lm", tmp_path / "vq"
    tiny_llama(vocab_size=OFFSET + K).save_pretrained(lm_dir)
    tiny_vqmodel().save_pretrained(vq_dir)
    rows = [{"prompt": c, "rewards": [{"name": "aesthetic_proxy"}]} for c in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return [
        f"model.path={lm_dir}",
        "model.adapter=image",
        f"image.decoder_path={vq_dir}",
        f"image.grid=[{GRID[0]}, {GRID[1]}]",
        f"image.code_offset={OFFSET}",
        "image.class_offset=2",
        "image.num_classes=4",
        f"image.bos_token_id={BOS}",
        f"sampling.max_new_tokens={GRID[0] * GRID[1]}",
        "sampling.cfg_scale=2.0",
        f"data.train={data}",
        "algorithm.group_size=2",
        "trainer.batch_size=2",
        "trainer.steps=1",
        "trainer.lr=1e-3",
        f"log.run_dir={tmp_path / 'run'}",
        "log.progress=false",
    ]


def test_config_builds_image_model_and_adapter(tmp_path):
    cfg = load_config(overrides=image_run(tmp_path))
    model, adapter = build_model_and_adapter(cfg)
    ro = adapter.sample(model, adapter.encode([Entry(1, ())]), 2)
    assert ro.completion_ids.shape == (2, GRID[0] * GRID[1])
    assert ((ro.completion_ids >= OFFSET) & (ro.completion_ids < OFFSET + K)).all()
    images = adapter.decode(ro)
    assert images[0].size == (2 * GRID[1], 2 * GRID[0])


def test_cli_trains_an_image_model(tmp_path):
    cfg = tmp_path / "image.toml"
    cfg.write_text('[model]\nadapter = "image"\n')
    sets = [x for kv in image_run(tmp_path) for x in ("--set", kv)]
    assert main(["train", str(cfg), *sets]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and 0 <= metrics[-1]["reward/mean"] <= 1
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["output"].endswith(".png") for s in samples)  # media files, not reprs
    assert all((tmp_path / "run" / s["output"]).is_file() for s in samples)
