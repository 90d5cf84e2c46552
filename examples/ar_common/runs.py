"""Command-line plumbing of the examples' run.py: the options the AR image and video ones share
(pre-training cache and overrides, held-out evaluation, config overrides) and the commit every
example records with its figures."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any


def commit() -> str:
    """The code's commit, "+dirty" when the work tree differs from it ("unknown" off git): the
    provenance each example writes beside its figures."""

    def git(*a: str) -> str:
        where = Path(__file__).resolve().parent
        out = subprocess.run(["git", *a], cwd=where, check=True, capture_output=True, text=True,
                             timeout=30)  # fmt: skip
        return out.stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + (
            "+dirty" if git("status", "--porcelain") else ""
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """["vq.steps=3", ...] -> {"vq": {"steps": 3}} (values read as JSON, else strings)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, raw = item.partition("=")
        stage, _, name = key.partition(".")
        if not name:
            raise SystemExit(f"--pretrain-set {item!r}: use STAGE.KEY=VALUE, e.g. vq.steps=300")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(stage, {})[name] = value
    return out


def run_parser(doc: str, base: str, stages: str, unit: str) -> argparse.ArgumentParser:
    """--base (pre-training cache), --pretrain-set, --eval-samples (`unit`s per held-out
    prompt), --eval-seed and --set; the example adds its own options."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--base", default=base, help="cache of pre-training")
    ap.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help=f"pre-training override, e.g. prior.steps=600 (stages: {stages})",
    )
    ap.add_argument("--eval-samples", type=int, default=16, help=f"{unit} per held-out prompt")
    ap.add_argument("--eval-seed", type=int, default=12345, help="sampling seed of evaluation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (config.toml keys)")  # fmt: skip
    return ap
