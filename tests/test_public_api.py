"""The public API: every exported name resolves, importing stays light, and a modality the
package has never seen — an adapter defined here, outside the package — trains unchanged."""

import subprocess
import sys

import torch

import grpo_ar
import grpo_ar.adapters
from grpo_ar import (
    PromptBatch,
    SamplingParams,
    Trainer,
    load_config,
    load_rows,
    per_sample,
    register_reward,
)
from grpo_ar.adapters import Adapter
from grpo_ar.rewards import REWARDS
from tiny import tiny_llama

VOCAB, BOS = 12, 11  # tokens 0..9 are digits, 10 unused, 11 BOS


def test_every_public_name_resolves_and_nothing_else_is_exported():
    for mod in (grpo_ar, grpo_ar.adapters):
        assert mod.__all__ == sorted(mod.__all__)
        for name in mod.__all__:
            assert getattr(mod, name) is not None, name
        try:
            mod.not_a_public_name  # noqa: B018
        except AttributeError as e:
            assert "not_a_public_name" in str(e)
        else:
            raise AssertionError("unknown names must raise AttributeError")


def test_importing_the_package_is_light():
    code = "import sys, grpo_ar, grpo_ar.adapters; print(sorted(m for m in ('diffusers', 'PIL', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class DigitsAdapter(Adapter):
    """A made-up modality: prompt = a digit d; output = 6 digits; decoded as a list of ints."""

    def __init__(self) -> None:
        super().__init__(SamplingParams(max_new_tokens=6, allowed_ranges=((0, 10),)))

    def encode(self, entries):
        ids = torch.tensor([[BOS, e.prompt] for e in entries])
        return PromptBatch(ids, torch.ones_like(ids), list(entries))

    def decode(self, rollout):
        return rollout.completion_ids.tolist()


if "count_digit" not in REWARDS:

    @register_reward("count_digit")
    @per_sample
    def count_digit(digits, *, d: int) -> float:
        return digits.count(d) / len(digits)


def test_an_adapter_defined_outside_the_package_trains_unchanged(tmp_path):
    model = tiny_llama(vocab_size=VOCAB)
    adapter = DigitsAdapter()
    rows = [{"prompt": d, "rewards": {"count_digit": {"d": d}}} for d in range(10)]
    cfg = load_config(None, ["trainer.steps=3", "trainer.batch_size=4", "trainer.lr=1e-2",
                             "algorithm.group_size=6", f"log.run_dir={tmp_path}",
                             "log.progress=false"])  # fmt: skip
    tr = Trainer(cfg, model, adapter, load_rows(rows))
    # the invariant: teacher-forced log-probs equal the sampler's
    r = adapter.sample(
        model, adapter.encode(tr.train_entries[:3]), 4, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        adapter.token_logprobs(model, r)[0], r.sampling_logp, atol=1e-5, rtol=0
    )
    assert int(r.completion_ids.max()) <= 9 and not r.truncated.any()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = tr.train()
    assert len(history) == 3 and all(h.get("skipped_updates", 0) == 0 for h in history)
    assert all(0 <= h["reward/mean"] <= 1 for h in history)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "checkpoints" / "latest").exists()
