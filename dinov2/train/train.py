"""DINOv2 pretraining entry point: one process, torchrun, or the SLURM launcher.

    python dinov2/train/train.py --config-file F --output-dir D [key=value ...]
    torchrun --standalone --nproc_per_node=N dinov2/train/train.py --config-file F --output-dir D
    dinov2-train --config-file F --output-dir D [--no-resume]

A run resumes automatically from the newest valid checkpoint in <output_dir>/checkpoints/ (model,
optimizer, EMA teacher, loss centers, iteration, per-rank RNG states, sampler position, grad scaler),
so a killed run restarted with the same command continues exactly where its last checkpoint left off.
Outputs in <output_dir>: config.yaml, training_metrics.jsonl, training_log.txt, tensorboard/,
checkpoints/model_<iteration:07d>.pth and eval/<iteration>/teacher_checkpoint.pth.

A failing run fails fast: an exception on any rank is logged with its traceback, the process group
is aborted (the other ranks' collectives fail instead of waiting), the DataLoader workers are
stopped, and the command exits with status 1. Ctrl-C finishes the current step, saves a checkpoint
and exits with status 130; a second Ctrl-C exits at once. SIGTERM/SIGUSR2 (SLURM, torchrun) save a
checkpoint and exit with status 0 (dinov2.train.preemption).
"""

import argparse
import logging
import signal
import time
from dataclasses import dataclass

from omegaconf import DictConfig

from dinov2.data.loaders import next_batch, stop_workers
from dinov2.train import checkpointing
from dinov2.train.builders import (  # noqa: F401 (build_backbones, model_uses_fp16: public here too)
    build_backbones,
    build_data,
    build_grad_scaler,
    build_model,
    model_uses_fp16,
)
from dinov2.train.checkpointer import Checkpointer
from dinov2.train.distributed_wrap import (
    GradientSync,
    apply_fsdp2,
    check_compile_supported,
    compile_backbones,
)
from dinov2.train.metrics_logger import MetricsLogger
from dinov2.train.monitors import CollapseError, TrainingMonitors  # noqa: F401 (CollapseError: public)
from dinov2.train.precision import apply_device_precision
from dinov2.train.preemption import DEFAULT_SIGNALS, PreemptionFlag
from dinov2.train.schedules import build_schedulers
from dinov2.train.step import (  # noqa: F401 (optimizer_step: public here too)
    NonFiniteLossError,
    StepContext,
    StepOutput,
    build_optimizer,
    optimizer_step,
    train_step,
)
from dinov2.utils import distributed
from dinov2.utils.config import ConfigError, setup_config
from dinov2.utils.logging import remove_handlers, setup_logging
from dinov2.utils.signals import die_with_parent
from dinov2.utils.utils import fix_random_seeds

logger = logging.getLogger("dinov2")


@dataclass
class TrainResult:
    """How a call to `main` ended."""

    status: str
    """"completed" (reached the last iteration), "preempted" (stopped on SIGTERM/SIGUSR2, checkpoint
    saved) or "interrupted" (stopped on Ctrl-C, checkpoint saved; the CLI exits with status 130)."""
    iteration: int
    """Iterations completed when it returned."""
    output_dir: str = ""
    """The run folder."""


# Exit status of the CLI after Ctrl-C (128 + SIGINT, what a shell reports for a process it ended).
EXIT_INTERRUPTED = 128 + signal.SIGINT


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training CLI: --config-file, --output-dir, --no-resume and trailing key=value overrides."""
    parser = argparse.ArgumentParser("dinov2-train", description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="YAML merged over the defaults (a path or a packaged name)")  # fmt: skip
    parser.add_argument("--output-dir", "--output_dir", default="", metavar="DIR",
                        help="run folder (overrides train.output_dir)")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true",
                        help="ignore existing checkpoints and start from iteration 0")  # fmt: skip
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, e.g. train.batch_size_per_gpu=32")  # fmt: skip
    return parser


# ------------------------------------------------------------------------------------------- the run
class TrainingRun:
    """Everything one training run works with (built by the constructor: resume, wrap, optimizer,
    data, monitors, logger) and the steps of its loop.

    Attributes besides the built objects: `start_iter` / `end_iter` (iterations completed at the
    start and at the end), `frozen` (whether the student backbone is frozen for the head warm-up).
    """

    def __init__(self, cfg: DictConfig, model, info: distributed.DistributedInfo, resume: bool):
        self.cfg, self.model, self.device = cfg, model, info.device
        self.epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
        total_iters = cfg.optim.epochs * self.epoch_len
        self.end_iter = min(total_iters, cfg.train.max_iterations or total_iters)
        self.checkpointer = Checkpointer(cfg)
        checkpoint = self.checkpointer.load_latest() if resume else None
        self.start_iter = self.checkpointer.restore_model(model, checkpoint)  # before compile and shard
        self.grad_sync = wrap_model(model, cfg, info)
        self.warmup_iters = cfg.student.head_warmup_iterations
        if self.warmup_iters and not cfg.student.pretrained_weights:
            logger.warning(
                "student.head_warmup_iterations=%d freezes a randomly initialised backbone "
                "(it is meant for continued pretraining with student.pretrained_weights)",
                self.warmup_iters,
            )
        self.frozen: bool | None = None
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scaler = build_grad_scaler(cfg, info.device)
        self.schedules = build_schedulers(cfg, info.world_size)
        start_position = checkpoint["sampler"]["position"] if checkpoint is not None else 0
        dataset, self.sampler, self.loader = build_data(cfg, info, start_position)
        self.checkpointer.attach(model, self.optimizer, self.scaler, self.sampler, self.start_iter)
        self.checkpointer.restore_training(checkpoint, info)
        del checkpoint
        self.monitors = TrainingMonitors(cfg, self.checkpointer)
        global_batch = self.sampler.global_batch_size
        self.metrics_log = MetricsLogger(cfg.train.output_dir, self.end_iter,
                                         enabled=distributed.is_main_process(),
                                         images_per_step=global_batch, device=info.device)  # fmt: skip
        logger.info("training %d -> %d of %d iterations, %d images per iteration, %d training images",
                    self.start_iter, self.end_iter, total_iters, global_batch, len(dataset))  # fmt: skip
        # SIGINT too: the first Ctrl-C stops at the next step boundary like a preemption, a second one
        # ends the process at once.
        self.flag = PreemptionFlag(signals=(*DEFAULT_SIGNALS, signal.SIGINT))
        self.ctx = StepContext(grad_sync=self.grad_sync, preemption=self.flag)

    def freeze_backbone_during_head_warmup(self, it: int) -> None:
        if self.frozen != (it < self.warmup_iters):
            self.frozen = it < self.warmup_iters
            self.model.freeze_backbone(self.frozen)
            logger.info("student backbone %s at iteration %d", "frozen" if self.frozen else "trainable", it)

    def step(self, data_iter, it: int) -> tuple[StepOutput, dict]:
        """Iteration `it`: the next batch and the training step. A non-finite loss saves the state
        from before the iteration (nothing was updated) and raises."""
        rng_before = checkpointing.capture_rng_state()
        t0 = time.perf_counter()
        data = next_batch(data_iter)
        t_data = time.perf_counter() - t0
        # Timed steps synchronise the device: only where a log line is due anyway.
        self.ctx.timed = self.log_due(it + 1)
        try:
            out = train_step(
                self.model, self.optimizer, self.scaler, self.ctx, data, self.schedules, it, self.cfg
            )
        except NonFiniteLossError as error:
            saved = self.checkpointer.save(it, rng_before)
            raise NonFiniteLossError(f"{error}; the last finite state (before this iteration) was saved "
                                     f"to {saved}") from None  # fmt: skip
        self.metrics_log.step_done(t_data, time.perf_counter() - t0)
        return out, data

    def after_step(self, out: StepOutput, data: dict, it: int) -> None:
        """After `it` completed iterations: monitors, the log line, teacher export and checkpoint."""
        cfg, s = self.cfg, self.schedules
        extra = self.monitors.run(self.model, data, it, s.teacher_temp[it - 1], self.device)
        if self.log_due(it) or extra:
            self.metrics_log.log(it, {
                "epoch": it / self.epoch_len, **out.loss_values(), "lr": s.lr[it - 1], "wd": s.wd[it - 1],
                "momentum": s.momentum[it - 1], "teacher_temp": s.teacher_temp[it - 1],
                "last_layer_lr": s.last_layer_lr[it - 1], **{k: float(v) for k, v in out.grad_norms.items()},
                **extra, **out.times,  # this step's forward_backward_time, grad_sync_time, optimizer_time
            })  # fmt: skip
        self.monitors.judge(it)  # may stop the run on a collapse streak (after its metrics are logged)
        if cfg.evaluation.eval_period_iterations > 0 and it % cfg.evaluation.eval_period_iterations == 0:
            self.checkpointer.export_teacher(it)
        if it % cfg.train.checkpoint_period_iterations == 0 or it == self.end_iter:
            self.checkpointer.save(it)

    def stop(self, it: int) -> TrainResult:
        """Some process caught a signal: checkpoint (unless this iteration's is written) and return."""
        if self.checkpointer.saved_at != it:
            self.checkpointer.save(it)
        status = "interrupted" if self.flag.interrupted() else "preempted"
        logger.warning("%s at iteration %d: checkpoint saved, exiting", status, it)
        return TrainResult(status, it, str(self.checkpointer.output_dir))

    def finish(self, it: int) -> TrainResult:
        if not self.checkpointer.teacher_exported(it):
            self.checkpointer.export_teacher(it)  # the final teacher is always exported
        if it == self.start_iter:
            logger.info("nothing to do: the checkpoint is already at the last iteration (%d)", it)
        logger.info("training completed at iteration %d", it)
        return TrainResult("completed", it, str(self.checkpointer.output_dir))

    def log_due(self, it: int) -> bool:
        """True when a metrics line is written after `it` completed iterations (log period, last
        iteration, or a collapse / kNN monitor)."""
        period = self.cfg.train.log_period_iterations
        return it == self.end_iter or (period > 0 and it % period == 0) or self.monitors.due(it)

    def close(self) -> None:
        self.flag.uninstall()
        self.metrics_log.close()
        if self.grad_sync is not None:
            self.grad_sync.close()


def wrap_model(model, cfg: DictConfig, info: distributed.DistributedInfo) -> GradientSync | None:
    """Compile (train.compile) and shard (train.distributed=fsdp) the model in place; returns the
    GradientSync that all-reduces the gradients FSDP2 does not (all of them in ddp mode), or None."""
    if cfg.train.compile:
        compile_backbones(model)  # before sharding: FSDP2's hooks then wrap the compiled blocks
    synced = list(model.student.parameters()) if cfg.train.distributed == "ddp" else []
    if cfg.train.distributed == "fsdp" and info.world_size > 1:
        synced = apply_fsdp2(model, cfg.compute_precision)  # the NO_SHARD parts, if any
        model.autocast_dtype = None  # FSDP2's MixedPrecisionPolicy casts instead
    # Gradients are all-reduced from hooks while backward runs (FSDP2 reduces the sharded parts).
    return GradientSync(synced) if synced and info.world_size > 1 else None


def do_train(cfg: DictConfig, model, info: distributed.DistributedInfo, resume: bool) -> TrainResult:
    """The training loop: resume, then step, log, monitor and checkpoint until the last iteration
    or a signal."""
    run = TrainingRun(cfg, model, info, resume)
    it, stop, data_iter = run.start_iter, False, None
    try:
        data_iter = iter(run.loader)
        while it < run.end_iter:
            if stop:  # set by a step when any process caught a signal (agreed through its all_reduce)
                return run.stop(it)
            run.freeze_backbone_during_head_warmup(it)
            out, data = run.step(data_iter, it)
            it += 1
            stop = out.stop
            run.after_step(out, data, it)
        return run.finish(it)
    finally:
        try:
            if data_iter is not None:
                stop_workers(data_iter)  # they ignore SIGTERM: leaving them to exit handlers would hang
        finally:
            run.close()


def main(args: argparse.Namespace | list[str] | None = None) -> TrainResult:
    """Train from parsed args, a list of CLI strings, or sys.argv (None: the console script).

    Called with None (the console script, `python dinov2/train/train.py`) it never returns: it ends
    the process with status 0 (completed, or stopped by SIGTERM/SIGUSR2 with a checkpoint), 130
    (stopped by Ctrl-C with a checkpoint), 2 (bad configuration) or 1 (any failure, logged with its
    traceback). Called with arguments it returns the TrainResult or raises.
    """
    from_cli = args is None
    if args is None or isinstance(args, list | tuple):
        args = get_args_parser().parse_args(args)
    handlers = setup_logging(None, distributed.env_rank())
    owns_process_group = False
    try:
        try:
            cfg = setup_config(args)
        except (ConfigError, FileNotFoundError) as e:
            if from_cli:
                logger.error("%s", e)
                raise SystemExit(2) from None
            raise
        owns_process_group = not distributed.is_enabled()  # a launcher may have initialised it already
        try:
            info = distributed.enable(timeout_minutes=cfg.train.collective_timeout_minutes)
            if distributed.launched_by_torchrun():
                # torchrun forwards SIGTERM to its ranks, but nothing can forward a SIGKILL: die with it.
                die_with_parent(signal.SIGKILL)
            remove_handlers(handlers)
            handlers = setup_logging(cfg.train.output_dir, info.rank)
            fix_random_seeds(cfg.train.seed + info.rank)
            apply_device_precision(cfg, info.device)  # bf16 -> fp16 on pre-Ampere GPUs; fp16 on CPU: error
            if cfg.train.compile:
                check_compile_supported(info.device.type)
            model = build_model(cfg, info.device)
            result = do_train(cfg, model, info, resume=not args.no_resume)
        except Exception as e:
            logger.error("training failed on rank %d: %s: %s", distributed.env_rank(), type(e).__name__, e,
                         exc_info=True)  # fmt: skip
            distributed.abort()  # the other ranks' collectives fail now instead of at the timeout
            if from_cli:
                raise SystemExit(1) from None
            raise
        except BaseException:  # e.g. Ctrl-C before the training loop installed its handler
            distributed.abort()
            raise
    finally:
        remove_handlers(handlers)
        if owns_process_group:
            distributed.disable()
    if from_cli:
        raise SystemExit(EXIT_INTERRUPTED if result.status == "interrupted" else 0)
    return result


if __name__ == "__main__":
    main()
