"""FastStep's decode weights built once per weights version (generation/decode_weights.py):
two samplings of one version build once; after a real optimizer step (fused and plain AdamW)
or a checkpoint load the trainer's next rollout equals a fresh sampler's, bitwise."""

import pytest
import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.finetune import build_finetune
from grpo_ar.finetune.base import FinetuneConfig
from grpo_ar.generation.backends import BuiltinBackend
from grpo_ar.generation.decode_step import fast_step_for
from grpo_ar.generation.decode_weights import DecodeWeights, reusing
from grpo_ar.generation.params import SamplingParams
from grpo_ar.io.data import load_rows
from grpo_ar.parallel.ddp import derive_seed
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.step import StepStats
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

if "dw_chars" not in REWARDS:

    @register_reward("dw_chars")
    @per_sample
    def dw_chars(output: str) -> float:
        return sum(map(ord, output)) % 5 / 4  # varies across a group: nonzero advantages


def _trainer(tmp_path, overrides=()) -> Trainer:
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=6",
            "trainer.steps=4",
            "trainer.batch_size=2",
            "trainer.lr=0.05",
            "algorithm.group_size=4",
            "log.progress=false",
            f"log.run_dir={tmp_path}",
            *overrides,
        ],
    )
    entries = load_rows([{"prompt": f"{i}+{i}=", "rewards": "dw_chars"} for i in range(6)])
    model = tiny_llama(vocab_size=len(tok), seed=0)
    return Trainer(cfg, model, TextAdapter(tok, cfg.sampling), entries)


def _same(a, b) -> bool:
    return torch.equal(a.completion_ids, b.completion_ids) and torch.equal(
        a.sampling_logp, b.sampling_logp
    )


def _fresh(tr: Trainer, entries, step: int):
    """What an uncached sampler draws for the trainer's rollout of `entries` at `step` (its
    generator seeded as the trainer seeds it), outside any `reusing` scope."""
    prompts = tr.adapter.encode(entries)
    gen = torch.Generator().manual_seed(derive_seed(tr.cfg.trainer.seed, step, 0))
    return tr.adapter.sample(tr.model.eval(), prompts, tr.cfg.algorithm.group_size, gen)


def _next_rollout(tr: Trainer):
    """The trainer's own next rollout (its sync of weights_version, then its backend), and
    the fresh sampler's of the same entries and noise."""
    entries = tr.prompts.next_batch()
    got = tr.generate(entries, StepStats())
    return got, _fresh(tr, entries, tr.step)


def _stale_and_fresh(tr: Trainer):
    """The backend's rollout with whatever version it was last told, and a fresh sampler's."""
    entries = tr.prompts.next_batch()
    gen = torch.Generator().manual_seed(derive_seed(tr.cfg.trainer.seed, tr.step, 0))
    prompts = tr.adapter.encode(entries)
    got = tr.backend.generate(tr.model.eval(), prompts, tr.cfg.algorithm.group_size, gen)
    return got, _fresh(tr, entries, tr.step)


def test_two_samplings_of_one_version_build_once():
    tok = char_tokenizer()
    params = SamplingParams(max_new_tokens=5, eos_token_ids=(tok.eos_token_id,))
    adapter = TextAdapter(tok, params)
    model = tiny_llama(vocab_size=len(tok), seed=1).eval()
    prompts = adapter.encode(
        load_rows(
            [{"prompt": "1+2=", "rewards": "dw_chars"}, {"prompt": "33=", "rewards": "dw_chars"}]
        )
    )
    backend = BuiltinBackend(adapter)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    fresh = adapter.sample(model, prompts, 3, gen())
    store = backend.weights
    backend.generate(model, prompts, 3, gen())
    backend.generate(model, prompts, 3, gen())
    assert store.builds == 2  # no version pushed: every call builds its own
    backend.sync(model, 0)
    runs = [backend.generate(model, prompts, 3, gen()) for _ in range(3)]
    assert store.builds == 3 and all(_same(r, fresh) for r in runs)
    backend.sync(model, 0)  # the same version again: still reused
    backend.generate(model, prompts, 3, gen())
    assert store.builds == 3
    backend.sync(model, 1)
    backend.generate(model, prompts, 3, gen())
    assert store.builds == 4
    backend.reset()
    backend.generate(model, prompts, 3, gen())
    backend.generate(model, prompts, 3, gen())
    assert store.builds == 6  # reset: no reuse until the next sync
    model.to(torch.float64)  # replaced tensors under one version rebuild
    backend.sync(model, 2)
    backend.generate(model, prompts, 3, gen())
    model.to(torch.float32)
    backend.generate(model, prompts, 3, gen())
    assert store.builds == 8


def test_outside_a_reusing_scope_nothing_is_kept():
    model = tiny_llama(vocab_size=40, seed=2)
    store = DecodeWeights()
    store.set_version(0)
    a, b = fast_step_for(model, 8), fast_step_for(model, 8)
    assert a is not None and b is not None and store.builds == 0
    assert a.layers[0][1][0] is not b.layers[0][1][0]  # each built its own copies
    with reusing(store):
        c, d = fast_step_for(model, 8), fast_step_for(model, 16)
    assert store.builds == 1 and c is not None and d is not None
    assert c.layers[0][1][0] is d.layers[0][1][0] and d.cos.shape[0] == 16


@pytest.mark.parametrize("fused", [True, False])
def test_after_an_optimizer_step_the_rollout_equals_a_fresh_samplers(tmp_path, fused):
    """The trainer's steps with fused AdamW (which bumps no `_version` counter) and plain
    AdamW: each next rollout equals an uncached sampler's bitwise; a store not told of the
    step serves the old weights (what the explicit version prevents)."""
    tr = _trainer(tmp_path, [f"trainer.optimizer_args={{fused: {str(fused).lower()}}}"])
    store = tr.backend.weights
    for step in range(2):
        got, want = _next_rollout(tr)
        assert _same(got, want) and store.builds == step + 1
        probe = tr.model.model.layers[0].self_attn.q_proj.weight
        before, counter = probe.detach().clone(), probe._version
        tr.update(got, StepStats())
        tr.step += 1
        assert tr.updates == step + 1 and not torch.equal(probe, before)
        if fused:
            assert probe._version == counter  # why a `_version`-keyed cache went stale
    assert not store.built  # released after the step's sampling, before the update
    # power: copies kept at this version, then a step the store is not told of: stale
    got, _ = _next_rollout(tr)
    tr.backend.sync(tr.model, tr.weights_version)
    _stale_and_fresh(tr)
    assert store.built
    tr.update(got, StepStats())
    assert not _same(*_stale_and_fresh(tr))


def test_sampling_rounds_of_one_step_share_one_build(tmp_path):
    """ReMax samples the group and a greedy baseline each step: one build per step."""
    tr = _trainer(tmp_path, ["algorithm.advantage=remax"])
    tr.train_step()
    tr.train_step()
    assert tr.updates == 2 and tr.backend.weights.builds == 2
    assert not tr.backend.weights.built  # nothing kept through the update


def test_resume_rebuilds(tmp_path):
    """A checkpoint loaded in place (same tensors, other values) bumps the version."""
    tr = _trainer(tmp_path)
    tr.train_step()
    tr.save()
    tr.train_step()
    got, want = _next_rollout(tr)  # built from the step-2 weights
    assert _same(got, want)
    version = tr.weights_version
    tr.backend.sync(tr.model, version)
    _stale_and_fresh(tr)  # copies of the step-2 weights kept under `version`
    builds = tr.backend.weights.builds
    tr.resume()
    assert tr.step == 1 and tr.weights_version == version + 1
    tr.backend.sync(tr.model, version)  # power: without the bump the copies would be stale
    assert not _same(*_stale_and_fresh(tr)) and tr.backend.weights.builds == builds
    got, want = _next_rollout(tr)
    assert _same(got, want) and tr.backend.weights.builds == builds + 1


@pytest.mark.parametrize("method", ["peft", "lycoris"])
def test_adapter_finetunes_do_not_take_the_built_weights(method):
    """peft and LyCORIS layers are not plain Linears: FastStep (and so its built copies) is
    never used for them; the HF forward reads the live adapter weights."""
    model = tiny_llama(vocab_size=40, seed=3)
    ft = build_finetune(model, FinetuneConfig(method=method, target_modules=("q_proj",)), False)
    assert fast_step_for(ft.model, 8) is None


def test_evaluation_never_reads_the_backends_weights(tmp_path):
    """Evaluation samples outside the backend: with the backend's store deliberately stale
    it still equals an evaluation of an independent copy of the current weights."""
    import copy

    from grpo_ar.train.evaluation import evaluate_rewards

    tr = _trainer(tmp_path)
    tr.train_step()
    tr.backend.sync(tr.model, tr.weights_version)
    _stale_and_fresh(tr)  # the store holds copies of these weights...
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ...which then change under the same version: the store is stale
        for p in tr.model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.5)
    builds = tr.backend.weights.builds
    entries = tr.train_entries[:4]
    got = tr.evaluate(entries, greedy=False, samples=3)
    twin = copy.deepcopy(tr.model)
    kw = dict(greedy=False, samples=3, batch_size=tr.cfg.data.eval_batch_size, seed=0, step=1)
    want = evaluate_rewards(twin, tr.adapter, tr.rewards, entries, **kw)
    assert got == want and tr.backend.weights.builds == builds
    with reusing(tr.backend.weights):  # power: an evaluation that read the store differs
        stale = evaluate_rewards(tr.model, tr.adapter, tr.rewards, entries, **kw)
    assert stale != want
