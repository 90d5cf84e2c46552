"""Image rewards on a tiny random CLIPModel saved to disk with a local processor and tokenizer.

The LAION head is checked against a hand-written CLIP -> L2-normalise -> affine chain computed
from the transformers processor's own pixel values; the proxy against a naive per-pixel loop.
"""

import ast
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from grpo_ar.rewards import REWARDS, RewardContext, RewardSpecError, build_rewards
from grpo_ar.rewards import image as im
from grpo_ar.types import Entry, RewardSpec

SIDE, DIM = 30, 8  # CLIP image side and projection dim of the tiny model
MLP_DIMS = (DIM, 1024, 128, 64, 16, 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for c in alphabet + [a + "</w>" for a in alphabet]:  # no merges: words split into bytes
        vocab[c] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=10,
    )
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=DIM)
    ).save_pretrained(d)
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    )
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A random LAION-shaped head saved both ways: (state dict, .pth path, .safetensors path)."""
    d = tmp_path_factory.mktemp("mlp")
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(MLP_DIMS, MLP_DIMS[1:])):
        sd[f"layers.{i}.weight"] = torch.randn(b, a, generator=gen) / math.sqrt(a)
        sd[f"layers.{i}.bias"] = torch.randn(b, generator=gen) * 0.1
    torch.save(sd, d / "head.pth")
    save_file(sd, d / "head.safetensors")
    return sd, d / "head.pth", d / "head.safetensors"


def pil_images(n, size=(SIDE, SIDE), seed=0):
    """Smooth colour fields plus noise, uint8, as PIL RGB."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(f[c] * xx + c) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], -1)
        x = 128 + 90 * base + rng.normal(0, 20, (h, w, 3))
        out.append(Image.fromarray(x.clip(0, 255).astype(np.uint8)))
    return out


def ctx_for(prompts):
    entries = [Entry(p, (RewardSpec("clip_score"),)) for p in prompts]
    return RewardContext(entries, list(range(len(entries))), 1, 0)


# ---------------------------------------------------------------- image conversion


def test_images_to_tensor_accepts_every_format():
    pil = pil_images(1, (5, 7))[0]
    arr = np.asarray(pil)
    want = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255  # (3, 5, 7)
    outs = [pil, arr, torch.from_numpy(arr.copy()), want.clone(), want.double().numpy()]
    got = im.images_to_tensor(outs)
    assert got.shape == (5, 3, 5, 7) and got.dtype == torch.float32
    for x in got:
        torch.testing.assert_close(x, want, atol=1e-7, rtol=0)
    gray = im.images_to_tensor([pil.convert("L"), pil.convert("RGBA")])
    torch.testing.assert_close(gray[1], want, atol=0, rtol=0)
    assert torch.equal(gray[0][0], gray[0][1])
    over = im.images_to_tensor([torch.full((3, 2, 2), 1.5), torch.full((3, 2, 2), -0.5)])
    assert torch.equal(over, torch.stack([torch.ones(3, 2, 2), torch.zeros(3, 2, 2)]))
    assert torch.equal(im.images_to_tensor(got), got)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([np.zeros((3, 4, 4), np.uint8)], r"uint8 image must be \(H, W, 3\)"),
        ([torch.zeros(4, 4, 3)], r"float image must be \(3, H, W\)"),
        ([torch.zeros(3, 4, 4), torch.zeros(3, 4, 5)], "differ in size"),
        (["not an image"], "expected an image"),
    ],
)
def test_images_to_tensor_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        im.images_to_tensor(bad)


def test_map_images_groups_sizes_and_keeps_order():
    xs = [torch.full((3, 4 + i % 2, 4), i / 10) for i in range(7)]
    seen = []

    def fn(x, idx):
        seen.append((tuple(x.shape), idx))
        return x.mean((1, 2, 3))

    got = im.map_images(fn, xs, batch_size=2)
    torch.testing.assert_close(got, torch.arange(7) / 10, atol=1e-7, rtol=0)
    assert seen == [
        ((2, 3, 4, 4), [0, 2]),
        ((2, 3, 4, 4), [4, 6]),
        ((2, 3, 5, 4), [1, 3]),
        ((1, 3, 5, 4), [5]),
    ]


# ---------------------------------------------------------------- aesthetic_proxy


def naive_components(img):
    """Per-pixel Python loops over a (3, H, W) tensor; constants as documented."""
    _, h, w = img.shape
    px = [[[float(img[c, i, j]) for c in range(3)] for j in range(w)] for i in range(h)]
    flat = [p for row in px for p in row]
    n = len(flat)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    std = lambda v: math.sqrt(mean([(t - mean(v)) ** 2 for t in v]))  # noqa: E731
    rg = [255 * (r - g) for r, g, b in flat]
    yb = [255 * (0.5 * (r + g) - b) for r, g, b in flat]
    m = math.hypot(std(rg), std(yb)) + 0.3 * math.hypot(mean(rg), mean(yb))
    y = [[0.299 * r + 0.587 * g + 0.114 * b for r, g, b in row] for row in px]
    ys = [v for row in y for v in row]
    sat = [(max(p) - min(p)) / max(p) if max(p) > 0 else 0.0 for p in flat]
    lap = [
        y[i - 1][j] + y[i + 1][j] + y[i][j - 1] + y[i][j + 1] - 4 * y[i][j]
        for i in range(1, h - 1)
        for j in range(1, w - 1)
    ]
    bell = lambda v, c, s: math.exp(-(((v - c) / s) ** 2))  # noqa: E731
    sl = std(lap)
    assert n == h * w
    return [
        1 - math.exp(-m / 45),
        bell(std(ys), 0.22, 0.12),
        bell(mean(sat), 0.45, 0.25),
        bell(math.log10(sl / 0.08), 0, 0.6) if sl > 0 else 0.0,
        bell(mean(ys), 0.5, 0.25),
    ]


def test_proxy_components_match_naive_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 6, 5, generator=gen)
    x[1] = x[1] * 0.2 + 0.4  # dull
    x[2] = 0.5  # flat grey: sharpness log10(0) -> 0
    want = torch.tensor([naive_components(img) for img in x], dtype=torch.float32)
    torch.testing.assert_close(im.proxy_components(x), want, atol=1e-6, rtol=0)
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0])
    score = im.aesthetic_proxy_score(x, w)
    torch.testing.assert_close(score, (want * w).sum(1) / 4, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 3x3"):
        im.proxy_components(torch.rand(1, 3, 2, 8))


def showcase(side=64):
    """A colourful, contrasty image with crisp 8-pixel blocks, its blurred copy, flat grey."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    blocks = ((torch.arange(side)[:, None] // 8 + torch.arange(side)[None] // 8) % 2).float()
    sharp = torch.stack(
        [0.15 + 0.7 * blocks * xx, 0.2 + 0.6 * yy * (1 - blocks), 0.8 - 0.6 * xx * yy]
    )
    blurred = F.avg_pool2d(F.pad(sharp[None], (3,) * 4, mode="replicate"), 7, stride=1)[0]
    return sharp, blurred, torch.full((3, side, side), 0.5)


def test_proxy_ranks_obvious_cases_and_is_batch_invariant():
    sharp, blurred, grey = showcase()
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.stack([sharp, blurred, grey, noise])
    entry = Entry("p", (RewardSpec("aesthetic_proxy"),))
    ctx = RewardContext([entry] * 4, [0] * 4, 4, 0)
    got = torch.as_tensor(im.aesthetic_proxy(list(x), [{}] * 4, ctx))
    assert got[2] < got[1] < got[0] and bool(((got >= 0) & (got <= 1)).all())
    comps = im.proxy_components(x)
    sharpness = im.PROXY_COMPONENTS.index("sharpness")
    # blur and pixel noise both lose on sharpness to crisp edges
    assert comps[0, sharpness] > 0.9 and comps[1, sharpness] < 0.3 and comps[3, sharpness] < 0.1
    for i in range(4):  # alone, and in another order with other batch-mates
        alone = torch.as_tensor(im.aesthetic_proxy([x[i]], [{}], ctx.subset([i])))
        assert torch.equal(alone, got[i : i + 1])
    perm = [3, 1, 0, 2]
    shuffled = torch.as_tensor(im.aesthetic_proxy([x[i] for i in perm], [{}] * 4, ctx))
    assert torch.equal(shuffled, got[perm])


def test_proxy_weights_from_setup_and_entry():
    sharp, blurred, grey = showcase(16)
    only = dict.fromkeys(im.PROXY_COMPONENTS, 0.0)
    setup = {"aesthetic_proxy": {**only, "exposure": 1.0}}
    e1 = Entry("p", (RewardSpec("aesthetic_proxy"),))
    e2 = Entry("p", (RewardSpec("aesthetic_proxy", 1.0, {"exposure": 0.0, "contrast": 2.0}),))
    rc = build_rewards(setup, [e1, e2])
    res = rc([sharp, sharp], RewardContext([e1, e2], [0, 1], 1, 0))
    comps = im.proxy_components(sharp[None])[0]
    want = torch.stack([comps[4], comps[1]])
    torch.testing.assert_close(res.components[:, 0], want, atol=1e-6, rtol=0)
    for bad, match in [({"sharpness": -1.0}, "sharpness=-1.0 must be"), (only, "needs a weight")]:
        e = Entry("p", (RewardSpec("aesthetic_proxy", 1.0, bad),))
        with pytest.raises(RewardSpecError, match=match):
            build_rewards({}, [e])


# ---------------------------------------------------------------- CLIP preprocessing


@pytest.mark.parametrize("size", [(SIDE, SIDE), (40, 50), (17, 23), (64, 31), (45, 45)])
def test_preprocess_matches_the_transformers_processor(clip_dir, size):
    proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
    pre = im.ClipPreprocess.from_processor(proc)
    assert pre.size == SIDE and pre.crop == (SIDE, SIDE) and pre.mode == "bicubic"
    assert pre.mean == tuple(proc.image_mean) and pre.std == tuple(proc.image_std)
    imgs = pil_images(3, size, seed=sum(size))
    want = proc(images=imgs, return_tensors="pt").pixel_values
    got = pre(im.images_to_tensor(imgs))
    assert got.shape == want.shape == (3, 3, SIDE, SIDE)
    diff = (got - want).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255  # grey levels
    if size == (SIDE, SIDE):  # no resize: rescale and normalise only
        assert diff.max() < 1e-4
    else:  # PIL rounds in fixed point; each 8-bit pass may land one level apart
        assert diff.max() < 1 + 1e-3 and diff.mean() < 0.05


def test_preprocess_fixed_size_bilinear_no_crop():
    proc = CLIPImageProcessorPil(size={"height": 24, "width": 28}, do_center_crop=False, resample=2)
    pre = im.ClipPreprocess.from_processor(proc)
    assert pre.size == (24, 28) and pre.crop is None and pre.mode == "bilinear"
    imgs = pil_images(2, (37, 41))
    want = proc(images=imgs, return_tensors="pt").pixel_values
    diff = (pre(im.images_to_tensor(imgs)) - want).abs() * torch.tensor(pre.std).view(1, 3, 1, 1)
    assert diff.max() * 255 < 1 + 1e-3 and diff.mean() * 255 < 0.05


# ---------------------------------------------------------------- aesthetic_laion


def manual_laion(clip_dir, sd, imgs):
    model = CLIPModel.from_pretrained(clip_dir).eval()
    px = CLIPImageProcessorPil.from_pretrained(clip_dir)(images=imgs, return_tensors="pt")
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=px.pixel_values).pooler_output
    h = emb / emb.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # Dropouts at 1, 3, 5 are identities in eval
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return h[:, 0]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_laion_matches_manual_clip_normalise_mlp(clip_dir, mlp, fmt):
    sd, pth, st = mlp
    setup = {"clip_path": str(clip_dir), "mlp_path": str(pth if fmt == "pth" else st)}
    entry = Entry("p", (RewardSpec("aesthetic_laion"),))
    rc = build_rewards({"aesthetic_laion": {**setup, "device": "cpu", "batch_size": 2}}, [entry])
    imgs = pil_images(5)
    res = rc(imgs, RewardContext([entry] * 5, [0] * 5, 5, 0))
    want = manual_laion(clip_dir, sd, imgs)
    assert want.std() > 1e-3  # the images are told apart
    torch.testing.assert_close(res.components[:, 0], want, atol=1e-5, rtol=0)


def test_laion_mlp_keys_and_structure(mlp):
    sd, pth, _ = mlp
    head = im.LaionAestheticMLP(MLP_DIMS)
    assert tuple(head.state_dict()) == im.LAION_MLP_KEYS
    assert im.LAION_MLP_KEYS[:2] == ("layers.0.weight", "layers.0.bias")
    assert im.LAION_MLP_KEYS[-2:] == ("layers.7.weight", "layers.7.bias")
    drops = [(i, m.p) for i, m in enumerate(head.layers) if isinstance(m, torch.nn.Dropout)]
    assert drops == [(1, 0.2), (3, 0.2), (5, 0.1)]
    assert tuple(im.LaionAestheticMLP().layers[0].weight.shape) == (1024, 768)
    loaded = im.load_laion_mlp(pth)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in im.LAION_MLP_KEYS)


def test_batched_equals_one_by_one_and_no_grad(clip_dir, mlp):
    _, pth, _ = mlp
    laion = im.LaionAesthetic(clip_dir, pth, device="cpu", batch_size=3)
    score = im.ClipScore(clip_dir, device="cpu", batch_size=3)
    assert laion.model is score.model  # one CLIP in memory for both rewards
    grad_seen = []
    record = lambda *_: grad_seen.append(torch.is_grad_enabled())  # noqa: E731
    hooks = [laion.model.vision_model.register_forward_hook(record)]
    hooks.append(laion.model.text_model.register_forward_hook(record))
    try:
        imgs = pil_images(7, (36, 44))
        prompts = [f"a photo number {i}" for i in range(7)]
        ctx = ctx_for(prompts)
        with torch.enable_grad():
            batched = laion(imgs, [{}] * 7, ctx)
            cs = score(imgs, [{}] * 7, ctx)
    finally:
        for h in hooks:
            h.remove()
    # chunks of 3, 3, 1: 3 image passes each, 3 text passes for clip_score
    assert grad_seen == [False] * 9 and not batched.requires_grad
    single = torch.cat([laion([img], [{}], ctx.subset([i])) for i, img in enumerate(imgs)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    cs_single = [score([img], [{}], ctx.subset([i]))[0] for i, img in enumerate(imgs)]
    torch.testing.assert_close(torch.tensor(cs), torch.tensor(cs_single), atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in laion.model.parameters())


def write_head(path, dims, rename=None):
    sd = im.LaionAestheticMLP(dims).state_dict()
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    torch.save(sd, path)
    return path


def test_bad_paths_and_heads_fail_at_setup(clip_dir, mlp, tmp_path):
    _, pth, _ = mlp

    def setup_error(match, **kw):
        cfg = {"clip_path": str(clip_dir), "mlp_path": str(pth), **kw}
        with pytest.raises(RewardSpecError, match=match):
            build_rewards({"aesthetic_laion": cfg})

    fix = "set data.reward_setup.aesthetic_laion"
    setup_error(
        rf"reward setup of 'aesthetic_laion': clip_path=.* has no config.json; {fix}.clip_path",
        clip_path=str(tmp_path / "none"),
    )
    setup_error(
        rf"mlp_path=.*missing.pth' is not a file; {fix}.mlp_path",
        mlp_path=str(tmp_path / "missing.pth"),
    )
    no_proc = tmp_path / "no_proc"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(no_proc)
    setup_error("clip_path=.* has no preprocessor_config.json", clip_path=str(no_proc))
    with pytest.raises(RewardSpecError, match="missing 1 required positional argument: 'mlp_path'"):
        build_rewards({"aesthetic_laion": {"clip_path": str(clip_dir)}})
    renamed = write_head(tmp_path / "renamed.pth", MLP_DIMS, lambda k: "model." + k)
    setup_error(
        r"mlp_path=.* does not load: expected exactly the keys layers.0.weight.*found \['model",
        mlp_path=str(renamed),
    )
    wide = write_head(tmp_path / "wide.pth", (16, 32, 8, 8, 4, 1))
    setup_error("takes 16-dim embeddings, the CLIP model gives 8", mlp_path=str(wide))
    pickled = tmp_path / "module.pth"
    torch.save(im.LaionAestheticMLP(MLP_DIMS), pickled)  # a whole module: refused by weights_only
    setup_error("mlp_path=.* does not load", mlp_path=str(pickled))
    setup_error("need batch_size >= 1", batch_size=0)
    only_model = tmp_path / "only_model"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(only_model)
    CLIPImageProcessorPil.from_pretrained(clip_dir).save_pretrained(only_model)
    with pytest.raises(
        RewardSpecError, match="reward setup of 'clip_score': clip_path=.* has no tokenizer"
    ):
        build_rewards({"clip_score": {"clip_path": str(only_model)}})


# ---------------------------------------------------------------- clip_score


def test_clip_score_matches_manual_cosine(clip_dir, caplog):
    from transformers import AutoTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    imgs = pil_images(4)
    long_text = "a very long caption " * 10  # more tokens than the 16 text positions
    texts = ["a red cat", "Two dogs!", long_text, "ignored prompt"]
    with torch.no_grad():
        px = CLIPImageProcessorPil.from_pretrained(clip_dir)(images=imgs, return_tensors="pt")
        i_emb = model.get_image_features(pixel_values=px.pixel_values).pooler_output
        enc = tok(
            texts[:3] + ["override"],
            padding=True,
            truncation=True,
            max_length=16,
            return_tensors="pt",
        )
        t_emb = model.get_text_features(**enc).pooler_output
    cos = F.cosine_similarity(i_emb, t_emb, dim=-1)
    assert (cos > 0).any() and (cos < 0).any()  # both sides of the floor are exercised
    prompts = [
        texts[0],
        [{"role": "system", "content": "x"}, {"role": "user", "content": texts[1]}],
        long_text,
        texts[3],
        7,
    ]
    entries = [
        Entry(p, (RewardSpec("clip_score", 1.0, a),))
        for p, a in zip(prompts, [{}, {}, {}, {"text": "override"}, {}])
    ]
    ctx = RewardContext(entries, list(range(5)), 1, 0)
    floored = build_rewards({"clip_score": {"clip_path": str(clip_dir), "device": "cpu"}}, entries)
    raw = build_rewards(
        {
            "clip_score": {
                "clip_path": str(clip_dir),
                "device": "cpu",
                "scale": 1.0,
                "clip_negative": False,
            }
        },
        entries,
    )
    with caplog.at_level(logging.WARNING, logger="grpo_ar.rewards"):
        got = floored(imgs + [imgs[0]], ctx).components[:, 0]
    nan = torch.tensor([math.nan])
    torch.testing.assert_close(
        got, torch.cat([100 * cos.clamp_min(0), nan]), atol=1e-4, rtol=0, equal_nan=True
    )
    got_raw = raw(imgs + [imgs[0]], ctx).components[:, 0]
    torch.testing.assert_close(got_raw, torch.cat([cos, nan]), atol=1e-6, rtol=0, equal_nan=True)
    assert any("clip_score' gave 1 of 5 samples" in r.getMessage() for r in caplog.records)


def test_spec_validation_of_clip_rewards(clip_dir, mlp):
    setup = {"clip_score": {"clip_path": str(clip_dir), "device": "cpu"}}
    bad = Entry("p", (RewardSpec("clip_score", 1.0, {"text": 3}),))
    with pytest.raises(
        RewardSpecError, match="entry 0: reward 'clip_score': text=3 must be a string"
    ):
        build_rewards(setup, [bad])
    extra = Entry("p", (RewardSpec("aesthetic_laion", 1.0, {"answer": 1}),))
    setup = {"aesthetic_laion": {"clip_path": str(clip_dir), "mlp_path": str(mlp[1])}}
    with pytest.raises(RewardSpecError, match="'aesthetic_laion' takes no argument 'answer'"):
        build_rewards(setup, [extra])


def test_registered_and_transformers_imported_lazily():
    assert {"aesthetic_laion", "clip_score", "aesthetic_proxy"} <= set(REWARDS)
    tree = ast.parse(Path(im.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {getattr(n, "module", None) for n in top}
    assert not {m for m in names if m and m.split(".")[0] in ("transformers", "PIL", "safetensors")}


@pytest.mark.gpu
def test_cuda_and_half_precision_agree_with_cpu(clip_dir, mlp):
    imgs = pil_images(4, (40, 36))
    cpu = im.LaionAesthetic(clip_dir, mlp[1], device="cpu")([*imgs], [{}] * 4, None)
    cuda = im.LaionAesthetic(clip_dir, mlp[1], device="cuda")([*imgs], [{}] * 4, None)
    half = im.LaionAesthetic(clip_dir, mlp[1], device="cuda", dtype="float16")
    torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=0)
    torch.testing.assert_close(half([*imgs], [{}] * 4, None), cpu, atol=2e-2, rtol=0)
