"""benchmarks/gpu_check.sh's CPU-runnable part: --dry-run checks what must travel to the GPU
machine (the TRL wheels, the SmolLM2 folder) and lists the commands it would run."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def dry_run(tmp_path, wheels, model_files):
    whl, model = tmp_path / "whl", tmp_path / "model"
    whl.mkdir()
    model.mkdir()
    for w in wheels:
        (whl / f"{w}-1.0-py3-none-any.whl").write_bytes(b"")
    for f in model_files:
        (model / f).write_text("{}")
    args = ["bash", str(SCRIPT), "--dry-run", "--wheels", str(whl), "--model", str(model)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


ALL = ["trl", "accelerate", "datasets", "dill", "multiprocess", "xxhash"]


def test_dry_run_lists_the_steps_when_everything_travelled(tmp_path):
    r = dry_run(tmp_path, ALL, ["config.json"])
    assert r.returncode == 0, r.stderr
    for step in (
        "pip install --no-index --no-deps",
        "-m pytest -q -p no:cacheprovider -m gpu tests/",
        "bench_step.py --configs smol --device cuda --precision bf16-mixed",
        "bench_sampler.py --device cuda",
    ):
        assert step in r.stdout, step


def test_dry_run_names_a_missing_wheel_and_model(tmp_path):
    r = dry_run(tmp_path, [w for w in ALL if w != "trl"], [])
    assert r.returncode == 1
    assert "trl-*.whl" in r.stderr and "config.json" in r.stderr
    assert "accelerate-*.whl" not in r.stderr
