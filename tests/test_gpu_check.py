"""``scripts/gpu_check --dry-run`` on this GPU-less machine: every step runs its probes and the
table says, per step, what it found or would do, so the GPU check cannot rot between GPU
machines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ["environment", "gpu tests", "onnxruntime-cuda", "tensorrt-rtx", "unet fp16 latency"]


def test_gpu_check_dry_run_writes_one_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0].startswith("| step | status |")
    body = {r.split(" | ")[0][2:]: r.split(" | ") for r in rows[1:]}
    assert [n for n in body] == [n for n in body if any(n.startswith(s) for s in STEPS)]
    assert len(body) == len(STEPS)
    for name, cells in body.items():
        assert not cells[1].startswith(("crashed", "error", "timeout")), (name, cells)
    assert "tensorrt-rtx" in body["environment"][2]
    assert "collected" in body["gpu tests"][2]  # the gpu tests were found and listed
    from trt_sd.runtime.backends import cuda_device_count

    if not cuda_device_count():
        assert "TensorRT-RTX engines need an RTX-class NVIDIA GPU" in body["tensorrt-rtx"][2]
