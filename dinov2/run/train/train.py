"""Submit DINOv2 pretraining to SLURM (console script `dinov2-submit-train`).

    python dinov2/run/train/train.py --config-file dinov2/configs/train/vitl_cellsim_register.yaml \\
        --output-dir /your/output/dir --partition hard --ngpus 2

runs dinov2.train.train.main on 1 node with 2 GPUs (one task per GPU) of partition `hard`. Options
after the launcher's are the training's own (`--no-resume`, trailing `key=value` config overrides);
`--dry-run` prints the sbatch script instead of submitting. Checkpoints go to
OUTPUT_DIR/checkpoints/, submitit's logs to OUTPUT_DIR/<job id>/. Near the time limit or when
preempted, training saves a checkpoint and the job requeues itself and resumes from it.
"""

from dinov2.run.submit import Task, get_args_parser, launch


class TrainTask(Task):
    """One training process; stops gracefully on SIGUSR2/SIGTERM and is requeued."""

    graceful_preemption = True

    def run(self):
        from dinov2.train.train import main as train_main

        return train_main(self.args)

    @classmethod
    def validate(cls, args, dry_run: bool) -> None:
        # The whole config (unknown keys, types, values) is checked at submission time; dataset
        # paths only for a real submission (a dry run may be prepared away from the cluster).
        from dinov2.utils.config import get_cfg_from_args

        get_cfg_from_args(args, check_paths=not dry_run)


def get_parser():
    from dinov2.train.train import get_args_parser as get_train_args_parser

    return get_args_parser(
        description="Submit DINOv2 pretraining to SLURM", parents=[get_train_args_parser(add_help=False)]
    )


def main(argv: list[str] | None = None) -> int:
    return launch(get_parser(), TrainTask, "dinov2:train", argv)


if __name__ == "__main__":  # submit through the package module: the job unpickles TrainTask from it
    from dinov2.run.train.train import main as package_main

    raise SystemExit(package_main())
