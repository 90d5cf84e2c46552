"""Smoke test of examples/janus_t2i: a tiny pre-training (real JanusVQVAE, Janus model, CLIP
scorer, classifier) and 2 GRPO steps through run.py, the reward through the `pickscore` code
path on the scorer's folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TINY = {
    "data": {"n_train": 300}, "vq": {"steps": 5}, "cls": {"steps": 5},
    "scorer": {"steps": 5, "hidden": 32}, "janus": {"steps": 5, "hidden": 32, "layers": 1},
    "rcls": {"steps": 5, "n_train": 64, "n_test": 32},
}  # fmt: skip


def test_scorer_folder_loads_as_the_pickscore_reward(tmp_path):
    """The saved scorer is a CLIPModel + processor folder; the `pickscore` reward's score equals
    logit_scale.exp() · cos of CLIPModel's own image / text embeddings."""
    from image_aesthetic.shapes import make_images
    from janus_t2i.scorer import load_scorer, train_scorer
    from transformers import AutoTokenizer, CLIPModel

    data = make_images(60, 0)
    train_scorer(data, tmp_path / "s", steps=3, batch_size=8, lr=1e-3, hidden=32,
                 pref_weight=1.0, seed=0, verbose=False)  # fmt: skip
    reward = load_scorer(tmp_path / "s")
    texts = ["red circle", "blue cross"]
    got = reward.score_images(data["images"][:2], texts)
    clip, tok = (
        CLIPModel.from_pretrained(tmp_path / "s"),
        AutoTokenizer.from_pretrained(tmp_path / "s"),
    )
    assert tok("red circle")["input_ids"][-1] == clip.config.text_config.eos_token_id
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():  # 16x16 in, 16x16 crop: the processor only normalises
        img = clip.get_image_features(pixel_values=(data["images"][:2] - mean) / std)
        txt = clip.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
    want = clip.logit_scale.exp() * torch.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_run_tiny_pretraining_and_two_grpo_steps(tmp_path):
    from janus_t2i import run

    sets = [f"{stage}.{k}={v}" for stage, kv in TINY.items() for k, v in kv.items()]
    argv = ["--base", str(tmp_path / "base"), "--eval-samples", "2", "--seeds", "0",
            "--eval-seeds", "12345"]  # fmt: skip
    argv += [a for s in sets for a in ("--pretrain-set", s)]
    argv += [a for s in ["trainer.steps=2", "trainer.batch_size=2", "algorithm.group_size=2",
                         f"log.run_dir={tmp_path / 'run'}", "log.samples_per_step=0"]
             for a in ("--set", s)]  # fmt: skip
    result = run.main(argv)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("cells", "summary", "runs", "relative_gain", "seconds", "heldout_prompts",
                "train_prompts", "loadavg_1min", "rewards", "settings", "commit"):  # fmt: skip
        assert key in saved, key
    (cell,) = saved["cells"]
    for key in ("score/pickscore", "score/aesthetic_proxy", "fidelity/both",
                "kl_to_start/per_image"):  # fmt: skip
        assert key in cell["before"] and key in cell["after"], key
    assert saved["runs"]["0"]["steps"] == 2 and saved["reward"] == "pickscore"
    assert [r["name"] for r in saved["rewards"]] == ["pickscore", "prompt_fidelity"]
    assert not set(saved["heldout_prompts"]) & set(saved["train_prompts"])
    assert len(saved["heldout_prompts"]) + len(saved["train_prompts"]) == 30
    # before GRPO the policy is the start model: the KL estimate is exactly 0
    assert result["cells"][0]["before"]["kl_to_start/per_image"] == 0.0
    assert (tmp_path / "run" / "grid_seed0_eval12345.png").is_file()
    meta = json.loads((tmp_path / "base" / "meta.json").read_text())
    assert set(meta["settings"]) == {"data", "vq", "cls", "scorer", "janus", "rcls"}
    assert (tmp_path / "base" / "reward_classifier.safetensors").is_file()
    cfg = json.loads((tmp_path / "base" / "janus" / "config.json").read_text())
    assert cfg["architectures"] == ["JanusForConditionalGeneration"]
    assert cfg["vq_config"]["num_patches"] == 8  # the 16x16 images' 8x8 code grid
