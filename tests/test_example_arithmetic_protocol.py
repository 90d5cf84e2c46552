"""Issue 23, the arithmetic demo (examples/text_arithmetic/run.py): its evaluation is independent
of training. GRPO never draws a held-out problem, training never draws from an evaluation seed
(every generator seed and every encoded prompt is recorded while the example runs at tiny
sizes, real Trainer), another evaluation seed samples other answers under the same protocol
and leaves training unchanged, and results.json holds the mean ± spread of the cells."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from example_modules import SeedRecorder, example_module, grid_cells, training_rows

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.train.evaluation import eval_generator_seeds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ar_common.seeds import training_streams  # noqa: E402

EVAL_SEEDS = (777, 778)
N_HELD = 8


def tiny_sets(tmp: Path, run: str) -> list[str]:
    return ["trainer.steps=2", "trainer.iterations=1", "trainer.batch_size=2",
            "log.progress=false", f"log.run_dir={tmp / run}"]  # fmt: skip


def tiny_argv(tmp: Path, run: str, *extra: str) -> list[str]:
    sets = tiny_sets(tmp, run)
    argv = ["--base", str(tmp / "base"), "--pretrain-steps", "3", "--eval-n", str(N_HELD),
            "--eval-samples", "2"]  # fmt: skip
    return argv + [x for kv in sets for x in ("--set", kv)] + list(extra)


class Recorder(SeedRecorder):
    """Generator seeds, encoded prompts and sampled answers by phase: "eval" inside
    run.measure, "grpo" inside Trainer.train, "other" elsewhere (pre-training, set-up)."""

    def __init__(self, mp: pytest.MonkeyPatch, run) -> None:
        super().__init__(mp, TextAdapter)
        self.answers: list[tuple[bool, torch.Tensor]] = []  # (greedy, completion ids) of evals
        sample = TextAdapter.sample

        def recording_sample(adapter, *a, greedy=False, **k):
            ro = sample(adapter, *a, greedy=greedy, **k)
            if self.phase == "eval":
                self.answers.append((greedy, ro.completion_ids.clone()))
            return ro

        mp.setattr(TextAdapter, "sample", recording_sample)
        mp.setattr(run, "measure", self.phased("eval", run.measure))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """2 training seeds x 2 evaluation seeds, recorded; and run.py as a module."""
    tmp = tmp_path_factory.mktemp("arith_protocol")
    with example_module("text_arithmetic", "run") as run, pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp, run)
        out = run.main(
            tiny_argv(tmp, "grid", "--seeds", "0", "1", "--eval-seeds", *map(str, EVAL_SEEDS))
        )
        yield out, rec, run, tmp


def test_grpo_never_draws_a_heldout_problem(recorded):
    out, rec, _, _ = recorded
    held = set(out["protocol"]["heldout_problems"])
    assert len(held) == N_HELD
    drawn = set(rec.prompts["grpo"])
    assert len(drawn) >= 4 and not drawn & held  # 2 runs x 2 steps x 2 problems
    assert set(rec.prompts["eval"]) == held


def test_training_never_draws_from_an_evaluation_seed(recorded):
    out, rec, run, tmp = recorded
    draws = {d for e in EVAL_SEEDS for d in eval_generator_seeds(e, N_HELD, run.EVAL_BATCH)}
    assert out["protocol"]["eval_draws"] == {str(e): [e + 7919] for e in EVAL_SEEDS}
    assert rec.seeds["eval"] == draws
    assert not (rec.seeds["grpo"] | rec.seeds["other"]) & (draws | set(EVAL_SEEDS))
    # the streams the check assumes are the ones the Trainer really seeded
    assert rec.seeds["grpo"] and rec.seeds["grpo"] <= training_streams(0, 2) | training_streams(
        1, 2
    )
    # an eval seed whose batch draws from training seed 0's sampling stream at step 1 is
    # refused before pre-training or training
    with pytest.raises(SystemExit, match=r"draws from generator seeds \[\[1000003\]\]"):
        run.main(tiny_argv(tmp, "clash", "--seeds", "0", "--eval-seeds", str(1_000_003 - 7919)))
    assert not (tmp / "clash").exists()


def test_another_eval_seed_samples_other_answers_under_the_same_protocol(recorded):
    out, rec, run, tmp = recorded
    # one measure(): greedy once, then sampled at 777 and 778; 3 calls (before, after 0, after 1)
    assert [g for g, _ in rec.answers] == [True, False, False] * 3
    greedy, s777, s778 = (x for _, x in rec.answers[:3])
    assert greedy.shape[0] == N_HELD and s777.shape == s778.shape and s777.shape[0] == 2 * N_HELD
    assert not torch.equal(s777, s778)
    n = len(rec.prompts["eval"]) // 3
    calls = [rec.prompts["eval"][k * n : (k + 1) * n] for k in range(3)]
    assert all(c == calls[0] for c in calls)  # the same problems, in order, every time
    # greedy draws nothing: other generator seeds give the same answers, sampled ones differ
    start, tok = run.pretrain(tmp / "base", steps=3, verbose=False)
    trainer = run.grpo_run(tiny_sets(tmp, "greedy"), 0, start, tok, tmp / "greedy")
    held = run.rows_to_entries([{"prompt": p, "answer": "0"} for p in out["protocol"]["heldout_problems"]])  # fmt: skip
    prompts = trainer.adapter.encode(held)
    answers = {
        (greedy, seed): trainer.adapter.sample(trainer.model, prompts, 2, greedy=greedy,
                                               generator=torch.Generator().manual_seed(seed)).completion_ids
        for greedy in (True, False) for seed in (5, 6)
    }  # fmt: skip
    assert torch.equal(answers[True, 5], answers[True, 6])
    assert not torch.equal(answers[False, 5], answers[False, 6])
    # an evaluation with other seeds measures eval seed 778 the same and trains the same
    other = run.main(tiny_argv(tmp, "other", "--seeds", "0", "--eval-seeds", "778"))
    assert other["cells"][0] == next(c for c in out["cells"] if c["eval_seed"] == 778 and c["train_seed"] == 0)  # fmt: skip
    rows = [training_rows((tmp / r / "seed0" / "metrics.jsonl").read_text().splitlines())
            for r in ("grid", "other")]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_results_json_holds_the_mean_and_spread_of_the_cells(recorded):
    out, _, _, tmp = recorded
    saved = json.loads((tmp / "grid" / "results.json").read_text())
    cells = grid_cells(saved, [0, 1], [777, 778])
    for key in ("greedy", "sampled"):
        s = saved["summary"][key]
        after = [c["after"][key] for c in cells]
        assert s["after"]["mean"] == pytest.approx(statistics.fmean(after), abs=1e-12)
        assert s["after"]["std"] == pytest.approx(statistics.stdev(after), abs=1e-12)
        per_t = [statistics.fmean(after[:2]), statistics.fmean(after[2:])]
        assert s["after_over_train_seeds"]["mean"] == pytest.approx(
            statistics.fmean(per_t), abs=1e-12
        )
        assert s["after_over_train_seeds"]["std"] == pytest.approx(
            abs(per_t[0] - per_t[1]) / 2**0.5, abs=1e-12
        )
        assert set(s["change_by_eval_seed"]) == {"777", "778"} and set(
            s["change_by_train_seed"]
        ) == {"0", "1"}
    # greedy is one number per model, whatever the evaluation seed
    assert saved["summary"]["greedy"]["eval_seed_sd"]["after"] == 0.0
    assert saved["summary"]["greedy"]["before_over_eval_seeds"]["std"] == 0.0
