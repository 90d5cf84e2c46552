"""The aesthetic gain vs prompt fidelity trade-off of several run.py runs, as a markdown table.

    python examples/image_aesthetic/tradeoff.py runs/a/results.json runs/b/results.json ...

One row per run (its reward weights, β, seeds): the held-out aesthetic score's change and
relative gain, the judge's fidelity change (colour and shape; shape alone) as the mean over the
cells and the worst evaluation seed's mean, and the KL to the start model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def row(result: dict[str, Any]) -> str:
    """One table row of a run.py results.json."""
    s, reward = result["summary"], result["reward"]
    weight = {r["name"]: r.get("weight", 1.0) for r in result["rewards"]}
    score, both, shape = s[f"score/{reward}"], s["fidelity/both"], s["fidelity/shape"]
    kl = s["kl_to_start/per_image"]["after"]

    def change(m: dict[str, Any]) -> str:
        worst = min(m["change_by_eval_seed"].values())
        return f"{m['change']['mean']:+.3f} ({worst:+.3f})"

    return (
        f"| {weight.get('prompt_fidelity', 0.0):g} | {result['settings']['beta']:g} | "
        f"{len(result['seeds'])} × {len(result['eval_seeds'])} × {result['eval_samples']} | "
        f"{score['before']['mean']:.3f} → {score['after']['mean']:.3f} "
        f"({result['relative_gain']['mean']:+.1%}) | {change(both)} | {change(shape)} | "
        f"{kl['mean']:.1f} |"
    )


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files written by run.py")
    args = ap.parse_args(argv)
    lines = [
        "| fidelity weight | β | training seeds × eval seeds × images per prompt | aesthetic (gain) | fidelity both: "
        "change (worst eval seed) | shape: change (worst eval seed) | KL / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [row(json.loads(Path(p).read_text())) for p in args.results]
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
