"""Submit a k-NN evaluation (train folder -> test folder) to SLURM: `dinov2-eval knn` in one task.

    python dinov2/run/eval/knn.py --output-dir OUT --partition P [--ngpus 1] [SLURM options] \\
        --backbone OUT_TRAIN/eval/12500/teacher_checkpoint.pth [options of dinov2-eval knn]
"""

from dinov2.run.eval import EvalTask, eval_main


class KnnTask(EvalTask):
    command = "knn"


def main(argv: list[str] | None = None) -> int:
    return eval_main(KnnTask, argv)


if __name__ == "__main__":  # submit through the package module: the job unpickles the task from it
    from dinov2.run.eval.knn import main as package_main

    raise SystemExit(package_main())
