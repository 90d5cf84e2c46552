"""`grpo-ar train` builds an AR video model from config alone: saved LM + a saved 2D VQ
tokenizer applied per frame, class-conditioned prompts, video rewards."""

import pytest

from grpo_ar.cli import build_model_and_adapter
from grpo_ar.config import ConfigError, load_config
from grpo_ar.testing import VQ_CODES as K
from grpo_ar.testing import cli_train, tiny_vq_run
from grpo_ar.types import Entry

BOS, OFFSET, GRID = 1, 8, (3, 4, 6)  # 3 frames (motion needs 3) of 4 x 6 codes (8 x 12 pixels)
N_TOK = GRID[0] * GRID[1] * GRID[2]


def video_run(tmp_path):
    rewards = [{"name": "temporal_consistency"}, {"name": "motion", "args": {"direction": "left"}}]
    rows = [{"prompt": c, "rewards": rewards} for c in range(4)]
    return tiny_vq_run(tmp_path, "video", GRID, rows, code_offset=OFFSET, bos=BOS)


def test_config_builds_a_per_frame_video_model_and_adapter(tmp_path):
    cfg = load_config(overrides=video_run(tmp_path))
    assert cfg.video.frame_wise  # a 2D tokenizer runs per frame unless told otherwise
    model, adapter = build_model_and_adapter(cfg)
    ro = adapter.sample(model, adapter.encode([Entry(1, ())]), 2)
    assert ro.completion_ids.shape == (2, N_TOK)
    assert ((ro.completion_ids >= OFFSET) & (ro.completion_ids < OFFSET + K)).all()
    clips = adapter.decode(ro)
    assert tuple(clips[0].shape) == (GRID[0], 2 * GRID[1], 2 * GRID[2], 3)


def test_cli_trains_a_video_model(tmp_path):
    metrics, samples = cli_train(tmp_path, "video", video_run(tmp_path))
    assert metrics[-1]["step"] == 1 and "reward/motion/mean" in metrics[-1]
    assert samples and all(s["output"].endswith(".gif") for s in samples)  # media files, not reprs
    assert all((tmp_path / "run" / s["output"]).is_file() for s in samples)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.adapter=audio"], "model.adapter=.audio.: use one of .*image, .*text, "),
        (["video.grid=[4, 4]"], r"give \[t, h, w\]"),
        (["video.per_frame=false"], "only runs per frame"),
        (["video.decoder=vidtok", "video.per_frame=true"], "VidTok is a 3D tokenizer"),
        (["image.decoder=vidtok"], "use \\[video\\]"),
        (["video.eof_token_id=5"], "needs eol_token_id"),
        (["video.output=pil"], "use one of uint8, float"),
    ],
)
def test_bad_video_config_says_what_to_change(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)
