"""Issue 23, the AR video example (examples/video_motion/run.py): its evaluation is independent
of training. GRPO never draws a held-out prompt, training never draws from an evaluation seed
(every generator seed and every encoded prompt is recorded while the example runs at tiny
sizes), another evaluation seed samples other clips under the same protocol, and the judge is
not the reward's estimator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from example_modules import SeedRecorder

from grpo_ar.adapters.video import VideoAdapter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ar_common.seeds import training_streams  # noqa: E402
from test_example_video_motion import tiny_argv  # noqa: E402
from video_motion import clips, judge, run  # noqa: E402

EVAL_SEEDS = (777, 778)


class Recorder(SeedRecorder):
    """What the example draws and encodes, by phase: "eval" inside run.evaluate, "grpo" inside
    Trainer.train, "other" elsewhere (pre-training, set-up); and each evaluation's clips."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        super().__init__(mp, VideoAdapter)
        self.clips: list[tuple[int, torch.Tensor]] = []
        evaluate = run.evaluate

        def recording_evaluate(*a, **k):
            out, x = evaluate(*a, **k)
            self.clips.append((a[-1], x))
            return out, x

        mp.setattr(run, "evaluate", self.phased("eval", recording_evaluate))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The example at tiny sizes, 2 training seeds x 2 evaluation seeds, recorded."""
    tmp = tmp_path_factory.mktemp("video_protocol")
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        argv = tiny_argv(tmp, "--seeds", "0", "1", "--eval-seeds", *map(str, EVAL_SEEDS))
        out = run.main(argv)
    return out, rec


def test_grpo_never_draws_a_heldout_prompt(recorded):
    out, rec = recorded
    train, held = clips.prompt_split()
    assert out["protocol"]["heldout_prompts"] == held and not set(held) & set(train)
    drawn = set(rec.prompts["grpo"])
    assert drawn and drawn <= set(train)  # 2 runs x 2 steps x 2 prompts
    assert set(rec.prompts["eval"]) == set(held) | set(train)  # held-out, and GRPO's own


def test_training_never_draws_from_an_evaluation_seed(recorded):
    out, rec = recorded
    assert rec.seeds["eval"] == set(EVAL_SEEDS)
    assert not (rec.seeds["grpo"] | rec.seeds["other"]) & set(EVAL_SEEDS)
    # the check run.py makes before training knows every seed GRPO drew from
    assert rec.seeds["grpo"] <= training_streams(0, 2) | training_streams(1, 2)
    with pytest.raises(SystemExit, match=r"evaluation seed\(s\) \[1\] are random streams"):
        run.main(["--seeds", "1", "--eval-seeds", "1"])


def test_another_eval_seed_samples_other_clips_under_the_same_protocol(recorded):
    out, rec = recorded
    # evaluate() calls: before at 777, 778; after seed 0 at 777, 778; after seed 1 at 777, 778
    assert [s for s, _ in rec.clips] == [777, 778] * 3
    before = {s: x for s, x in rec.clips[:2]}
    assert before[777].shape == before[778].shape == (8 * 2, 8, 3, 16, 16)
    assert not torch.equal(before[777], before[778])
    per_call = len(rec.prompts["eval"]) // 6  # the same prompts, in order, at every call
    calls = [rec.prompts["eval"][i * per_call : (i + 1) * per_call] for i in range(6)]
    assert all(c == calls[0] for c in calls)
    assert set(out["before"]) == set(EVAL_SEEDS) and set(out["after"]) == {0, 1}
    keys = set(out["before"][777])
    assert all(set(m) == keys for t in out["after"].values() for m in t.values())


def test_the_grid_summary_is_the_mean_and_spread_of_the_cells(recorded):
    out, _ = recorded
    a, b = out["after"], out["before"]
    k = "judge/motion"
    per_seed = [(a[t][777][k] + a[t][778][k]) / 2 for t in (0, 1)]
    row = out["summary"][k]
    over_t = row["after_over_train_seeds"]
    assert over_t["mean"] == pytest.approx(sum(per_seed) / 2, abs=1e-12)
    assert over_t["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5, abs=1e-12)
    gains = [a[t][e][k] - b[e][k] for t in (0, 1) for e in EVAL_SEEDS]
    assert (row["change"]["min"], row["change"]["max"]) == pytest.approx((min(gains), max(gains)))


def test_the_judge_names_directions_by_learning_not_by_the_estimator():
    """Trained for a few hundred steps on raw clips (no VQ here, for speed), the judge names
    the direction of fresh clips and calls still and shuffled clips "none"."""
    torch.set_num_threads(1)
    data = clips.make_clips(512, seed=0)
    net, _ = judge.train_judge(data["clips"], data["direction"], steps=150, batch_size=32,
                               lr=3e-3, seed=0, width=8, verbose=False)  # fmt: skip
    fresh = clips.make_clips(128, seed=1)
    acc = judge.judge_accuracy(net, fresh["clips"], fresh["direction"], seed=1)
    assert acc["moving"] >= 0.9 and acc["none"] >= 0.9, acc
