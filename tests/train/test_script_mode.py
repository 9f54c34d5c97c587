"""`python dinov2/train/train.py` runs the package's code: no module of dinov2/train/ hides another.

Run as a script, Python puts the script's folder first on sys.path, so a file there named like an
installed top-level module (``step``, ``precision``, ...) would be imported in its place by any
library. train.py has no sys.path set-up to prevent that; this test keeps the folder's names free.
(The end-to-end script runs are in test_train.py, test_resume.py and test_torchrun.py.)
"""

import subprocess
import sys
from pathlib import Path

import dinov2.train

TRAIN_DIR = Path(dinov2.train.__file__).parent


def test_no_module_of_the_train_folder_shadows_an_importable_top_level_module(tmp_path):
    names = sorted(p.stem for p in TRAIN_DIR.glob("*.py") if p.stem != "__init__")
    assert {"train", "step", "checkpointer"} <= set(names)
    # In a fresh interpreter (pytest's own sys.path holds test folders), from a neutral folder.
    code = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"dinov2/train/ modules named like importable modules: {out.stdout}"


def test_the_script_runs_from_any_folder(tmp_path):
    out = subprocess.run([sys.executable, str(TRAIN_DIR / "train.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--config-file" in out.stdout and "--no-resume" in out.stdout
