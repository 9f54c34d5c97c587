"""Submit a k-fold cross-validation table (1-NN, 20-NN, linear probe) to SLURM: `dinov2-eval cv`.

    python dinov2/run/eval/cv.py --output-dir OUT --partition P [--ngpus 1] [SLURM options] \\
        --backbone OUT_TRAIN/eval/12500/teacher_checkpoint.pth [options of dinov2-eval cv]
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file from a checkout: import this checkout's dinov2 (not the script's folder).
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from dinov2.run.eval import EvalTask, eval_main


class CvTask(EvalTask):
    command = "cv"


def main(argv: list[str] | None = None) -> int:
    return eval_main(CvTask, argv)


if __name__ == "__main__":
    # Submit through the package module so the pickled task class is importable inside the job.
    from dinov2.run.eval.cv import main as package_main

    sys.exit(package_main())
