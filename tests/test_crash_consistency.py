"""SIGKILL at the dangerous moments of a run (mid-run checkpoint, the final save between its
rename and `latest`, pruning), then `grpo-ar train --resume`: the resumed run ends bitwise
equal to an uninterrupted one, and metrics.jsonl / samples.jsonl hold each step's rows once,
with no cut line. The killed run is a real `python -m grpo_ar.cli` process."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from grpo_ar.cli import main
from tiny import save_char_llama

# Patches one file-system call of the checkpoint writer to SIGKILL the process at a chosen
# moment, then runs the CLI: the kill is real, only its timing is arranged.
KILLER = """
import os, shutil, signal, sys, tempfile
moment, name = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_rmtree, real_mkdtemp = os.replace, shutil.rmtree, tempfile.mkdtemp

def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if moment == "renamed" and os.path.basename(str(dst)) == name:
        die()  # the new step folder is in place, `latest` still names the previous one

def rmtree(path, *a, **k):
    if moment == "pruning" and os.path.basename(str(path)) == name:
        files = sorted(p for p in os.listdir(path))
        os.remove(os.path.join(path, files[0]))  # half deleted
        die()
    return real_rmtree(path, *a, **k)

def mkdtemp(*a, prefix="", **k):
    if moment == "saving" and prefix.startswith("." + name + "."):
        die()  # the step's metrics line is written, its checkpoint not begun
    return real_mkdtemp(*a, prefix=prefix, **k)

os.replace, shutil.rmtree, tempfile.mkdtemp = replace, rmtree, mkdtemp
from grpo_ar.cli import main
sys.exit(main(sys.argv[3:]))
"""


def config(root: Path, run_dir: Path) -> Path:
    rows = [
        {"prompt": f"{a}+{b}=", "rewards": {"numeric_answer": {"answer": a + b}}}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = root / f"{run_dir.name}.toml"
    path.write_text(f"""
[model]
path = "{root / "model"}"
device = "cpu"
[sampling]
max_new_tokens = 3
[algorithm]
group_size = 2
beta = 0.04
[trainer]
steps = 3
batch_size = 2
lr = 1e-2
seed = 3
threads = 1
save_every = 1
[data]
train = "{root / "train.jsonl"}"
[log]
run_dir = "{run_dir}"
progress = false
samples_per_step = 2
keep_checkpoints = 1
""")
    return path


def quiet_main(*args: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(list(args))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (root, its run directory)."""
    root = tmp_path_factory.mktemp("crash")
    save_char_llama(root / "model")
    assert quiet_main("train", str(config(root, root / "whole"))) == 0
    return root, root / "whole"


def rows(path: Path) -> list[dict]:
    """JSONL rows without the wall-clock fields (they differ between any two runs)."""
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)  # a cut line would raise here
        out.append(
            {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}
        )
    return out


def final_weights(run: Path) -> dict:
    ckpts = run / "checkpoints"
    return load_file(ckpts / (ckpts / "latest").read_text() / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment, name",
    [
        ("saving", "step_000002"),  # killed after step 2's metrics line, before its checkpoint
        ("renamed", "step_000003"),  # the final save: folder renamed in, `latest` not yet moved
        ("pruning", ".step_000002.pruned"),  # the final save's prune, half way through a delete
    ],
)
def test_kill_then_resume_equals_the_uninterrupted_run(reference, tmp_path, moment, name):
    root, whole = reference
    run = tmp_path / "run"
    cfg = config(root, run)
    cmd = [sys.executable, "-c", KILLER, moment, name, "train", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -9, p.stderr  # SIGKILL: the moment was reached

    if moment == "saving":  # and the disk filled up mid-way through the next line
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "reward/mea')
    assert quiet_main("train", "--resume", str(run)) == 0

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000003"]  # no temporary, set-aside or half-pruned folder
    a, b = final_weights(run), final_weights(whole)
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)  # bitwise
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert rows(run / "metrics.jsonl") == rows(whole / "metrics.jsonl")
    assert rows(run / "samples.jsonl") == rows(whole / "samples.jsonl")
