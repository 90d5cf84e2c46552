"""The PickScore gain vs prompt fidelity trade-off of several run.py runs, as a markdown table.

    python examples/janus_t2i/tradeoff.py runs/a/results.json runs/b/results.json ...

One row per run (fidelity weight, how the rewards are combined, β, seeds): the held-out PickScore
before → after with the relative gain of the mean and of the worst cell, the judge's fidelity
changes (colour and shape; colour; shape) as the mean over the cells with the worst evaluation
seed's mean in brackets, and the KL to the start model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = (
    "| fidelity weight | combined | β | train × eval seeds × images | pickscore (gain; worst cell) | "
    "both: change (worst eval seed) | colour | shape | KL / image |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def row(result: dict[str, Any]) -> str:
    """One table row of a run.py results.json."""
    s, st = result["summary"], result["settings"]
    weight = {r["name"]: r.get("weight", 1.0) for r in result["rewards"]}
    score = s[f"score/{result['reward']}"]
    combined = "—" if len(weight) == 1 else st["multi_objective"].replace("_", " ")

    def change(key: str) -> str:
        m = s[key]
        return f"{m['change']['mean']:+.3f} ({min(m['change_by_eval_seed'].values()):+.3f})"

    return (
        f"| {weight.get('prompt_fidelity', 0.0):g} | {combined} | {st['beta']:g} | "
        f"{len(result['seeds'])} × {len(result['eval_seeds'])} × {result['eval_samples']} | "
        f"{score['before']['mean']:.2f} → {score['after']['mean']:.2f} "
        f"({result['relative_gain']['mean']:+.1%}; {min(result['relative_gain_by_cell']):+.1%}) | "
        f"{change('fidelity/both')} | {change('fidelity/colour')} | {change('fidelity/shape')} | "
        f"{s['kl_to_start/per_image']['after']['mean']:.1f} |"
    )


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files written by run.py")
    args = ap.parse_args(argv)
    out = "\n".join([HEADER, *(row(json.loads(Path(p).read_text())) for p in args.results)])
    print(out)
    return out


if __name__ == "__main__":
    main()
