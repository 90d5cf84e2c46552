"""The RolloutBackend seam: the built-in backend is today's sampler bitwise, the [rollout]
config is validated before anything loads, and the vLLM backend refuses what it cannot sample
at start-up (these parts need no vLLM; tests/vllm_engine/ runs the engine itself)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import ConfigError, load_config
from grpo_ar.generation.backends import (
    BuiltinBackend,
    RolloutBackend,
    record_sampler_gap,
    with_rollout_defaults,
)
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.vllm_backend import check_sampling
from grpo_ar.generation.vllm_engine import EngineSpec, request_params
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.step import StepStats
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

if "toy_nines" not in REWARDS:

    @register_reward("toy_nines")
    @per_sample
    def toy_nines(output: str) -> float:
        return output.count("9") / 8


def _rollouts_equal(a, b):
    for name in ("completion_ids", "completion_mask", "sampling_logp", "truncated", "prompt_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("greedy", [False, True])
def test_builtin_backend_is_the_sampler_bitwise(greedy):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9)
    adapter = TextAdapter(tok, params)
    prompts = adapter.encode(load_rows([{"prompt": p, "rewards": "x"} for p in ("1+1=", "23*4=")]))
    backend = BuiltinBackend(adapter)
    assert isinstance(backend, RolloutBackend)
    got = backend.generate(model, prompts, 4, torch.Generator().manual_seed(3), greedy=greedy)
    want = sample(model, prompts, 4, adapter.sampling, torch.Generator().manual_seed(3), greedy)
    _rollouts_equal(got, want)


def _trainer(tmp_path, *overrides):
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=6",
            "trainer.steps=2",
            "trainer.batch_size=2",
            "trainer.lr=3e-3",
            "algorithm.group_size=4",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    entries = load_rows([{"prompt": f"{i}+{i}=", "rewards": "toy_nines"} for i in range(4)])
    return Trainer(cfg, tiny_llama(vocab_size=len(tok)), TextAdapter(tok, cfg.sampling), entries)


def test_trainer_samples_through_the_builtin_backend_as_before(tmp_path):
    """The trainer's step-2 rollout equals adapter.sample on the same prompts and noise."""
    from grpo_ar.parallel.ddp import derive_seed

    tr = _trainer(tmp_path / "a")
    assert tr.backend.name == "builtin"
    tr.train_step()
    entries = tr.prompts.next_batch()
    tr.prompts = type("Fixed", (), {"next_batch": lambda self: entries})()
    model_before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train_step()
    ref = tiny_llama(vocab_size=len(tr.adapter.tokenizer))
    ref.load_state_dict(model_before)
    gen = torch.Generator().manual_seed(derive_seed(0, 1, 0))
    want = tr.adapter.sample(ref, tr.adapter.encode(entries), 4, generator=gen)
    _rollouts_equal(tr.last_rollout, want)


def test_rollout_config_is_validated_before_anything_loads():
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm_mode=server"])
    assert (cfg.rollout.backend, cfg.rollout.port) == ("vllm", 8765)
    for bad, words in [
        ("rollout.backend=sglang", "rollout.backend='sglang'"),
        ("rollout.vllm_mode=remote", "colocate or server"),
        ("rollout.port=0", "rollout.port=0"),
        ("rollout.timeout_s=0", "rollout.timeout_s"),
        ("rollout.dtype=int8", "rollout.dtype='int8'"),
        ("rollout.max_num_seqs=0", "max_num_seqs"),
        ("rollout.compile=fast", "rollout.compile must be bool, got 'fast'"),
        ("rollout.async_steps=2", "use 0 .on-policy. or 1"),
        ("rollout.async_steps=1", 'needs rollout.backend = "vllm"'),
        ("rollout.enginez=1", "unknown key rollout.enginez"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("*", r"\*")):
            load_config(None, [bad])


@pytest.mark.parametrize(
    "params, option",
    [
        (SamplingParams(cfg_scale=3.0), "cfg_scale"),
        (SamplingParams(max_new_tokens=4, position_ranges=((0, 5, 9),)), "position_ranges"),
        (SamplingParams(min_p=0.1, top_k=5), "min_p"),
    ],
)
def test_vllm_backend_refuses_what_it_cannot_sample(params, option):
    with pytest.raises(ConfigError, match=option) as err:
        check_sampling(params)
    assert 'rollout.backend = "builtin"' in str(err.value)


def test_engine_compile_setting_maps_to_enforce_eager():
    # auto: CUDA graphs / compile on a GPU, eager on the CPU (55 s start-up for 8-10 %)
    eager = {(c, cuda): EngineSpec("m", compile=c).enforce_eager(cuda)
             for c in (None, True, False) for cuda in (False, True)}  # fmt: skip
    assert eager == {
        (None, False): True, (None, True): False,
        (True, False): False, (True, True): False,
        (False, False): True, (False, True): True,
    }  # fmt: skip
    sets = (["rollout.compile=true"], ["rollout.compile=false"], None)
    values = [load_config(None, s).rollout.compile for s in sets]
    assert values == [True, False, None]


def test_vllm_request_keeps_the_builtin_distribution():
    p = SamplingParams(
        max_new_tokens=7,
        min_new_tokens=2,
        temperature=0.7,
        top_k=0,
        top_p=0.9,
        allowed_ranges=((10, 13),),
        eos_token_ids=(2,),
    )
    kw = request_params(p)
    assert kw["allowed_token_ids"] == [2, 10, 11, 12]  # EOS stays samplable, as allowed_mask
    assert (kw["top_k"], kw["top_p"], kw["temperature"]) == (-1, 0.9, 0.7)
    assert (kw["max_tokens"], kw["min_tokens"], kw["stop_token_ids"]) == (7, 2, [2])
    assert kw["ignore_eos"]  # the model's own EOS does not end a completion; eos_token_ids do
    assert request_params(p, greedy=True)["temperature"] == 0.0


def test_bf16_engine_turns_the_is_correction_on_by_default():
    bf16 = load_config(None, ["rollout.backend=vllm", "rollout.dtype=bfloat16"])
    on = with_rollout_defaults(bf16).algorithm
    assert (on.is_correction, on.is_correction_args) == ("token_truncate", {"c_max": 3.0})
    chosen = load_config(
        None,
        [
            "rollout.backend=vllm",
            "rollout.dtype=bfloat16",
            "algorithm.is_correction=sequence_mask",
            "algorithm.is_correction_args={c_max: 2.0}",
        ],
    )
    assert with_rollout_defaults(chosen) is chosen  # the user's choice stands
    stale = load_config(None, ["rollout.backend=vllm", "rollout.async_steps=1"])
    assert with_rollout_defaults(stale).algorithm.is_correction == "token_truncate"
    for same in (["rollout.backend=vllm"], ["rollout.dtype=bfloat16"]):  # fp32 engine; builtin
        cfg = load_config(None, same)
        assert with_rollout_defaults(cfg).algorithm.is_correction is None


def test_sampler_gap_metrics_hand_computed():
    stats = StepStats()
    train = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # garbage under mask 0 ignored
    record_sampler_gap(stats, train, sampler, mask)
    record_sampler_gap(stats, torch.tensor([[-3.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    out = stats.summary()
    # diffs over the 4 real tokens: 0.5, -1.0, 0.0 | -2.0
    assert out["sampling/logp_diff/mean"] == pytest.approx(3.5 / 4, abs=1e-6)
    assert out["sampling/logp_diff/max"] == pytest.approx(2.0, abs=1e-6)
    ratios = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(-2.0)]
    assert out["sampling/is_ratio/mean"] == pytest.approx(sum(ratios) / 4, abs=1e-6)
    assert out["sampling/is_ratio/min"] == pytest.approx(math.exp(-2.0), abs=1e-6)
    assert out["sampling/is_ratio/max"] == pytest.approx(math.exp(0.5), abs=1e-6)


@pytest.mark.parametrize("method", ["full", "peft"])
def test_engine_start_folder_is_a_plain_merged_model(tmp_path, method):
    """Without model.path the engine starts from the trainer's model written once under the
    run dir: a plain transformers folder (an adapter merged in), whose outputs are the policy's."""
    from safetensors.torch import load_file

    from grpo_ar.finetune import build_finetune
    from grpo_ar.finetune.base import FinetuneConfig
    from grpo_ar.generation.vllm_backend import engine_model_dir, policy_weights

    tok = char_tokenizer()
    ft = build_finetune(tiny_llama(len(tok)), FinetuneConfig(method=method), False, seed=0)
    with torch.no_grad():
        for p in (ft.trainable() if method == "peft" else {}).values():
            p.add_(torch.randn_like(p))
    cfg = load_config(None, [f"log.run_dir={tmp_path}", "rollout.backend=vllm"])
    out = engine_model_dir(cfg.rollout, cfg, ft.model, ft)
    saved = load_file(f"{out}/model.safetensors")
    assert not [k for k in saved if "lora" in k or "base_layer" in k]
    pushed = dict(policy_weights(ft.model, ft))
    for k, v in saved.items():
        assert torch.allclose(pushed[k], v, atol=1e-6, rtol=0), k
