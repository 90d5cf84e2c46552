"""Real file-system faults on a private tmpfs mount (needs root and `unshare`; skipped where
neither is available): a read-only run directory is refused before anything runs, and a disk
that fills up mid-run stops with one `disk full` line, after which `--resume` completes with
each metrics row once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import save_char_llama

CAN_MOUNT = (
    os.geteuid() == 0
    and shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CAN_MOUNT, reason="needs root and unshare -m for a private tmpfs"),
]

# A reward that, on its 5th sample (step 2 of batch 2 x group 2), fills the disk as another
# process would; then the CLI.
FILLER = """
import os, sys
from grpo_ar.rewards import per_sample, register_reward
calls = []

@register_reward("fills_disk")
@per_sample
def fills_disk(output: str) -> float:
    calls.append(1)
    if len(calls) == 5 and os.environ.get("FILL"):
        try:
            with open(os.environ["FILL"], "wb", buffering=0) as f:
                while True:
                    f.write(b"x" * 4096)
        except OSError:
            pass
    return float(len(output))

from grpo_ar.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("mounts")
    save_char_llama(root / "model")
    rows = [{"prompt": f"{a}+1=", "rewards": "fills_disk"} for a in range(4)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "filler.py").write_text(FILLER)
    return root


def config(root: Path, run: str) -> Path:
    path = root / "run.toml"
    path.write_text(f"""
[model]
path = "{root / "model"}"
device = "cpu"
[sampling]
max_new_tokens = 2
[algorithm]
group_size = 2
beta = 0.0
[trainer]
steps = 3
batch_size = 2
threads = 1
save_every = 1
[data]
train = "{root / "train.jsonl"}"
[log]
run_dir = "{run}"
progress = false
keep_checkpoints = 1
""")
    return path


def in_private_mount(root: Path, script: str) -> subprocess.CompletedProcess:
    """`script` (sh) with a 2 MiB tmpfs at $M, visible only to it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable, "M": str(root / "mnt")}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    (root / "mnt").mkdir(exist_ok=True)
    full = f'set -u; mount -t tmpfs -o size=2m tmpfs "$M"; {script}'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", full], env=env, capture_output=True, text=True, timeout=300
    )


def test_read_only_run_directory_is_refused(ws):
    cfg = config(ws, str(ws / "mnt" / "run"))
    p = in_private_mount(
        ws,
        f'mkdir "$M/run"; mount -o remount,ro "$M"; "$PY" -m grpo_ar.cli train {cfg}; echo rc=$?',
    )
    assert "rc=2" in p.stdout, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"grpo-ar: error: log.run_dir={ws / 'mnt' / 'run'} is not writable (Read-only file "
        "system): fix its permissions or choose another log.run_dir"
    ]


def test_disk_full_mid_run_then_resume(ws, tmp_path):
    cfg = config(ws, str(ws / "mnt" / "run"))
    p = in_private_mount(
        ws,
        f'FILL="$M/fill" "$PY" {ws / "filler.py"} train {cfg}; echo rc=$?; rm "$M/fill"; '
        f'"$PY" {ws / "filler.py"} train --resume "$M/run"; echo rc=$?; '
        f'cp -r "$M/run" {tmp_path / "run"}',
    )
    codes = [line for line in p.stdout.splitlines() if line.startswith("rc=")]
    assert codes == ["rc=1", "rc=0"], p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("grpo-ar: error:")]
    assert len(errors) == 1 and "disk full" in errors[0] and "--resume" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and "grpo_ar/cli.py" not in p.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    ckpts = sorted(x.name for x in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000003"]
