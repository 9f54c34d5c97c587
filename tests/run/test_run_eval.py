"""Evaluation launchers (dinov2/run/eval/*.py): options forwarded to dinov2-eval, one task per job."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.run.eval.cv import CvTask
from dinov2.run.eval.knn import KnnTask
from dinov2.run.eval.knn import main as knn_main
from dinov2.run.eval.linear import LinearTask
from dinov2.run.eval.linear import main as linear_main

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_launchers_run_their_eval_command():
    assert (KnnTask.command, LinearTask.command, CvTask.command) == ("knn", "linear", "cv")


def test_unknown_options_are_forwarded_in_order(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "o"), "--partition", "gpu", "--dry-run", "--backbone", "pixels:8",
            "--train", "A", "B", "--test", "C", "--k", "1", "5", "--n-boot", "0"]  # fmt: skip
    assert knn_main(argv) == 0
    script = capsys.readouterr().out.splitlines()
    # evaluation is one process on one GPU by default
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --job-name=dinov2:eval-knn" in script
    args = argparse.Namespace(
        output_dir=str(tmp_path / "o"),
        entry_argv=["--backbone", "pixels:8", "--train", "A", "B", "--test", "C", "--k", "1", "5"],
    )
    assert KnnTask.cli_argv(args) == ["knn", *args.entry_argv, "--output-dir", str(tmp_path / "o")]


def test_bad_eval_options_fail_before_submission(tmp_path, capsys):
    assert knn_main(["--output-dir", str(tmp_path), "--dry-run", "--backbone", "b", "--bogus", "3"]) == 2
    err = capsys.readouterr().err
    assert "invalid arguments for dinov2:eval-knn" in err and "unrecognized arguments: --bogus 3" in err


@pytest.mark.parametrize(
    "extra", [["--ngpus", "2"], ["--nodes", "2"], ["--ngpus", "0", "--ntasks-per-node", "2"]]
)
def test_more_than_one_process_is_refused(tmp_path, capsys, extra):
    assert linear_main(["--output-dir", str(tmp_path), "--dry-run", "--backbone", "b", *extra]) == 2
    assert "evaluation runs as one process" in capsys.readouterr().err


def test_eval_launcher_runs_as_a_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(REPO_ROOT / "dinov2/run/eval/cv.py"), "--output-dir", str(tmp_path / "o"),
           "--ngpus", "0", "--dry-run", "--backbone", "pixels:8", "--data", "D", "--folds", "3"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --job-name=dinov2:eval-cv" in proc.stdout.splitlines()
    assert "--gpus-per-node" not in proc.stdout
