"""scripts/gpu_check.sh without a GPU: one clear line, exit status 77, nothing generated or run."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def test_gpu_check_without_a_visible_gpu_says_so_and_exits_77(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this checks the no-GPU path on any machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(work)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 77
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "gpu_check: no GPU visible (torch.cuda.device_count() is 0, CUDA_VISIBLE_DEVICES=): nothing checked"
    ]
    assert not work.exists()  # no synthetic data generated, no run started


def test_gpu_check_is_executable_and_valid_bash():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
