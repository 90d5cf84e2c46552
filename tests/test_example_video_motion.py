"""Smoke test of the AR video example (examples/video_motion/run.py): pre-training at tiny
sizes, held-out measurement, 2 GRPO steps through the unchanged Trainer, GIFs and strips; and
the procedural clips it trains on move the way their labels say."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageSequence

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "video_motion"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"video_motion_{name}", EXAMPLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield _module("run"), _module("clips")
    finally:
        sys.path.remove(str(EXAMPLE))


def test_clips_move_as_labelled_and_captions_are_noisy(example):
    from grpo_ar.rewards.video import estimate_motion, motion_label

    _, clips = example
    data = clips.make_clips(64, seed=3, mislabel=0.5)
    x = data["clips"]
    assert x.shape == (64, 8, 3, 16, 16) and x.min() >= 0 and x.max() <= 1
    labels = motion_label(estimate_motion(x)[0])
    assert labels == [clips.DIRECTIONS[d] for d in data["direction"].tolist()]
    wrong = (data["said"] != data["direction"]).float().mean().item()
    assert 0.3 < wrong < 0.7  # about half the captions name another direction
    clean = clips.make_clips(64, seed=3)
    assert torch.equal(clean["said"], clean["direction"])
    train, held = clips.prompt_split()
    assert len(train) == 24 and len(held) == 8 and not set(train) & set(held)
    assert {p.split()[-1] for p in held} == set(clips.DIRECTIONS)


TINY = [
    "data.n_train=16", "vq.steps=3", "vq.codebook=16", "vq.channels=[8, 8, 8]",
    "prior.steps=3", "prior.hidden=32", "prior.layers=1", "judge.steps=3", "judge.width=4",
]  # fmt: skip


def tiny_argv(tmp_path, *extra: str) -> list[str]:
    """The example at tiny sizes: 2 GRPO steps of 2 prompts x 2 clips, 2 clips per prompt."""
    return [
        "--base", str(tmp_path / "base"), "--eval-samples", "2",
        *(a for t in TINY for a in ("--pretrain-set", t)),
        *(a for s in ("trainer.steps=2", "trainer.batch_size=2", "algorithm.group_size=2",
                      f"log.run_dir={tmp_path / 'run'}") for a in ("--set", s)),
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_example_runs_two_grpo_steps(tmp_path, capsys, example):
    run, _ = example
    out = run.main(tiny_argv(tmp_path, "--seeds", "0", "--eval-seeds", "12345"))
    text = capsys.readouterr().out
    assert "held-out before GRPO" in text and "held-out after GRPO" in text
    before, after = out["before"][12345], out["after"][0][12345]
    for m in (before, after):
        assert 0 <= m["accuracy/motion"] <= 1 and 0 <= m["accuracy/colour"] <= 1
        assert 0 <= m["judge/motion"] <= 1 and 0 <= m["judge/still"] <= 1
        assert -1 <= m["reward/motion"] <= 1 and m["reward/temporal_consistency"] <= 1
    assert before["kl_to_start/per_clip"] == pytest.approx(0.0, abs=1e-5)
    assert out["runs"][0]["steps"] == 2
    # one cell: the spread over training seeds is 0, the mean is the cell
    row = out["summary"]["judge/motion"]
    assert row["after"]["mean"] == after["judge/motion"] and row["after"]["std"] == 0
    assert row["change"]["mean"] == pytest.approx(after["judge/motion"] - before["judge/motion"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["protocol"]["eval_seeds"] == [12345] and saved["protocol"]["train_seeds"] == [0]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]
    gifs = sorted((tmp_path / "run" / "clips").glob("*.gif"))
    assert len(gifs) == 2 * 8 * 2  # before/after × 8 held-out prompts × 2 samples
    with Image.open(gifs[0]) as im:  # Pillow merges repeated frames, adding their durations
        durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
        # GIF stores centiseconds: 8 frames at 8 fps are 8 x 120 ms
        assert abs(sum(durations) - 8 * 125) <= 8 * 10 and im.size == (64, 64)
    assert Image.open(tmp_path / "run" / "before_after.png").size[0] == 4 * (8 * 16 + 7)
    # the pre-trained models are cached: a second pre-training call reuses them
    meta = json.loads((tmp_path / "base" / "meta.json").read_text())
    assert set(meta["settings"]) == {"data", "vq", "prior", "judge"}
    run.pretrain(tmp_path / "base", **run.parse_overrides(TINY))
    text = capsys.readouterr().out
    assert "reusing vq" in text and "reusing prior" in text and "reusing judge" in text
