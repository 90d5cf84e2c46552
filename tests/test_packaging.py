import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_adapters_as_grpo_ar_adapters(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("grpo_ar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (
        "grpo_ar/adapters/base.py",
        "grpo_ar/adapters/text.py",
        "grpo_ar/core/losses.py",
        "grpo_ar/rewards/text.py",
    ):
        assert f in names, f
    assert not any(n.startswith("adapters/") for n in names), (
        "a top-level `adapters` package would collide on PyPI"
    )
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "grpo-ar = grpo_ar.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_import_is_light():
    code = (
        "import sys, grpo_ar, grpo_ar.core, grpo_ar.adapters, grpo_ar.train.trainer, grpo_ar.rewards;"
        "heavy = [m for m in ('diffusers', 'trl', 'datasets', 'peft') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
