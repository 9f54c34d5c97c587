"""The scripts users run as files (`python dinov2/train/train.py`, the SLURM launchers in
dinov2/run/) import the installed package: no module of their folders hides another.

Run as a script, Python puts the script's folder first on sys.path, so a file there named like an
installed top-level module (``step``, ``precision``, ...) would be imported in its place by any
library. The scripts have no sys.path set-up to prevent that; this test keeps the folders' names
free. (End-to-end script runs: test_train.py, test_resume.py, test_torchrun.py, tests/run/.)
"""

import subprocess
import sys
from pathlib import Path

import pytest

import dinov2

PACKAGE = Path(dinov2.__file__).parent
TRAIN_DIR = PACKAGE / "train"


@pytest.mark.parametrize("folder", ["train", "run/train", "run/eval"])
def test_no_module_of_a_script_folder_shadows_an_importable_top_level_module(tmp_path, folder):
    names = sorted(p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__")
    assert names
    # In a fresh interpreter (pytest's own sys.path holds test folders), from a neutral folder.
    code = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"dinov2/{folder}/ modules named like importable modules: {out.stdout}"


def test_the_script_runs_from_any_folder(tmp_path):
    out = subprocess.run([sys.executable, str(TRAIN_DIR / "train.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--config-file" in out.stdout and "--no-resume" in out.stdout
