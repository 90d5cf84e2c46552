"""Smoke test of the AR image aesthetic example (examples/image_aesthetic/run.py): tiny
pre-training, 2 GRPO steps through the real code paths, the grid PNG, and the pre-training cache."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_aesthetic"
TINY = [
    "data.n_train=96", "data.n_test=32", "vq.steps=2", "vq.codebook=32", "vq.channels=[8, 8]",
    "cls.steps=2", "cls.batch_size=16", "prior.steps=2", "prior.batch_size=8", "prior.hidden=32",
    "prior.layers=1",
]  # fmt: skip


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"image_aesthetic_{name}", EXAMPLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path) -> dict:
    run = _load("run")
    argv = ["--base", str(tmp_path / "base"), "--eval-samples", "2"]
    argv += [x for kv in TINY for x in ("--pretrain-set", kv)]
    sets = [
        "trainer.steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
        "algorithm.group_size=2", f"log.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    return run.main(argv + [x for kv in sets for x in ("--set", kv)])


def test_example_runs_two_steps_and_caches_pretraining(tmp_path, capsys):
    sys.path.insert(0, str(EXAMPLE))
    try:
        out = _run(tmp_path)
        first = capsys.readouterr().out
        again = _run(tmp_path)  # the second run reuses every pre-trained stage
        second = capsys.readouterr().out
    finally:
        sys.path.remove(str(EXAMPLE))
    assert "held-out before GRPO" in first and "held-out after  GRPO" in first
    assert "reusing" not in first
    assert all(f"reusing {s} from" in second for s in ("vq", "cls", "prior"))
    for res in (out, again):
        assert res["reward"] == "aesthetic_proxy" and res["steps"] == 2
        for when in ("before", "after"):
            m = res[when]
            assert 0.0 <= m["score/aesthetic_proxy"] <= 1.0
            assert 0.0 <= m["fidelity/both"] <= 1.0
        assert res["before"]["kl_to_start/per_image"] == 0.0  # the start model is the policy
    # identical seeds and cached models: the two runs measure exactly the same numbers
    assert out["after"] == again["after"]
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 1, 2]
    from PIL import Image

    grid = Image.open(out["grid"])
    held = len(out["heldout_prompts"])  # 2 samples per prompt, 2 rows, 16x16 at 4x, 2px gaps
    assert grid.size == (2 + held * 2 * 66, 2 + 2 * 66)
    assert (tmp_path / "run" / "results.json").exists()


def test_procedural_images_and_prompt_split():
    sys.path.insert(0, str(EXAMPLE))
    try:
        shapes = _load("shapes")
    finally:
        sys.path.remove(str(EXAMPLE))
    train, held = shapes.prompt_split()
    assert len(train) == 20 and len(held) == 10 and not set(train) & set(held)
    # every colour and every shape word still appears in the GRPO training prompts
    words = {w for p in train for w in p.split()}
    assert words == set(shapes.COLOURS) | set(shapes.SHAPES)
    d = shapes.make_images(400, seed=3)
    assert d["images"].shape == (400, 3, 16, 16)
    assert float(d["images"].min()) >= 0.0 and float(d["images"].max()) <= 1.0
    assert torch.equal(d["images"], shapes.make_images(400, seed=3)["images"])
    from grpo_ar.rewards.image import aesthetic_proxy_score

    score = aesthetic_proxy_score(d["images"], torch.ones(5))
    vivid = score[d["style"] == 0].mean()
    for k in (1, 2, 3):  # every dull style leaves the proxy room to improve
        assert score[d["style"] == k].mean() < vivid - 0.15
