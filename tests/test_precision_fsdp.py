"""FSDP2 under bf16-mixed (2 CPU ranks, gloo): the MixedPrecisionPolicy (bf16 all-gather,
fp32 reduce-scatter) trains, and the weights and the checkpoint stay fp32 master weights.
This file is also the worker: `python -m torch.distributed.run --nproc_per_node=2
tests/test_precision_fsdp.py OUT`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from test_precision import make

    from grpo_ar.io.checkpoint import latest_checkpoint

    dist.init_process_group("gloo")
    over = ["trainer.strategy=fsdp2", "trainer.steps=2", "trainer.lr=1e-3"]
    tr = make(out, "bf16-mixed", over)
    hist = tr.train()
    if dist.get_rank() == 0:
        saved = load_file(latest_checkpoint(out) / "model.safetensors")
        result = {
            "grad_norm": [h["grad_norm"] for h in hist],
            "skipped": sum(h.get("skipped_updates", 0) for h in hist),
            "dtypes": sorted({str(p.dtype) for p in tr.model.parameters()}),
            "saved": sorted({str(v.dtype) for v in saved.values()}),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_bf16_mixed_keeps_fp32_master_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    r = subprocess.run(
        [*cmd, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["skipped"] == 0 and all(0 < g < 100 for g in res["grad_norm"])
    assert res["dtypes"] == ["torch.float32"] and res["saved"] == ["torch.float32"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
