"""`grpo-ar train` builds an AR image model from config alone: saved LM + saved VQ tokenizer,
class-conditioned prompts from JSONL, the offline aesthetic proxy as reward."""

from grpo_ar.cli import build_model_and_adapter
from grpo_ar.config import load_config
from grpo_ar.testing import VQ_CODES as K
from grpo_ar.testing import cli_train, tiny_vq_run
from grpo_ar.types import Entry

BOS, OFFSET, GRID = 1, 8, (4, 6)


def image_run(tmp_path):
    rows = [{"prompt": c, "rewards": [{"name": "aesthetic_proxy"}]} for c in range(4)]
    return tiny_vq_run(tmp_path, "image", GRID, rows, code_offset=OFFSET, bos=BOS)


def test_config_builds_image_model_and_adapter(tmp_path):
    cfg = load_config(overrides=image_run(tmp_path))
    model, adapter = build_model_and_adapter(cfg)
    ro = adapter.sample(model, adapter.encode([Entry(1, ())]), 2)
    assert ro.completion_ids.shape == (2, GRID[0] * GRID[1])
    assert ((ro.completion_ids >= OFFSET) & (ro.completion_ids < OFFSET + K)).all()
    images = adapter.decode(ro)
    assert images[0].size == (2 * GRID[1], 2 * GRID[0])


def test_cli_trains_an_image_model(tmp_path):
    metrics, samples = cli_train(tmp_path, "image", image_run(tmp_path))
    assert metrics[-1]["step"] == 1 and 0 <= metrics[-1]["reward/mean"] <= 1
    assert samples and all(s["output"].endswith(".png") for s in samples)  # media files, not reprs
    assert all((tmp_path / "run" / s["output"]).is_file() for s in samples)
