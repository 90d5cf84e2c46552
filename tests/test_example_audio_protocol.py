"""Issue 23, the audio-tone example (examples/audio_tones/run.py): its evaluation is independent
of training. GRPO never draws a held-out pitch, training never draws from an evaluation seed
(every generator seed and every encoded prompt is recorded while the example runs at tiny
sizes), and another evaluation seed samples other tones under the same protocol."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from example_modules import SeedRecorder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES / "audio_tones"))

import run  # noqa: E402
import tones  # noqa: E402
from ar_common.seeds import training_streams  # noqa: E402  (run.py put examples/ on the path)

EVAL_SEEDS = (777, 778)


class Recorder(SeedRecorder):
    """Generator seeds, encoded prompts and sampled tones by phase: "eval" inside run.evaluate,
    "grpo" inside Trainer.train, "other" elsewhere (warm-up, set-up)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        super().__init__(mp, tones.ToneAdapter)
        self.tones: list[tuple[str, torch.Tensor]] = []
        sample = tones.ToneAdapter.sample

        def recording_sample(adapter, *a, **k):
            ro = sample(adapter, *a, **k)
            self.tones.append((self.phase, ro.completion_ids.clone()))
            return ro

        mp.setattr(tones.ToneAdapter, "sample", recording_sample)
        mp.setattr(run, "evaluate", self.phased("eval", run.evaluate))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The example at tiny sizes: 2 training seeds x 2 evaluation seeds, 2 GRPO steps."""
    tmp = tmp_path_factory.mktemp("audio_protocol")
    argv = ["--warmup-steps", "3", "--grpo-steps", "2", "--run-dir", str(tmp), "--eval-samples",
            "2", "--seeds", "0", "1", "--eval-seeds", *map(str, EVAL_SEEDS)]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        out = run.main(argv)
    return out, rec


def test_grpo_never_draws_a_heldout_pitch(recorded):
    out, rec = recorded
    held, train = set(run.HELDOUT_PITCHES), set(run.TRAIN_PITCHES)
    assert not held & train and held | train == set(range(len(tones.PITCHES)))
    assert out["protocol"]["heldout_pitches"] == sorted(held)
    drawn = set(rec.prompts["grpo"])
    assert drawn and drawn <= train
    assert set(rec.prompts["eval"]) == held | train  # held-out, and GRPO's own pitches


def test_training_never_draws_from_an_evaluation_seed(recorded):
    _, rec = recorded
    # each evaluation draws from eval seed + 7919 + batch offset (evaluate_rewards) and the
    # diagnosis from the eval seed itself
    want = {d for e in EVAL_SEEDS for d in run.eval_draws(e, 64)} | set(EVAL_SEEDS)
    assert rec.seeds["eval"] and rec.seeds["eval"] <= want
    assert not (rec.seeds["grpo"] | rec.seeds["other"]) & want
    assert rec.seeds["grpo"] <= training_streams(0, 2) | training_streams(1, 2)
    # an eval seed whose first batch draws from step 1's sampling stream of training seed 0
    with pytest.raises(SystemExit, match=r"draws from generator seeds \[\[1000003\]\]"):
        run.main(["--seeds", "0", "--eval-seeds", str(1_000_003 - 7919), "--grpo-steps", "2"])


def test_another_eval_seed_samples_other_tones_under_the_same_protocol(recorded):
    out, rec = recorded
    evals = [ids for phase, ids in rec.tones if phase == "eval"]
    # one evaluate(): 16-prompt batches of the 64 held-out and 64 GRPO rows, greedy (1
    # tone each) and sampled (2 each), then the diagnosis (32 prompts x 8); 6 evaluate() calls:
    # eval seeds 777, 778 before, then both after each training seed
    per_call = 2 * (64 // 16 + 64 // 16) + 1
    assert len(evals) == 6 * per_call
    first, second = evals[:per_call], evals[per_call : 2 * per_call]
    assert [x.shape for x in first] == [x.shape for x in second]  # the same protocol
    greedy = [i for i, x in enumerate(first) if x.shape[0] == 16]
    assert len(greedy) == 2 * 64 // 16
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b) == (i in greedy)  # only the sampled tones depend on the seed
    n = len(rec.prompts["eval"]) // 6
    assert n == 2 * (64 + 64) + 32  # greedy and sampled each encode their prompts
    prompts = [rec.prompts["eval"][k * n : (k + 1) * n] for k in range(6)]
    assert all(p == prompts[0] for p in prompts)
    assert set(out["before"]) == set(EVAL_SEEDS) and set(out["after"]) == {0, 1}
