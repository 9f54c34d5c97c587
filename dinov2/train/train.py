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

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (python/torchrun dinov2/train/train.py): import the package from the repository
    # root, not from this folder, whose module names must not shadow anything.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from dinov2.data.augmentations import ColorAugmentation, DataAugmentationDINO  # noqa: E402
from dinov2.data.collate import collate_data_and_cast  # noqa: E402
from dinov2.data.loaders import make_data_loader, make_train_dataset, stop_workers  # noqa: E402
from dinov2.data.masking import MaskingGenerator  # noqa: E402
from dinov2.data.samplers import ShardedInfiniteSampler  # noqa: E402
from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer  # noqa: E402
from dinov2.train import checkpointing  # noqa: E402
from dinov2.train.collapse import (  # noqa: E402
    CollapseStreak,
    CollapseThresholds,
    collapse_metrics,
    collapse_warnings_by_metric,
)
from dinov2.train.distributed_wrap import (  # noqa: E402
    GradientSync,
    apply_fsdp2,
    broadcast_module_state_,
    check_compile_supported,
    compile_backbones,
)
from dinov2.train.metrics_logger import MetricsLogger, peak_memory_mb  # noqa: E402
from dinov2.train.online_knn import OnlineKNN  # noqa: E402
from dinov2.train.precision import apply_device_precision, crop_transfer_dtype  # noqa: E402
from dinov2.train.preemption import DEFAULT_SIGNALS, PreemptionFlag  # noqa: E402
from dinov2.train.schedules import build_schedulers  # noqa: E402
from dinov2.train.ssl_meta_arch import SSLMetaArch  # noqa: E402
from dinov2.train.step import (  # noqa: E402, F401
    NonFiniteLossError,
    StepContext,
    build_optimizer,
    optimizer_step,
    train_step,
)
from dinov2.utils import distributed  # noqa: E402
from dinov2.utils.config import ConfigError, setup_config  # noqa: E402
from dinov2.utils.logging import remove_handlers, setup_logging  # noqa: E402
from dinov2.utils.signals import die_with_parent  # noqa: E402

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


class CollapseError(RuntimeError):
    """The collapse monitor warned at train.collapse_stop_after_warnings consecutive checks."""


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


# ---------------------------------------------------------------------------------------------- setup
def fix_random_seeds(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_data(cfg: DictConfig, info: distributed.DistributedInfo, start_position: int):
    """(dataset, sampler, loader) for this rank, continuing the sample stream at `start_position`."""
    augmentation = DataAugmentationDINO(
        cfg.crops.global_crops_scale,
        cfg.crops.local_crops_scale,
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
        stain_jitter=cfg.crops.stain_jitter,
        color_augmentation=ColorAugmentation(**cfg.crops.color_augmentation),
        blur_prob=tuple(cfg.crops.blur_prob),
    )
    dataset = make_train_dataset(cfg.train, augmentation)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    collate = partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=crop_transfer_dtype(cfg, info.device.type),  # what autocast / FSDP2 would cast to
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid)),
    )
    sampler = ShardedInfiniteSampler(
        len(dataset),
        cfg.train.batch_size_per_gpu,
        world_size=info.world_size,
        rank=info.rank,
        seed=cfg.train.seed,
        start_position=start_position,
    )
    loader = make_data_loader(
        dataset,
        sampler,
        collate,
        cfg.train.num_workers,
        cfg.train.seed,
        pin_memory=info.device.type == "cuda",
    )
    return dataset, sampler, loader


def build_backbones(cfg: DictConfig) -> tuple[DinoVisionTransformer, DinoVisionTransformer] | None:
    """(student, teacher) backbones when cfg.student overrides embed_dim / depth / num_heads of its
    arch (small CPU models), else None so that SSLMetaArch builds cfg.student.arch as DINOv2 does."""
    s = cfg.student
    sizes = {k: s[k] for k in ("embed_dim", "depth", "num_heads") if s[k] is not None}
    if not sizes:
        return None
    kwargs = dict(
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        init_values=s.layerscale,
        ffn_layer=s.ffn_layer,
        block_chunks=s.block_chunks,
        qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens,
        interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
        **sizes,
    )
    arch = ARCHS[s.arch]
    teacher = arch(**kwargs)  # no stochastic depth in the teacher
    student = arch(**kwargs, drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform)
    return student, teacher


def build_model(cfg: DictConfig, device: torch.device) -> SSLMetaArch:
    """The SSLMetaArch of `cfg` on `device`, in train mode."""
    model = SSLMetaArch(cfg, backbones=build_backbones(cfg)).to(device)
    model.train()
    return model


# ------------------------------------------------------------------------------------------- state
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def training_state(model, optimizer, scaler, sampler, iteration, steps_done, cfg, rng_state=None) -> dict:
    """The checkpoint dict (collective: every rank must call; only rank 0's result is complete)."""
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng_states = distributed.all_gather_object(rng_state or checkpointing.capture_rng_state())
    from omegaconf import OmegaConf

    return {
        "model": model_state,
        "optimizer": optim_state,
        "iteration": iteration,
        "sampler": sampler.state_dict(steps_done),
        "rng": rng_states,
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "world_size": distributed.get_global_size(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _write_on_main_process(write, what: str, kept) -> None:
    """Rank 0 runs `write()` (returns the path written); every rank learns whether it worked.

    A collective in place of a barrier: when the write fails (disk full, no permission), every rank
    raises the same CheckpointWriteError naming the file, instead of rank 0 dying alone while the
    others wait for it. `kept()` describes what is still on disk, for the message.
    """
    failure = None
    if distributed.is_main_process():
        try:
            logger.info("%s: %s", what, write())
        except checkpointing.CheckpointWriteError as e:
            failure = (e.errno, e.strerror, e.filename, kept())
            logger.error("could not write %s (%s); %s", e.filename, e.strerror, failure[3])
    failure = distributed.broadcast_object(failure)
    if failure is not None:
        raise checkpointing.CheckpointWriteError(*failure[:3])


def save_training_checkpoint(state: dict, cfg: DictConfig, protect: tuple[int, ...] = ()) -> None:
    """Rank 0 writes `state` atomically (checkpoints of iterations in `protect` survive rotation)."""
    checkpoint_dir = Path(cfg.train.output_dir) / "checkpoints"

    def kept() -> str:
        found = checkpointing.list_checkpoints(checkpoint_dir)
        return f"the previous checkpoint {found[-1][1]} is intact" if found else "no earlier checkpoint"

    _write_on_main_process(
        lambda: checkpointing.save_checkpoint(state, checkpoint_dir, cfg.train.checkpoint_keep, protect),
        "checkpoint saved",
        kept,
    )


def export_teacher(model, cfg: DictConfig, iteration: int) -> None:
    """eval/<iteration>/teacher_checkpoint.pth in Meta's format (collective for FSDP)."""
    teacher_state = get_model_state_dict(model.teacher, options=_FULL)
    _write_on_main_process(
        lambda: checkpointing.export_teacher(teacher_state, cfg.train.output_dir, iteration, cfg.student),
        "teacher exported",
        lambda: "earlier teacher exports are intact",
    )


def newest_outputs_before(output_dir: Path, iteration: int) -> tuple[Path | None, Path | None]:
    """(newest training checkpoint, newest teacher export) written before `iteration`, or None."""
    found = checkpointing.list_checkpoints(output_dir / "checkpoints")
    checkpoints = [path for it, path in found if it < iteration]
    exports = [(it, path) for it, path in checkpointing.list_teacher_exports(output_dir) if it < iteration]
    return (checkpoints[-1] if checkpoints else None), (exports[-1][1] if exports else None)


# ------------------------------------------------------------------------------------------ monitors
@torch.no_grad()
def teacher_collapse_metrics(model, images: torch.Tensor, teacher_temp: float, cfg: DictConfig) -> dict:
    """Collapse metrics of the teacher on one batch of global crops (collective with Sinkhorn-Knopp)."""
    cls = model.teacher["backbone"](images)
    logits = model.teacher["dino_head"](cls)
    if cfg.train.centering == "sinkhorn_knopp":
        probs = model.dino_loss.sinkhorn_knopp_teacher(logits, teacher_temp)
    else:
        probs = model.dino_loss.softmax_center_teacher(logits, teacher_temp)
    return collapse_metrics(probs.float(), cls.float())


def run_monitors(
    model, data: dict, it: int, teacher_temp: float, knn, cfg: DictConfig, device
) -> tuple[dict, list[str] | None]:
    """Collapse metrics and online kNN accuracy when `it` is a multiple of their periods (collective).

    Returns (metrics to log, names of the collapse metrics that warned), the latter None when no
    collapse check counted at `it` (none due, or still in the lr warm-up). Rank 0 judges its batch
    and every rank gets its verdict, so all ranks stop together on a collapse.
    """
    out = {}
    warned = None
    period = cfg.train.collapse_check_period_iterations
    if period > 0 and it % period == 0:
        out.update(
            teacher_collapse_metrics(model, data["collated_global_crops"].to(device), teacher_temp, cfg)
        )
        # Not during the lr warm-up: at initialisation LayerScale (1e-5) makes every image's
        # embedding nearly the same, which is not collapse.
        if it > cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH:
            reasons = {}
            if distributed.is_main_process():
                thresholds = CollapseThresholds(**cfg.train.collapse_thresholds)
                reasons = collapse_warnings_by_metric(out, thresholds)
                for reason in reasons.values():
                    logger.warning("possible collapse at iteration %d: %s", it, reason)
            warned = distributed.broadcast_object(list(reasons))
    if knn is not None and it % cfg.evaluation.knn_period_iterations == 0:
        out.update(knn.evaluate(model.teacher["backbone"], device))
    return out, warned


def track_collapse(
    streak: CollapseStreak, warned: list[str], it: int, output_dir: Path, cfg: DictConfig, protect: tuple
) -> tuple[int, ...]:
    """Count the collapse check at `it`; raise CollapseError when the run must stop (collective).

    Returns the checkpoint iterations that rotation must keep: while a streak lasts (and stopping is
    on), the newest checkpoint written before its first warning.
    """
    first_warning = bool(warned) and not streak.started
    if streak.update(it, warned):
        kept = newest_outputs_before(output_dir, streak.iterations[0])
        checkpoint, export = distributed.broadcast_object(kept)  # rank 0 wrote them
        raise CollapseError(
            f"stopping: the collapse monitor {streak.describe()} "
            f"(train.collapse_stop_after_warnings={cfg.train.collapse_stop_after_warnings}); "
            f"last good checkpoint: {checkpoint or 'none written before the warnings'}; "
            f"last good teacher export: {export or 'none written before the warnings'}"
        )
    if not streak.started:
        return ()
    if first_warning and streak.stop_after > 0:
        checkpoint, _ = newest_outputs_before(output_dir, it)
        return (checkpointing.checkpoint_iteration(checkpoint),) if checkpoint else ()
    return protect


# ---------------------------------------------------------------------------------------------- main
def do_train(
    cfg: DictConfig, model: SSLMetaArch, info: distributed.DistributedInfo, resume: bool
) -> TrainResult:
    """The training loop: schedules, steps, logs, checkpoints and monitors."""
    output_dir = Path(cfg.train.output_dir)
    device = info.device
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    total_iters = cfg.optim.epochs * epoch_len
    end_iter = min(total_iters, cfg.train.max_iterations or total_iters)

    # Resume (full state, loaded before sharding so every process starts from the same weights).
    checkpoint = None
    if resume:
        found = checkpointing.load_latest_valid(output_dir / "checkpoints")
        if found is not None:
            checkpoint, path = found
            logger.info("resuming from %s (iteration %d)", path, checkpoint["iteration"])
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    else:
        broadcast_module_state_(model)
    start_iter = checkpoint["iteration"] if checkpoint is not None else 0

    if cfg.train.compile:
        compile_backbones(model)  # before sharding: FSDP2's hooks then wrap the compiled blocks
    synced = list(model.student.parameters()) if cfg.train.distributed == "ddp" else []
    if cfg.train.distributed == "fsdp" and info.world_size > 1:
        synced = apply_fsdp2(model, cfg.compute_precision)  # the NO_SHARD parts, if any
        model.autocast_dtype = None  # FSDP2's MixedPrecisionPolicy casts instead
    warmup_iters = cfg.student.head_warmup_iterations
    if warmup_iters and not cfg.student.pretrained_weights:
        logger.warning(
            "student.head_warmup_iterations=%d freezes a randomly initialised backbone "
            "(it is meant for continued pretraining with student.pretrained_weights)",
            warmup_iters,
        )
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=model_uses_fp16(cfg) and device.type == "cuda")
    if checkpoint is not None:
        set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=_FULL_LOAD)
        if checkpoint.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["grad_scaler"])
    # Gradients are all-reduced from hooks while backward runs (FSDP2 reduces the sharded parts).
    grad_sync = GradientSync(synced) if synced and info.world_size > 1 else None
    schedules = build_schedulers(cfg, info.world_size)

    start_position = checkpoint["sampler"]["position"] if checkpoint is not None else 0
    dataset, sampler, loader = build_data(cfg, info, start_position)
    if checkpoint is not None:
        sampler.load_state_dict(checkpoint["sampler"])
        restore_rank_rng(checkpoint, info, cfg)
    del checkpoint

    knn = None
    if cfg.evaluation.knn_period_iterations > 0:
        knn = OnlineKNN(cfg.evaluation.knn_dataset_path, cfg.crops.global_crops_size,
                        cfg.evaluation.knn_max_images, seed=cfg.train.seed)  # fmt: skip
    metrics_log = MetricsLogger(output_dir, end_iter, enabled=distributed.is_main_process())
    global_batch = sampler.global_batch_size
    logger.info("training %d -> %d of %d iterations, %d images per iteration, %d training images",
                start_iter, end_iter, total_iters, global_batch, len(dataset))  # fmt: skip

    # SIGINT too: the first Ctrl-C stops at the next step boundary like a preemption, a second one
    # ends the process at once.
    flag = PreemptionFlag(signals=(*DEFAULT_SIGNALS, signal.SIGINT))
    streak = CollapseStreak(cfg.train.collapse_stop_after_warnings)
    protect: tuple[int, ...] = ()  # the last checkpoint before a collapse streak survives rotation
    it = start_iter
    saved_at = None  # iteration of the last checkpoint this run wrote
    frozen = None
    window = {"iter_time": 0.0, "data_time": 0.0, "n": 0}
    ctx = StepContext(grad_sync=grad_sync, preemption=flag)
    stop = False  # set by a step when any process caught a signal (agreed through its all_reduce)
    data_iter = None
    try:
        data_iter = iter(loader)
        while it < end_iter:
            if stop:
                if saved_at != it:  # not already saved by the periodic checkpoint of this iteration
                    state = training_state(model, optimizer, scaler, sampler, it, it - start_iter, cfg)
                    save_training_checkpoint(state, cfg, protect)
                status = "interrupted" if flag.interrupted() else "preempted"
                logger.warning("%s at iteration %d: checkpoint saved, exiting", status, it)
                return TrainResult(status, it, str(output_dir))
            if frozen != (it < warmup_iters):
                frozen = it < warmup_iters
                model.freeze_backbone(frozen)
                logger.info("student backbone %s at iteration %d", "frozen" if frozen else "trainable", it)

            rng_before = checkpointing.capture_rng_state()
            t0 = time.perf_counter()
            data = next(data_iter)
            t_data = time.perf_counter() - t0

            teacher_temp = schedules.teacher_temp[it]
            try:
                # Timed steps synchronise the device: only where a log line is due anyway.
                ctx.timed = log_due(it + 1, end_iter, cfg)
                out = train_step(model, optimizer, scaler, ctx, data, schedules, it, cfg)
            except NonFiniteLossError as error:
                # Nothing was updated: save the state from before this iteration, then stop.
                state = training_state(
                    model, optimizer, scaler, sampler, it, it - start_iter, cfg, rng_before
                )
                save_training_checkpoint(state, cfg, protect)
                saved = output_dir / "checkpoints" / checkpointing.checkpoint_name(it)
                raise NonFiniteLossError(f"{error}; the last finite state (before this iteration) was saved "
                                         f"to {saved}") from None  # fmt: skip
            it += 1
            stop = out.stop

            window["iter_time"] += time.perf_counter() - t0
            window["data_time"] += t_data
            window["n"] += 1
            extra, warned = run_monitors(model, data, it, teacher_temp, knn, cfg, device)
            if log_due(it, end_iter, cfg) or extra:
                # Since the last timed step every step's device work has finished, so the window's
                # time is the device's too, not only the host's.
                n = window["n"]
                iter_time = window["iter_time"] / n
                record = {
                    "epoch": it / epoch_len,
                    **out.loss_values(),
                    "lr": schedules.lr[it - 1],
                    "wd": schedules.wd[it - 1],
                    "momentum": schedules.momentum[it - 1],
                    "teacher_temp": teacher_temp,
                    "last_layer_lr": schedules.last_layer_lr[it - 1],
                    **{k: float(v) for k, v in out.grad_norms.items()},
                    **extra,
                    "iter_time": iter_time,
                    "data_time": window["data_time"] / n,
                    **out.times,  # this step's forward_backward_time, grad_sync_time, optimizer_time
                    "images_per_second": global_batch / iter_time,
                    "peak_memory_mb": peak_memory_mb(device),
                }
                metrics_log.log(it, record, seconds_per_iteration=iter_time)
                window = {"iter_time": 0.0, "data_time": 0.0, "n": 0}
            if warned is not None:
                protect = track_collapse(streak, warned, it, output_dir, cfg, protect)
            if cfg.evaluation.eval_period_iterations > 0 and it % cfg.evaluation.eval_period_iterations == 0:
                export_teacher(model, cfg, it)
            if it % cfg.train.checkpoint_period_iterations == 0 or it == end_iter:
                state = training_state(model, optimizer, scaler, sampler, it, it - start_iter, cfg)
                save_training_checkpoint(state, cfg, protect)
                saved_at = it
        if not (output_dir / "eval" / str(it) / "teacher_checkpoint.pth").is_file():
            export_teacher(model, cfg, it)  # the final teacher is always exported
        if it == start_iter:
            logger.info("nothing to do: the checkpoint is already at the last iteration (%d)", it)
        logger.info("training completed at iteration %d", it)
        return TrainResult("completed", it, str(output_dir))
    finally:
        try:
            if data_iter is not None:
                stop_workers(data_iter)  # they ignore SIGTERM: leaving them to exit handlers would hang
        finally:
            flag.uninstall()
            metrics_log.close()
            if grad_sync is not None:
                grad_sync.close()


_FULL_LOAD = StateDictOptions(full_state_dict=True)


def log_due(it: int, end_iter: int, cfg: DictConfig) -> bool:
    """True when a metrics line is written after `it` completed iterations (log period, last
    iteration, or a collapse / kNN monitor)."""
    periods = (cfg.train.log_period_iterations, cfg.train.collapse_check_period_iterations,
               cfg.evaluation.knn_period_iterations)  # fmt: skip
    return it == end_iter or any(p > 0 and it % p == 0 for p in periods)


def model_uses_fp16(cfg: DictConfig) -> bool:
    """True when any student part computes in fp16 (loss scaling is then needed)."""
    return cfg.compute_precision.grad_scaler and any(
        part.mixed_precision.param_dtype == "fp16" for part in cfg.compute_precision.student.values()
    )


def restore_rank_rng(checkpoint: dict, info: distributed.DistributedInfo, cfg: DictConfig) -> None:
    """Restore this rank's RNG states; with another world size, reseed from (seed, rank, iteration)."""
    states = checkpoint.get("rng") or []
    if len(states) == info.world_size:
        checkpointing.restore_rng_state(states[info.rank])
        return
    logger.warning(
        "checkpoint was written by %d processes, this run has %d: data order continues exactly, "
        "but stochastic depth and other model randomness are reseeded",
        len(states),
        info.world_size,
    )
    fix_random_seeds(cfg.train.seed + 1_000_003 * (info.rank + 1) + checkpoint["iteration"])


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
