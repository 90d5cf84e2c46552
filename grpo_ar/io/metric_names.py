"""grpo_ar's metric names and TRL's / verl's names for the same concepts (`log.metric_names`).

metrics.jsonl always holds grpo_ar's names; trackers get the names the user picked, so a TRL or
verl dashboard keeps working. Names with no counterpart pass through unchanged. The README's
"Metric names" table is this module's content."""

from __future__ import annotations

import re
from collections.abc import Callable

# grpo_ar name -> (TRL GRPOTrainer name, verl name); None where that library logs no equivalent.
# Per-reward names (reward/<name>/mean) follow the patterns below.
NAMES: dict[str, tuple[str | None, str | None]] = {
    "reward/mean": ("reward", "critic/score/mean"),
    "reward/std": ("reward_std", None),
    "reward/zero_std_groups": ("frac_reward_zero_std", None),
    "kl": ("kl", "actor/kl_loss"),  # KL to the reference; verl's ppo_kl is old-vs-new
    "entropy": ("entropy", "actor/entropy"),
    "clip/low": ("clip_ratio/low_mean", None),  # verl: pg_clipfrac = low + high
    "clip/high": ("clip_ratio/high_mean", None),
    "completion/length_mean": ("completions/mean_length", "response_length/mean"),
    "completion/length_max": ("completions/max_length", "response_length/max"),
    "completion/truncated": ("completions/clipped_ratio", "response_length/clip_ratio"),
    "lr": ("learning_rate", "actor/lr"),
    "grad_norm": ("grad_norm", "actor/grad_norm"),
    "time/sample": (None, "timing_s/gen"),
    "time/reward": (None, "timing_s/reward"),
    "time/reference": (None, "timing_s/ref"),
    "time/update": (None, "timing_s/update_actor"),
    "time/step": (None, "timing_s/step"),
    "tokens_per_s": (None, "perf/throughput"),
}

# per-reward and eval names: (grpo_ar pattern, TRL template, verl template)
PATTERNS: list[tuple[str, str | None, str | None]] = [
    (r"reward/(?P<n>.+)/mean", "rewards/{n}/mean", None),
    (r"reward/(?P<n>.+)/std", "rewards/{n}/std", None),
    # TRL has no failure counts; under rewards/ they keep clear of its `reward` scalar (a
    # file-based store cannot hold both `reward` and `reward/...`)
    (r"reward/(?P<n>.+)/failures", "rewards/{n}/failures", None),
    (r"reward/(?P<n>.+)/failed_frac", "rewards/{n}/failed_frac", None),
    (r"reward/failed_frac", "rewards/failed_frac", None),
    (r"eval/greedy/reward", "eval_reward", None),
]

STYLES = ("grpo_ar", "trl", "verl")


def renamer(style: str) -> Callable[[str], str]:
    """`name -> the name under `style`` (grpo_ar: unchanged)."""
    if style not in STYLES:
        raise ValueError(f"metric name style {style!r}; use one of {', '.join(STYLES)}")
    if style == "grpo_ar":
        return lambda name: name
    col = 0 if style == "trl" else 1
    compiled = [(re.compile(p), t[col]) for p, *t in PATTERNS]

    def rename(name: str) -> str:
        if name in NAMES:
            return NAMES[name][col] or name
        for pattern, template in compiled:
            m = pattern.fullmatch(name)
            if m and template:
                return template.format(**m.groupdict())
        return name

    return rename


def rename_metrics(metrics: dict[str, float], style: str) -> dict[str, float]:
    """`metrics` with keys renamed to `style`; refuses two keys that would collide."""
    rename = renamer(style)
    out: dict[str, float] = {}
    for k, v in metrics.items():
        new = rename(k)
        if new in out:
            raise ValueError(f"metrics {k!r} and another both become {new!r} under {style}")
        out[new] = v
    return out


def markdown_table() -> str:
    """The README table: grpo_ar | TRL | verl."""
    rows = ["| grpo_ar | TRL | verl |", "|---|---|---|"]
    for k, (trl, verl) in NAMES.items():
        rows.append(f"| `{k}` | {_cell(trl)} | {_cell(verl)} |")
    for p, trl, verl in PATTERNS:
        shown = p.replace("(?P<n>.+)", "<name>").replace(
            "(?P<s>failures|failed_frac)", "failures|failed_frac"
        )
        rows.append(f"| `{shown}` | {_cell(trl)} | {_cell(verl)} |")
    return "\n".join(rows)


def _cell(name: str | None) -> str:
    return f"`{name.replace('{n}', '<name>')}`" if name else "—"
