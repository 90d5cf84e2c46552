"""Smoke test of the AR image aesthetic example (examples/image_aesthetic/run.py): tiny
pre-training, 2 GRPO steps through the real code paths, the grid PNG, and the pre-training cache."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_aesthetic"
TINY = [
    "data.n_train=96", "data.n_test=32", "vq.steps=2", "vq.codebook=32", "vq.channels=[8, 8]",
    "cls.steps=2", "cls.batch_size=16", "prior.steps=2", "prior.batch_size=8", "prior.hidden=32",
    "prior.layers=1", "rcls.steps=2", "rcls.batch_size=16", "rcls.n_train=64", "rcls.n_test=32",
]  # fmt: skip


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"image_aesthetic_{name}", EXAMPLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, *extra: str) -> dict:
    run = _load("run")
    argv = ["--base", str(tmp_path / "base"), "--eval-samples", "2", "--seeds", "0",
            "--eval-seeds", "12345", *extra]  # fmt: skip
    argv += [x for kv in TINY for x in ("--pretrain-set", kv)]
    sets = [
        "trainer.steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
        "algorithm.group_size=2", f"log.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    return run.main(argv + [x for kv in sets for x in ("--set", kv)])


@pytest.mark.slow
def test_example_runs_two_steps_and_caches_pretraining(tmp_path, capsys, monkeypatch):
    # another example's `pretrain` module already imported in this process must not be used
    monkeypatch.setitem(sys.modules, "pretrain", types.ModuleType("pretrain"))
    out = _run(tmp_path)
    first = capsys.readouterr().out
    again = _run(tmp_path)  # the second run reuses every pre-trained stage
    second = capsys.readouterr().out
    assert "held-out before GRPO, eval seed 12345" in first
    assert "training seed 0, eval seed 12345, after GRPO" in first
    assert "reusing" not in first
    assert all(f"reusing {s} from" in second for s in ("vq", "cls", "prior", "rcls"))
    for res in (out, again):
        assert res["reward"] == "aesthetic_proxy" and res["runs"][0]["steps"] == 2
        assert [r["name"] for r in res["rewards"]] == ["aesthetic_proxy", "prompt_fidelity"]
        (cell,) = res["cells"]
        for when in ("before", "after"):
            m = cell[when]
            assert 0.0 <= m["score/aesthetic_proxy"] <= 1.0
            assert 0.0 <= m["fidelity/both"] <= 1.0
        assert cell["before"]["kl_to_start/per_image"] == 0.0  # the start model is the policy
    # identical seeds and cached models: the two runs measure exactly the same numbers
    assert out["cells"][0]["after"] == again["cells"][0]["after"]
    metrics = (tmp_path / "run" / "seed0" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in metrics]
    assert steps == [1, 2]  # the rerun started over (the example sets log.overwrite)
    from PIL import Image

    grid = Image.open(out["cells"][0]["grid"])
    held = len(out["heldout_prompts"])  # 2 samples per prompt, 2 rows, 16x16 at 4x, 2px gaps
    assert grid.size == (2 + held * 2 * 66, 2 + 2 * 66)
    assert (tmp_path / "run" / "results.json").exists()
    # training samples are written as PNGs (config.toml log.samples_per_step)
    assert list((tmp_path / "run" / "seed0" / "samples" / "step_000001").glob("*.png"))


def test_procedural_images_and_prompt_split():
    shapes = _load("shapes")
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


def _tiny_clip_and_head(d: Path) -> tuple[Path, Path]:
    """A tiny random CLIPModel with its image processor, and a LAION-shaped head for it."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    text = dict(small, vocab_size=32, max_position_embeddings=16)
    vision = dict(small, image_size=30, patch_size=10)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    CLIPModel(cfg).save_pretrained(d / "clip")
    size = {"shortest_edge": 30}
    CLIPImageProcessorPil(size=size, crop_size={"height": 30, "width": 30}).save_pretrained(
        d / "clip"
    )
    dims, sd = (8, 1024, 128, 64, 16, 1), {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        sd[f"layers.{i}.weight"] = torch.randn(b, a) / a**0.5
        sd[f"layers.{i}.bias"] = torch.zeros(b)
    save_file(sd, d / "head.safetensors")
    return d / "clip", d / "head.safetensors"


@pytest.mark.slow
def test_example_trains_on_aesthetic_laion_given_clip_and_head(tmp_path, capsys):
    clip, head = _tiny_clip_and_head(tmp_path)
    out = _run(tmp_path, "--clip", str(clip), "--mlp", str(head))
    assert "| aesthetic_laion | " in capsys.readouterr().out  # the summary table's row
    assert out["reward"] == "aesthetic_laion"
    for when in ("before", "after"):  # the proxy is still reported beside the GRPO reward
        assert set(out["cells"][0][when]) >= {"score/aesthetic_laion", "score/aesthetic_proxy"}
    metrics = (tmp_path / "run" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert "reward/aesthetic_laion/mean" in json.loads(metrics[-1])
