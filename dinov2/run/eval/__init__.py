"""SLURM launchers for the evaluation CLI: `python dinov2/run/eval/knn.py [SLURM options] [eval options]`.

Each launcher submits one `dinov2-eval <command>` process (evaluation runs on one GPU, or the CPU
with --ngpus 0). Options the launcher does not know are passed to `dinov2-eval <command>`, and
--output-dir is shared: the evaluation writes its results there, submitit its logs to
OUTPUT_DIR/<job id>/. Adding a launcher for another command is three lines:

    class CvTask(EvalTask):
        command = "cv"

    def main(argv=None):
        return eval_main(CvTask, argv)
"""

import argparse
import contextlib
import io

from dinov2.run.submit import Task, get_args_parser, launch


class EvalTask(Task):
    """Runs `dinov2-eval <command>` with the forwarded options; a requeued job reruns it (features
    already extracted are reused from OUTPUT_DIR/feature_cache)."""

    command = ""

    def run(self) -> int:
        from dinov2.eval.cli import main as eval_cli_main

        return eval_cli_main(self.cli_argv(self.args))

    @classmethod
    def cli_argv(cls, args: argparse.Namespace) -> list[str]:
        """The `dinov2-eval` command line this task runs."""
        return [cls.command, *getattr(args, "entry_argv", []), "--output-dir", str(args.output_dir)]

    @classmethod
    def validate(cls, args: argparse.Namespace, dry_run: bool) -> None:
        tasks = args.nodes * (args.ngpus if args.ngpus > 0 else args.ntasks_per_node)
        if tasks != 1:
            raise ValueError(
                f"evaluation runs as one process, but {args.nodes} node(s) x "
                f"{args.ngpus or args.ntasks_per_node} task(s) were requested: use --ngpus 1 (or --ngpus 0 "
                "for the CPU) and --nodes 1"
            )
        from dinov2.eval.cli import get_args_parser as get_eval_args_parser

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                get_eval_args_parser().parse_args(cls.cli_argv(args))
        except SystemExit:
            message = stderr.getvalue().strip().splitlines()
            raise ValueError(
                message[-1] if message else f"bad options for dinov2-eval {cls.command}"
            ) from None


def eval_main(task_class: type[EvalTask], argv: list[str] | None = None) -> int:
    """Parse the launcher options, forward the rest to `dinov2-eval <command>`, submit."""
    parser = get_args_parser(
        description=f"Submit `dinov2-eval {task_class.command}` to SLURM. Options not listed here are "
        f"passed to `dinov2-eval {task_class.command}` (see `dinov2-eval {task_class.command} -h`).",
    )
    parser.set_defaults(ngpus=1)
    return launch(parser, task_class, f"dinov2:eval-{task_class.command}", argv, forward_unknown=True)
