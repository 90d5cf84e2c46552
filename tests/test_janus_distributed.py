"""Janus text-to-image (and Emu3) under torchrun: 2-rank FSDP2 and DDP runs (CPU, gloo) of the
tiny real `JanusForConditionalGeneration` give the one-process losses, rewards and weights; FSDP2
shards the language model's decoder layers (not the vision tower's), keeps the frozen vision tower
and VQ whole on every rank (the VQ decodes sampled codes outside the sampling window), trains only
the `[janus_t2i] train` parts, and writes the one-process checkpoint.

All 2-rank runs share ONE torchrun launch (this file is also the worker:
`python -m torch.distributed.run --nproc_per_node=2 tests/test_janus_distributed.py OUT`); the
one-process references run in the pytest process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_distributed import (  # noqa: E402
    KEEP,
    assert_same_run,
    copy_checkpoint,
    launch_two_ranks,
    one_process,
    weights,
)
from test_janus import PROMPTS, janus_tokenizer, tiny_janus  # noqa: E402
from vocab_models import (  # noqa: E402
    chameleon_tokenizer,
    emu3_tokenizer,
    tiny_chameleon,
    tiny_emu3,
)

from grpo_ar.adapters.chameleon import ChameleonAdapter, ChameleonVQ, chameleon_decoder  # noqa: E402
from grpo_ar.adapters.emu3 import Emu3ImageAdapter  # noqa: E402
from grpo_ar.adapters.janus import JanusT2IAdapter, janus_trainable  # noqa: E402
from grpo_ar.adapters.vq import Emu3VQ  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.checkpoint import latest_checkpoint, load_tensors  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards import RewardComputer  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

BASE = [
    "trainer.steps=2",
    "trainer.batch_size=2",
    "trainer.lr=1e-2",
    # Adam eps: the default 1e-8 turns fp32 noise in ~0 gradients into O(lr) weight differences
    "trainer.optimizer_args={eps: 1e-4}",
    "trainer.save_every=1",
    "algorithm.group_size=4",
    "algorithm.beta=0.04",  # a frozen reference, sharded like the policy under FSDP2
    "sampling.cfg_scale=3.0",  # two forwards (cond, uncond) per FSDP2 training forward
    "log.progress=false",
    "log.keep_checkpoints=0",
]
# name -> (family, trained parts (Janus), overrides)
SCENARIOS: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "janus_fsdp2": ("janus", None, ["trainer.strategy=fsdp2"]),
    "janus_fsdp2_generation": (  # + TR-DPO soft sync: the sharded reference mixed in place
        "janus",
        ["generation"],
        [
            "trainer.strategy=fsdp2",
            "algorithm.reference_refresh=soft",
            "algorithm.reference_sync_every=1",
            "algorithm.reference_mix_alpha=0.5",
        ],
    ),  # fmt: skip
    # "vision": named, but the text-to-image forward never reaches it (DDP must allow that)
    "janus_ddp": ("janus", ["generation", "language_model", "vision"], ["trainer.strategy=ddp"]),
    "emu3_fsdp2": ("emu3", None, ["trainer.strategy=fsdp2", "algorithm.grpo_iters=2"]),
    # lr as in test_distributed: at 1e-2 fp32 summation order alone moves a weight by 1.2e-6
    "chameleon_fsdp2": ("chameleon", None, ["trainer.strategy=fsdp2", "trainer.lr=3e-3"]),
    # bf16 all-gathers for the sharded parts, the whole (ignored) ones stay as they are
    "janus_fsdp2_bf16": ("janus", None, ["trainer.strategy=fsdp2", "model.precision=bf16-mixed"]),
}
MIXED = ("janus_fsdp2_bf16",)  # trains; not compared with one process (other rounding)
GRID = (2, 3)  # Emu3 / Chameleon code grids


def build(family: str, parts: list[str] | None, cfg):
    """(model, adapter) of a scenario; the same weights on every rank and in one process."""
    if family == "janus":
        model = tiny_janus(seed=1)
        janus_trainable(model, *([parts] if parts else []))
        return model, JanusT2IAdapter(model, janus_tokenizer(), cfg.sampling)
    if family == "chameleon":  # its VQ inside the model, its pixel decoder beside it
        tok = chameleon_tokenizer()
        model = tiny_chameleon(tok, seed=3)
        torch.manual_seed(1)
        decoder = chameleon_decoder(model.model.vqmodel.config)
        vq = ChameleonVQ(model.model.vqmodel, decoder)
        return model, ChameleonAdapter(model.config.vocabulary_map, tok, vq, cfg.sampling, GRID)
    tok = emu3_tokenizer()
    model = tiny_emu3(tok, seed=3)
    vq = Emu3VQ(model.model.vqmodel)
    return model, Emu3ImageAdapter(model.config.vocabulary_map, tok, vq, cfg.sampling, GRID)


def make(run_dir: Path, name: str, overrides: list[str]) -> Trainer:
    family, parts, _ = SCENARIOS[name]
    cfg = load_config(None, [*BASE, f"log.run_dir={run_dir}", *overrides])
    model, ad = build(family, parts, cfg)
    rows = load_rows([{"prompt": p, "rewards": "aesthetic_proxy"} for p in PROMPTS])
    return Trainer(cfg, model, ad, rows, rewards=RewardComputer(names=["aesthetic_proxy"]))


def layout(tr: Trainer) -> dict:
    """Which modules are FSDP2 units and which parameters are sharded (DTensor) on this rank."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    root = getattr(tr.dist, "root", None)
    if root is None:
        return {}
    units = sorted(n for n, m in root.named_modules() if isinstance(m, FSDPModule))
    params = dict(tr.model.named_parameters())
    return {
        "units": units,
        "sharded": sorted(n for n, p in params.items() if isinstance(p, DTensor)),
        "whole": sorted(n for n, p in params.items() if not isinstance(p, DTensor)),
    }


# -- in-process pieces ---------------------------------------------------------------------------
def test_decoder_layers_are_the_model_calls_and_frozen_parts_stay_whole():
    """Janus' first `layers` list is its vision tower's; the adapter's model call leads to the
    language model's. Frozen non-layer parameters (one name per tied tensor) are kept whole."""
    from grpo_ar.parallel.fsdp import decoder_layers, frozen_outside

    cfg = load_config(None, [])
    model, ad = build("janus", None, cfg)
    assert decoder_layers(model)[0] is model.model.vision_model.encoder.layers[0]
    layers = decoder_layers(model, ad)
    assert layers == list(model.model.language_model.layers)
    whole = frozen_outside(model, layers)
    assert {n.split(".")[1] for n in whole} == {
        "vision_model",
        "aligner",
        "vqmodel",
        "language_model",
    }
    assert [n for n in whole if n.startswith("model.language_model.")] == [
        "model.language_model.embed_tokens.weight"  # = lm_head.weight, frozen by default
    ]
    janus_trainable(model, ["generation"])  # the layers frozen too: still sharded, not whole
    assert frozen_outside(model, layers) - whole == {"model.language_model.norm.weight"}


# -- the worker (every rank) ----------------------------------------------------------------------
def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")

    def run(name: str, scenario: str, resume: bool = False) -> None:
        tr = make(out / name, scenario, SCENARIOS[scenario][2])
        shape = layout(tr)
        if resume:
            tr.resume()
        hist = tr.train()
        w = weights(tr)
        if dist.get_rank() == 0:
            rows = [{k: h[k] for k in KEEP if k in h} for h in hist]
            dtypes = sorted({str(p.dtype) for p in tr.model.parameters()})
            got = {"hist": rows, "weights": w, "layout": shape, "dtypes": dtypes}
            torch.save(got, out / f"{name}.pt")

    for name in SCENARIOS:
        run(name, name)
    if dist.get_rank() == 0:  # FSDP2's own step-1 checkpoint, loaded back into sharded ranks
        copy_checkpoint(out / "janus_fsdp2", 1, out / "janus_fsdp2_resumed")
    dist.barrier()
    run("janus_fsdp2_resumed", "janus_fsdp2", resume=True)
    dist.destroy_process_group()


# -- the tests (pytest process) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    return launch_two_ranks(__file__, tmp_path_factory.mktemp("janus_dist"), timeout=600)


_REFS: dict = {}


def reference(name, tmp_path_factory):
    """The one-process run of a scenario (same global batch), computed once."""
    if name not in _REFS:
        run_dir = tmp_path_factory.mktemp(name)
        tr = make(run_dir, name, one_process(SCENARIOS[name][2]))
        hist = tr.train()
        _REFS[name] = (hist, weights(tr), run_dir)
    return _REFS[name]


def without_tied_copies(w: dict, got: dict) -> dict:
    """One-process state dicts name a tied tensor twice (lm_head = text embeddings); the
    gathered FSDP2 one once: keep the names it has, after checking the rest are those copies."""
    extra = set(w) - set(got)
    assert extra <= {"model.language_model.embed_tokens.weight"}, extra
    return {k: v for k, v in w.items() if k in got}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in MIXED])
def test_two_ranks_equal_one_process(launch, tmp_path_factory, name):
    """Per-step losses, KL, entropy, grad norms and rewards and the final weights of the 2-rank
    run equal the one-process run with the same global batch (tolerances of test_distributed)."""
    hist, w, _ = reference(name, tmp_path_factory)
    got = torch.load(launch / f"{name}.pt")
    assert_same_run(got, hist, without_tied_copies(w, got["weights"]))


@pytest.mark.slow
def test_fsdp2_bf16_mixed_janus_keeps_fp32_weights_and_a_whole_fp32_vq(launch):
    """model.precision = bf16-mixed under FSDP2: both steps train (finite, non-zero gradient
    norms), the parameters (sharded fp32 masters, the whole frozen parts with the VQ, which
    decodes outside the bf16 all-gathers) and the gathered checkpoint stay fp32."""
    got = torch.load(launch / "janus_fsdp2_bf16.pt")
    assert len(got["hist"]) == 2
    assert all(0 < h["grad_norm"] < 100 and abs(h["loss"]) < 10 for h in got["hist"])
    assert got["dtypes"] == ["torch.float32"]
    saved = load_tensors(latest_checkpoint(launch / "janus_fsdp2_bf16") / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["janus_fsdp2", "janus_fsdp2_generation", "janus_fsdp2_bf16"])
def test_fsdp2_shards_the_language_model_layers_and_keeps_frozen_parts_whole(launch, name):
    """Units: the Llama decoder layers of the language model and the root (not the vision
    tower's encoder layers, the first `layers` list in Janus' module order). Frozen parts
    outside the layers (vision tower, VQ, text embeddings tied to lm_head) are plain replicated
    tensors; the trained parts outside the layers belong to the sharded root."""
    shape = torch.load(launch / f"{name}.pt")["layout"]
    layers = [f"model.model.language_model.layers.{i}" for i in range(2)]
    assert shape["units"] == ["", *layers]  # "" = the ScoreNet root around the model
    sharded, whole = set(shape["sharded"]), set(shape["whole"])
    assert any(n.startswith("model.language_model.layers.") for n in sharded)
    assert any(n.startswith("model.generation_head.") for n in sharded)
    assert not any(n.startswith(("model.vision_model.", "model.vqmodel.")) for n in sharded)
    assert {"model.language_model.embed_tokens.weight"} <= whole
    assert any(n.startswith("model.vqmodel.") for n in whole)
    norm = "model.language_model.norm.weight"  # trained with the language model, else frozen
    assert (norm in sharded) == (SCENARIOS[name][1] is None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["janus_fsdp2", "janus_fsdp2_generation", "janus_ddp"])
def test_only_the_configured_janus_parts_trained(launch, name):
    """From the same initial weights, the 2-rank run changed only `[janus_t2i] train`'s parts:
    the generation head moved (and the language model's layers, when trained); the vision
    tower (named in janus_ddp, but no gradient reaches it), the VQ and the understanding head
    tied to the text embeddings stayed bitwise."""
    _, parts, _ = SCENARIOS[name]
    init = tiny_janus(seed=1)
    names = set(janus_trainable(init, *([parts] if parts else [])))
    got = torch.load(launch / f"{name}.pt")["weights"]
    before = init.state_dict()
    changed = {n for n, v in got.items() if not torch.equal(v, before[n])}
    assert changed <= names, sorted(changed - names)
    assert any(n.startswith("model.generation_head.") for n in changed)
    lm = any(n.startswith("model.language_model.layers.") for n in changed)
    assert lm == (parts is None or "language_model" in parts)
    for frozen in ("model.vision_model.", "model.vqmodel.", "model.aligner.", "lm_head."):
        assert not any(n.startswith(frozen) for n in changed), frozen


@pytest.mark.slow
def test_fsdp2_janus_checkpoint_resumes_in_fsdp2_and_in_one_process(
    launch, tmp_path, tmp_path_factory
):
    """FSDP2's step-1 checkpoint (gathered weights, optimizer moments, a reference whose
    frozen parts are whole) resumed by 2 sharded ranks and by one process: step 2 and the final
    weights are the uninterrupted one-process run's."""
    hist, w, _ = reference("janus_fsdp2", tmp_path_factory)
    got = torch.load(launch / "janus_fsdp2_resumed.pt")
    assert_same_run(got, hist, without_tied_copies(w, got["weights"]), start=1)
    copy_checkpoint(launch / "janus_fsdp2", 1, tmp_path / "run")
    tr = make(tmp_path / "run", "janus_fsdp2", one_process(SCENARIOS["janus_fsdp2"][2]))
    tr.resume()
    assert_same_run({"hist": tr.train(), "weights": weights(tr)}, hist, w, start=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["janus_fsdp2", "emu3_fsdp2", "chameleon_fsdp2"])
def test_fsdp2_checkpoint_is_the_one_process_checkpoint(launch, tmp_path_factory, name):
    """The step-2 model.safetensors written by rank 0 under FSDP2 (gathered) holds every tensor
    of the one-process checkpoint (vision tower and VQ included) with its values."""
    _, _, run_dir = reference(name, tmp_path_factory)
    a = load_tensors(latest_checkpoint(launch / name) / "model.safetensors")
    b = load_tensors(latest_checkpoint(run_dir) / "model.safetensors")
    assert set(a) == set(b)
    assert any(k.startswith("model.vqmodel.") for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
