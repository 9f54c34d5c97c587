"""Submit a k-fold cross-validation table (1-NN, 20-NN, linear probe) to SLURM: `dinov2-eval cv`.

    python dinov2/run/eval/cv.py --output-dir OUT --partition P [--ngpus 1] [SLURM options] \\
        --backbone OUT_TRAIN/eval/12500/teacher_checkpoint.pth [options of dinov2-eval cv]
"""

from dinov2.run.eval import EvalTask, eval_main


class CvTask(EvalTask):
    command = "cv"


def main(argv: list[str] | None = None) -> int:
    return eval_main(CvTask, argv)


if __name__ == "__main__":  # submit through the package module: the job unpickles the task from it
    from dinov2.run.eval.cv import main as package_main

    raise SystemExit(package_main())
