"""Submit a k-NN evaluation (train folder -> test folder) to SLURM: `dinov2-eval knn` in one task.

    python dinov2/run/eval/knn.py --output-dir OUT --partition P [--ngpus 1] [SLURM options] \\
        --backbone OUT_TRAIN/eval/12500/teacher_checkpoint.pth [options of dinov2-eval knn]
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file from a checkout: import this checkout's dinov2 (not the script's folder).
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from dinov2.run.eval import EvalTask, eval_main


class KnnTask(EvalTask):
    command = "knn"


def main(argv: list[str] | None = None) -> int:
    return eval_main(KnnTask, argv)


if __name__ == "__main__":
    # Submit through the package module so the pickled task class is importable inside the job.
    from dinov2.run.eval.knn import main as package_main

    sys.exit(package_main())
