"""Issue 23, the RNG example (examples/rng/run.py): its evaluation is independent of training.
GRPO never draws a held-out prompt, training never draws from an evaluation seed (every
generator seed and every encoded prompt is recorded while the example runs at tiny sizes, real
Trainer), another evaluation seed samples other digits under the same protocol and leaves
training unchanged, and results.json holds the mean ± spread of the cells."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from example_modules import SeedRecorder, example_module, grid_cells, training_rows

from grpo_ar.adapters.text import TextAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ar_common.seeds import training_streams  # noqa: E402

EVAL_SEEDS = (777, 778)
N_HELD = 10


def tiny_argv(tmp: Path, run: str, *extra: str) -> list[str]:
    sets = [
        "trainer.steps=2",
        "trainer.batch_size=2",
        "log.progress=false",
        f"log.run_dir={tmp / run}",
    ]
    argv = ["--base", str(tmp / "base"), "--pretrain-steps", "5", "--eval-n", str(N_HELD)]
    return argv + [x for kv in sets for x in ("--set", kv)] + list(extra)


class Recorder(SeedRecorder):
    """Seeds (torch.manual_seed and torch.Generator.manual_seed), encoded prompts and sampled
    digits by phase: "eval" inside run.measure, "grpo" inside Trainer.train, "other" elsewhere."""

    def __init__(self, mp: pytest.MonkeyPatch, run, task) -> None:
        super().__init__(mp, TextAdapter)
        self.digits: list[tuple[int, list[list[str]]]] = []  # (eval seed, digits per prompt)
        sample = task.sample_digits

        def recording_sample(model, tok, prompts, samples, seed):
            self.prompts[self.phase] += list(prompts)
            out = sample(model, tok, prompts, samples, seed=seed)
            self.digits.append((seed, out))
            return out

        mp.setattr(run, "sample_digits", recording_sample)
        mp.setattr(run, "measure", self.phased("eval", run.measure))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """2 training seeds x 2 evaluation seeds, recorded; and run.py as a module."""
    tmp = tmp_path_factory.mktemp("rng_protocol")
    with example_module("rng", "run") as run, pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp, run, sys.modules["rng.task"])
        argv = tiny_argv(tmp, "grid", "--seeds", "0", "1", "--eval-seeds", *map(str, EVAL_SEEDS))
        yield run.main(argv), rec, run, tmp


def test_grpo_never_draws_a_heldout_prompt(recorded):
    out, rec, _, _ = recorded
    held = set(out["protocol"]["heldout_prompts"])
    assert len(held) == N_HELD
    drawn = set(rec.prompts["grpo"])
    assert len(drawn) >= 2 and not drawn & held
    assert set(rec.prompts["eval"]) == held


def test_training_never_draws_from_an_evaluation_seed(recorded):
    _, rec, run, tmp = recorded
    assert rec.seeds["eval"] == set(EVAL_SEEDS)  # sample_digits seeds the global generator
    assert not (rec.seeds["grpo"] | rec.seeds["other"]) & set(EVAL_SEEDS)
    assert rec.seeds["grpo"] and rec.seeds["grpo"] <= training_streams(0, 2) | training_streams(
        1, 2
    )
    # training seed 1's sampling stream of step 1 is refused before anything runs
    with pytest.raises(SystemExit, match=r"evaluation seed\(s\) \[1000004\] are random streams"):
        run.main(tiny_argv(tmp, "clash", "--seeds", "1", "--eval-seeds", "777", "1000004"))
    assert not (tmp / "clash").exists()


def test_another_eval_seed_samples_other_digits_under_the_same_protocol(recorded):
    out, rec, run, tmp = recorded
    # measure(): before at 777, 778, then after each training seed at 777, 778
    assert [s for s, _ in rec.digits] == [777, 778] * 3
    (_, d777), (_, d778) = rec.digits[:2]
    assert [len(g) for g in d777] == [len(g) for g in d778] == [10] * N_HELD
    assert d777 != d778
    n = len(rec.prompts["eval"]) // 6
    assert all(
        rec.prompts["eval"][k * n : (k + 1) * n] == rec.prompts["eval"][:n] for k in range(6)
    )
    # another set of evaluation seeds: eval seed 778 measures the same, training is the same
    other = run.main(tiny_argv(tmp, "other", "--seeds", "0", "--eval-seeds", "778", "779"))
    assert other["cells"][0] == next(c for c in out["cells"] if (c["train_seed"], c["eval_seed"]) == (0, 778))  # fmt: skip
    assert other["cells"][1]["before"] != other["cells"][0]["before"]
    rows = [training_rows((tmp / r / "seed0" / "metrics.jsonl").read_text().splitlines())
            for r in ("grid", "other")]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_results_json_holds_the_mean_and_spread_of_the_cells(recorded):
    _, _, _, tmp = recorded
    saved = json.loads((tmp / "grid" / "results.json").read_text())
    cells = grid_cells(saved, [0, 1], [777, 778])
    assert {"entropy", "chi2", "per_prompt_distinct"} <= set(saved["summary"])
    s = saved["summary"]["entropy"]
    after = [c["after"]["entropy"] for c in cells]
    change = [c["after"]["entropy"] - c["before"]["entropy"] for c in cells]
    assert s["after"]["mean"] == pytest.approx(statistics.fmean(after), abs=1e-12)
    assert s["change"]["std"] == pytest.approx(statistics.stdev(change), abs=1e-12)
    per_t = [statistics.fmean(after[:2]), statistics.fmean(after[2:])]
    assert s["after_over_train_seeds"]["std"] == pytest.approx(
        abs(per_t[0] - per_t[1]) / 2**0.5, abs=1e-12
    )
    eval_sd = statistics.fmean([statistics.stdev(after[:2]), statistics.stdev(after[2:])])
    assert s["eval_seed_sd"]["after"] == pytest.approx(eval_sd, abs=1e-12)
    before = [cells[0]["before"]["entropy"], cells[1]["before"]["entropy"]]
    assert s["before_over_eval_seeds"]["std"] == pytest.approx(statistics.stdev(before), abs=1e-12)
