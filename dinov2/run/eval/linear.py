"""Submit a linear-probe evaluation (C picked on val, refit, test scores) to SLURM: `dinov2-eval linear`.

    python dinov2/run/eval/linear.py --output-dir OUT --partition P [--ngpus 1] [SLURM options] \\
        --backbone OUT_TRAIN/eval/12500/teacher_checkpoint.pth [options of dinov2-eval linear]
"""

from dinov2.run.eval import EvalTask, eval_main


class LinearTask(EvalTask):
    command = "linear"


def main(argv: list[str] | None = None) -> int:
    return eval_main(LinearTask, argv)


if __name__ == "__main__":  # submit through the package module: the job unpickles the task from it
    from dinov2.run.eval.linear import main as package_main

    raise SystemExit(package_main())
