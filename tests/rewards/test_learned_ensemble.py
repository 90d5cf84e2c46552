"""The learned rewards inside the reward layer: a weighted PickScore + ImageReward + LAION
aesthetic ensemble through build_rewards / RewardComputer and GDPO's per-reward normalisation;
setup checks that fire before any weights load; hub ids resolved from a Hugging Face cache."""

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from learned_tiny import bert_tokenizer, entries, original, pil_images, save_clip

from grpo_ar.core.advantages import compute_advantages
from grpo_ar.errors import ConfigError
from grpo_ar.rewards import (
    REWARDS,
    RewardContext,
    RewardSpecError,
    build_rewards,
    hps,
    imagereward,
    learned,
    pickscore,
    vlm_judge,
)
from grpo_ar.types import Entry, RewardSpec

WEIGHTS = {"pickscore": 0.5, "imagereward": 2.0, "aesthetic_laion": 1.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny CLIP folder (PickScore and the LAION head's CLIP), a LAION head for it, and an
    ImageReward folder with its tokenizer."""
    root = tmp_path_factory.mktemp("ens")
    save_clip(root / "clip", side=32)
    gen, dims, sd = torch.Generator().manual_seed(3), (8, 1024, 128, 64, 16, 1), {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        sd[f"layers.{i}.weight"] = torch.randn(b, a, generator=gen) / math.sqrt(a)
        sd[f"layers.{i}.bias"] = torch.randn(b, generator=gen) * 0.1
    torch.save(sd, root / "head.pth")
    ir, _ = original("imagereward_tiny.safetensors")
    (root / "ir").mkdir()
    torch.save(ir, root / "ir" / "ImageReward.pt")
    bert_tokenizer().save_pretrained(root / "ir" / "tok")
    return root


def setup_of(root):
    clip = str(root / "clip")
    return {
        "pickscore": {"model": clip, "processor": clip, "device": "cpu", "batch_size": 3},
        "imagereward": {
            "model": str(root / "ir"),
            "tokenizer": str(root / "ir" / "tok"),
            "vision_heads": 2,
            "text_heads": 2,
            "device": "cpu",
        },  # fmt: skip
        "aesthetic_laion": {"clip_path": clip, "mlp_path": str(root / "head.pth"), "device": "cpu"},
    }


def test_weighted_ensemble_and_gdpo_normalisation(folders):
    specs = tuple(RewardSpec(n, w) for n, w in WEIGHTS.items())
    es = [Entry(p, specs) for p in ("a red cat", "blue sky over the sea") for _ in range(4)]
    ctx = RewardContext(es, [0] * 4 + [1] * 4, 4, 0)
    imgs = pil_images(8, (32, 32), seed=11)
    rc = build_rewards(setup_of(folders), es)
    res = rc(imgs, ctx)
    assert res.names == sorted(WEIGHTS) and not any(res.failures.values())
    for k, name in enumerate(res.names):  # each column is that reward called on its own
        alone = torch.as_tensor(rc.fns[name](imgs, [{}] * 8, ctx), dtype=torch.float32)
        torch.testing.assert_close(res.components[:, k], alone, atol=1e-6, rtol=0)
        assert torch.equal(res.weights[:, k], torch.full((8,), WEIGHTS[name]))
    w = torch.tensor([WEIGHTS[n] for n in res.names])
    torch.testing.assert_close(res.total, (res.components * w).sum(1), atol=1e-5, rtol=0)

    gdpo = dict(multi_objective="normalize_then_sum", eps=1e-6)
    adv, valid = compute_advantages(
        "grpo", res.total, 4, components=res.components, weights=res.weights, **gdpo
    )
    c = res.components.double().view(2, 4, 3)  # GDPO by hand: z-score each reward in its group
    z = (c - c.mean(1, keepdim=True)) / (c.std(1, keepdim=True) + 1e-6)
    s = (z * w.double()).sum(-1).view(8)
    assert valid.all()
    torch.testing.assert_close(adv.double(), s / (s.std() + 1e-6), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "name, kw, key",
    [
        ("pickscore", {"model": "./no/such/folder"}, "model"),
        ("pickscore", {"dtype": "fp16"}, "dtype"),
        ("pickscore", {"batch_size": 0}, "batch_size"),
        ("pickscore", {"device": "tpu:x"}, "device"),
        ("hpsv2", {"version": "v3"}, "version"),
        ("hpsv2", {"norm_std": 0}, "norm_std"),
        ("hpsv2", {"model": "/no/such/HPS.pt"}, "model"),
        ("imagereward", {"norm_mean": math.inf}, "norm_mean"),
        ("imagereward", {"tokenizer": "~/no/such"}, "tokenizer"),
        ("vlm_judge", {"model": "/nope", "mode": "sample"}, "mode"),
    ],
)
def test_setup_errors_before_loading_name_the_key(name, kw, key):
    """Checked before anything loads: the valid-looking defaults are hub ids never fetched."""
    with pytest.raises(ConfigError, match=rf"data\.reward_setup\.{name}\.{key} to ") as e:
        build_rewards({name: kw}, [Entry("p", (RewardSpec(name),))])
    assert isinstance(e.value, RewardSpecError)  # what the reward layer's callers catch


def test_spec_args_are_checked(folders):
    rc = build_rewards(setup_of(folders), [])
    bad = Entry("p", (RewardSpec("pickscore", 1.0, {"text": 3}),))
    with pytest.raises(RewardSpecError, match="text=3 must be a string"):
        rc.validate([bad])
    with pytest.raises(RewardSpecError, match="takes no argument 'txt'"):
        rc.validate([Entry("p", (RewardSpec("imagereward", 1.0, {"txt": "a"}),))])


def fake_hub(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout of `repo` at one revision (what a download leaves)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


def test_hub_ids_load_from_the_cache_offline(folders, tmp_path):
    cache = tmp_path / "hub"
    fake_hub(cache, "acme/pick", {p.name: p for p in (folders / "clip").iterdir()})
    sd, _ = original("hps_open_clip_tiny.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2.1_compressed.pt")
    fake_hub(cache, "acme/hps", {"HPS_v2.1_compressed.pt": tmp_path / "HPS_v2.1_compressed.pt"})
    code = (
        "from grpo_ar.rewards import PickScore, HPSv2\n"
        "p = PickScore(model='acme/pick', processor='acme/pick', device='cpu')\n"
        "h = HPSv2(model='acme/hps', tokenizer='acme/pick', vision_heads=2, text_heads=2,\n"
        "          device='cpu')\n"
        "print(type(p.model).__name__, type(h.model).__name__)\n"
        "try:\n"
        "    HPSv2(model='acme/missing', tokenizer='acme/pick', device='cpu')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, 'reward_setup.hpsv2.model' in str(e))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["CLIPModel CLIPModel", "RewardSetupError True"]


def test_registered_and_light_to_import():
    assert {"pickscore", "hpsv2", "imagereward", "vlm_judge"} <= set(REWARDS)
    for mod in (hps, imagereward, learned, pickscore, vlm_judge):
        tree = ast.parse(Path(mod.__file__).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top for a in n.names} | {getattr(n, "module", None) for n in top}
        heavy = {"transformers", "huggingface_hub", "safetensors", "PIL"}
        assert not {m for m in names if m and m.split(".")[0] in heavy}, mod.__name__
    assert entries(["a"], "pickscore").entries[0].rewards[0].name == "pickscore"


@pytest.mark.gpu
def test_cuda_and_bf16_agree_with_cpu(folders):
    imgs = pil_images(4, (32, 32), seed=2) + pil_images(2, (40, 50), seed=3)
    ctx = entries(["a red cat", "blue sky", "the sea", "a dog", "two cat", "red sky"], "pickscore")
    for name, atol in (("pickscore", 0.15), ("imagereward", 5e-2), ("aesthetic_laion", 5e-2)):
        kw, cls = setup_of(folders)[name], REWARDS[name].obj
        cpu = torch.as_tensor(cls(**kw)(imgs, [{}] * 6, ctx))
        cuda = torch.as_tensor(cls(**{**kw, "device": "cuda"})(imgs, [{}] * 6, ctx)).cpu()
        half = cls(**{**kw, "device": "cuda", "dtype": "bfloat16"})(imgs, [{}] * 6, ctx)
        torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(torch.as_tensor(half).cpu(), cpu, atol=atol, rtol=0, msg=name)
