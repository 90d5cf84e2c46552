"""model.precision: fp32 master weights under the mixed precisions, autocast compute, fp16's
gradient scaler, bf16-true's lost small updates, checkpoints and resume."""

import copy

import pytest
import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.config.run import ModelConfig
from grpo_ar.errors import ConfigError
from grpo_ar.io.data import load_rows
from grpo_ar.parallel.fsdp import mixed_precision_policy
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.step import StepStats, memory_metrics
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

if "toy_fives" not in REWARDS:

    @register_reward("toy_fives")
    @per_sample
    def toy_fives(output: str) -> float:
        return output.count("5") / 8


SGD = ("trainer.optimizer=torch.optim.SGD", "trainer.lr=1.0", "trainer.max_grad_norm=0")


def make(tmp_path, precision, overrides=(), seed=0):
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=8",
            "trainer.steps=1",
            "trainer.batch_size=4",
            "algorithm.group_size=4",
            f"model.precision={precision}",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    # what the CLI loads: the storage dtype model.precision fixes
    model = tiny_llama(vocab_size=len(tok), seed=seed).to(getattr(torch, cfg.model.dtype))
    entries = load_rows([{"prompt": f"{i}*{i}=", "rewards": "toy_fives"} for i in range(8)])
    return Trainer(cfg, model, TextAdapter(tok, cfg.sampling), entries)


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "precision", "dtype"),
    [
        ({}, "fp32", "float32"),
        ({"precision": "bf16-mixed"}, "bf16-mixed", "float32"),
        ({"precision": "fp16-mixed"}, "fp16-mixed", "float32"),
        ({"precision": "bf16-true"}, "bf16-true", "bfloat16"),
        ({"dtype": "bfloat16"}, "bf16-true", "bfloat16"),  # the older key keeps its meaning
        ({"dtype": "float16"}, "fp16-true", "float16"),
    ],
)
def test_precision_fixes_the_storage_dtype(given, precision, dtype):
    m = ModelConfig(**given)
    assert (m.precision, m.dtype) == (precision, dtype)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"precision": "16-mixed"}, "use fp32, bf16-mixed, fp16-mixed or bf16-true"),
        ({"precision": "fp16-true"}, "use fp32, bf16-mixed, fp16-mixed or bf16-true"),
        ({"precision": "bf16-mixed", "dtype": "bfloat16"}, "drop model.dtype"),
    ],
)
def test_bad_precision_is_refused(given, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**given)


def test_fsdp2_policy_reduces_in_fp32():
    p = mixed_precision_policy("bf16-mixed")
    assert (p.param_dtype, p.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("fp32").param_dtype is None  # the parameters' own dtype


# -- master weights -------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "survives"), [("bf16-mixed", True), ("bf16-true", False)])
def test_a_1e7_relative_update_survives_only_master_weights(tmp_path, precision, survives):
    """Gradient = 1e-7·w under SGD at lr 1: each weight should move by 1e-7 of itself, more
    than half an fp32 ulp (≤ 6e-8 relative) and far less than half a bf16 ulp (≥ 2e-3)."""
    tr = make(tmp_path, precision, SGD)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for p in tr.model.parameters():
        p.grad = p.detach() * 1e-7
    tr._optimizer_step(True, StepStats())
    for n, p in tr.model.named_parameters():
        moved = (p.detach() != before[n]) | (before[n] == 0)
        if survives:
            assert p.dtype == torch.float32 and bool(moved.all()), n
            # toward zero by 1e-7 of itself, give or take fp32's rounding (≤ 2^-24 each way)
            rel = ((before[n] - p.detach()) / before[n])[before[n] != 0]
            assert bool(((rel > 1e-7 - 6e-8) & (rel < 1e-7 + 6e-8)).all()), n
        else:
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.detach(), before[n]), n


def _update_once(tr, rollout):
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    stats = StepStats()
    tr.update(copy.deepcopy(rollout), stats)
    deltas = {n: before[n] - p.detach() for n, p in tr.model.named_parameters()}  # = grad (SGD)
    return deltas, stats.summary()


def test_bf16_mixed_loss_and_gradients_track_fp32(tmp_path):
    """Same weights, same rollout: bf16-mixed's loss and gradients against fp32's. bf16 keeps
    8 bits of mantissa (relative error 2^-9 per rounding); through two decoder layers and the
    head the gradient is off by about one bf16 epsilon (measured 0.3 %): tolerance 2 %."""
    ref = make(tmp_path / "a", "fp32", SGD)
    mixed = make(tmp_path / "b", "bf16-mixed", SGD)
    rollout = ref.generate(ref.prompts.next_batch(), StepStats())
    # the rollout's mean NLL, a loss far from 0, through each trainer's scorer before any update
    nll = []
    for tr in (ref, mixed):
        mb = copy.deepcopy(rollout)
        with tr.precision.autocast(), torch.no_grad():
            logp, _ = tr.dist.score(mb)
        assert logp.dtype == torch.float32  # log-probs stay fp32 under autocast
        mask = tr._loss_mask(mb)
        nll.append(float(-(logp * mask).sum() / mask.sum()))
    assert abs(nll[1] - nll[0]) < 5e-3 * nll[0], nll  # measured: 8e-5
    g32, s32 = _update_once(ref, rollout)
    g16, s16 = _update_once(mixed, rollout)
    num = sum(float((g16[n] - g32[n]).norm() ** 2) for n in g32) ** 0.5
    den = sum(float(g32[n].norm() ** 2) for n in g32) ** 0.5
    assert den > 0 and num / den < 2e-2, num / den  # measured: 3e-3
    assert num > 0  # autocast ran: bf16 matmuls do not reproduce fp32 bit for bit
    assert abs(s16["loss"] - s32["loss"]) < 1e-3  # GRPO's first pass: ~0 (zero-mean advantages)
    assert abs(s16["entropy"] - s32["entropy"]) < 2e-2 * s32["entropy"]
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    assert all(  # the optimizer state is fp32 too
        v.dtype == torch.float32
        for st in mixed.optimizer.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def test_checkpoints_keep_the_master_weights(tmp_path):
    from safetensors.torch import load_file

    from grpo_ar.io.checkpoint import latest_checkpoint

    tr = make(tmp_path, "bf16-mixed", ["trainer.lr=1e-3"])
    tr.train()
    saved = load_file(latest_checkpoint(tmp_path) / "model.safetensors")
    state = tr.model.state_dict()
    assert saved.keys() <= state.keys() and "model.embed_tokens.weight" in saved
    for k, v in saved.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, state[k]), k


# -- fp16-mixed ------------------------------------------------------------------------------
def test_fp16_mixed_scales_and_resumes_its_scaler(tmp_path):
    tr = make(tmp_path, "fp16-mixed", ["trainer.lr=1e-3", "trainer.steps=2"])
    scaler = tr.precision.scaler
    assert scaler is not None
    start = scaler.get_scale()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.train_step()
    assert m.get("skipped_updates", 0) == 0 and tr.updates == 1
    assert any(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert scaler.get_scale() == start  # growth only after 2000 clean steps
    tr.save()
    scaler.update(new_scale=1024.0)  # the checkpoint holds the scale before this
    resumed = make(tmp_path, "fp16-mixed", ["trainer.lr=1e-3", "trainer.steps=2"])
    resumed.resume()
    assert resumed.precision.scaler is not None
    assert resumed.precision.scaler.get_scale() == start


def test_fp16_overflow_skips_the_step_and_backs_off(tmp_path):
    tr = make(tmp_path, "fp16-mixed", SGD)
    scaler = tr.precision.scaler
    assert scaler is not None
    start = scaler.get_scale()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for p in tr.model.parameters():
        p.grad = torch.full_like(p, float("inf"))  # what an overflowed scaled backward leaves
    stats = StepStats()
    tr._optimizer_step(True, stats)
    assert stats.counts["skipped_updates"] == 1
    assert scaler.get_scale() == start * 0.5
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())


def test_resume_refuses_bf16_mixed_to_fp16_mixed(tmp_path):
    make(tmp_path, "bf16-mixed").train()
    other = make(tmp_path, "fp16-mixed", ["trainer.steps=2"])
    with pytest.raises(ConfigError, match="never switch between bf16 and fp16"):
        other.resume()
    fine = make(tmp_path, "bf16-true", ["trainer.steps=2"])  # same family: allowed
    fine.resume()
    assert fine.step == 1


# -- metrics ---------------------------------------------------------------------------------
def test_memory_metrics_only_where_an_allocator_reports():
    assert memory_metrics(torch.device("cpu")) == {}


@pytest.mark.gpu
def test_memory_metrics_on_cuda():
    dev = torch.device("cuda")
    x = torch.empty(256, 1024, 1024, device=dev)  # 1 GiB
    m = memory_metrics(dev)
    assert m["memory/allocated_gb"] >= 1.0 and m["memory/peak_gb"] >= 1.0
    del x
    assert memory_metrics(dev)["memory/peak_gb"] >= 1.0  # the peak since the last call
    assert memory_metrics(dev)["memory/peak_gb"] < 1.0


def test_a_rollout_engine_follows_the_compute_dtype():
    """rollout.dtype = auto under bf16-mixed: a bf16 engine, the trainer's forwards' dtype, so
    no sampler correction is forced; under fp32 a bf16 engine turns it on."""
    from grpo_ar.generation.backends import with_rollout_defaults

    mixed = load_config(None, ["model.precision=bf16-mixed", "rollout.backend=vllm"])
    assert mixed.rollout.engine_dtype(mixed.model.compute_dtype) == "bfloat16"
    assert with_rollout_defaults(mixed).algorithm.is_correction is None
    fp32 = load_config(None, ["rollout.backend=vllm", "rollout.dtype=bfloat16"])
    assert with_rollout_defaults(fp32).algorithm.is_correction == "token_truncate"


def test_decode_step_weights_follow_updates_and_the_autocast_dtype():
    """FastStep's concatenated q/k/v (transposed on the CPU) are taken from the current
    weights at each sample call; under autocast in its dtype."""
    from grpo_ar.generation.decode_step import FastStep

    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.add_(0.5)
    c = FastStep(model, 8)
    want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t()
    assert torch.equal(c.layers[0][1][0], want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = FastStep(model, 8)
    assert d.layers[0][1][0].dtype == torch.bfloat16
    assert torch.equal(d.layers[0][1][0], want.to(torch.bfloat16))


def test_mfu_counts_6n_flops_per_trained_token():
    from grpo_ar.train.step import bf16_peak, mfu

    # 1e6 params x 1e3 tokens x 6 = 6e9 FLOP in 1 s against a 1.2e10 peak: half of it
    assert mfu(10**6, 1e3, 1.0, 1.2e10) == {"perf/mfu": 0.5}
    assert mfu(10**6, 1e3, 1.0, None) == {}
    assert bf16_peak(torch.device("cpu")) is None  # no MFU figure pretends a GPU ran


@pytest.mark.gpu
def test_bf16_mixed_step_on_cuda(tmp_path):
    """On a GPU: a bf16-mixed step (sampler reads finished rows every 8 tokens, no per-micro-
    batch sync) trains fp32 master weights and reports memory (and MFU on a listed GPU)."""
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=16",
            "trainer.batch_size=4",
            "trainer.grad_accum=2",
            "algorithm.group_size=4",
            "algorithm.beta=0.04",
            "model.precision=bf16-mixed",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
        ],
    )
    model = tiny_llama(vocab_size=len(tok)).to("cuda")
    entries = load_rows([{"prompt": f"{i}*{i}=", "rewards": "toy_fives"} for i in range(8)])
    tr = Trainer(cfg, model, TextAdapter(tok, cfg.sampling), entries)
    assert tr.sync_free
    m = tr.train_step()
    assert m.get("skipped_updates", 0) == 0 and tr.updates == 1
    assert all(p.dtype == torch.float32 and p.is_cuda for p in tr.model.parameters())
    assert m["memory/peak_gb"] > 0 and m["time/update"] > 0
    if tr.peak is not None:
        assert 0 < m["perf/mfu"] < 1


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_from_pretrained(tmp_path, attn):
    from transformers import AutoModelForCausalLM

    from grpo_ar.adapters.text import load_causal_lm

    tiny_llama().save_pretrained(tmp_path)
    model = load_causal_lm(AutoModelForCausalLM, str(tmp_path), torch.float32, "cpu", attn)
    assert model.config._attn_implementation == attn
    assert ModelConfig(attn_implementation=attn).attn_implementation == attn


def test_fsdp2_refuses_fp16_mixed():
    from grpo_ar.parallel.fsdp import FSDP2Parallel

    par = FSDP2Parallel.__new__(FSDP2Parallel)  # check() reads only the config and the size
    par.size = 2
    cfg = load_config(None, ["model.precision=fp16-mixed", "trainer.strategy=fsdp2"])
    with pytest.raises(ConfigError, match="use bf16-mixed"):
        par.check(cfg)
