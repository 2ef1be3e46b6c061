"""bench/gpu.sh, the prepared GPU check: a session lent a GPU has minutes of it, so the script must already
run when one is lent. `--smoke` runs all of it, tiny, on this CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_tiny_on_this_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "gpu.md").read_text()
    for row in ("| inference deit_small_patch16_224 |", "| teacher-logits regnetx_002 fp32 |",
                "| train deit_tiny_distilled_patch16_224 ZeRO-2 fp32 |",
                "| train deit_tiny_distilled_patch16_224 ZeRO-2 fp32, one batch in memory (the device's own rate, no "
                "loader) |", "| loader at 64 px, 1 workers, rank 0 of 3, batch 4 |",
                "| loader at 64 px, 1 workers, rank 0 of 3 with --exchange, batch 4 |"):
        assert row in table, table
