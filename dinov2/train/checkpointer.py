"""The training state of a run: what a checkpoint holds, how it is restored, saved and exported.

`Checkpointer` owns <output_dir>/checkpoints and <output_dir>/eval for one run. It finds the newest
valid checkpoint, restores the model (before sharding, so every process starts from the same
weights) and then the optimizer, grad scaler, sampler position and per-rank RNG states; it builds
the training-state dict (collectively: every rank calls, rank 0's copy is complete), has rank 0
write it atomically with rotation, and exports the teacher in Meta's format. File-level operations
(names, atomic writes, retention, RNG capture) live in `dinov2.train.checkpointing`.

Usage, in the training loop::

    checkpointer = Checkpointer(cfg)
    checkpoint = checkpointer.load_latest() if resume else None
    checkpointer.restore_model(model, checkpoint)            # before compile / FSDP2
    ...build the optimizer, scaler and data...
    checkpointer.attach(model, optimizer, scaler, sampler, start_iter)
    checkpointer.restore_training(checkpoint, info)           # optimizer, scaler, sampler, RNG
    checkpointer.save(it)                                     # collective
    checkpointer.export_teacher(it)                           # collective
"""

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from dinov2.train import checkpointing
from dinov2.train.distributed_wrap import broadcast_module_state_
from dinov2.utils import distributed
from dinov2.utils.utils import fix_random_seeds

logger = logging.getLogger("dinov2")

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0's CPU
_FULL_LOAD = StateDictOptions(full_state_dict=True)


class Checkpointer:
    """Restore, save and export the training state of the run in `cfg.train.output_dir`.

    Attributes:
        protect: iterations whose checkpoints rotation must keep (the last one before a collapse
            streak started); the training loop updates it.
        saved_at: the iteration of the last checkpoint this run wrote, or None.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.protect: tuple[int, ...] = ()
        self.saved_at: int | None = None
        self._parts = None

    # ------------------------------------------------------------------------------ restoring
    def load_latest(self) -> dict | None:
        """The newest checkpoint of the run that loads (unreadable ones are skipped), or None."""
        found = checkpointing.load_latest_valid(self.checkpoint_dir)
        if found is None:
            return None
        checkpoint, path = found
        logger.info("resuming from %s (iteration %d)", path, checkpoint["iteration"])
        return checkpoint

    @staticmethod
    def restore_model(model, checkpoint: dict | None) -> int:
        """Load the checkpoint's weights (or give every process rank 0's fresh ones); returns the
        iteration to start from. Call before sharding or compiling the model."""
        if checkpoint is None:
            broadcast_module_state_(model)
            return 0
        model.load_state_dict(checkpoint["model"])
        return int(checkpoint["iteration"])

    def attach(self, model, optimizer, scaler, sampler, start_iter: int) -> None:
        """Name the objects whose state a checkpoint holds (once they are built)."""
        self._parts = (model, optimizer, scaler, sampler, start_iter)

    def restore_training(self, checkpoint: dict | None, info: distributed.DistributedInfo) -> None:
        """Restore the optimizer, grad scaler, sampler and this rank's RNG states of `checkpoint`."""
        if checkpoint is None:
            return
        model, optimizer, scaler, sampler, _ = self._attached()
        set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=_FULL_LOAD)
        if checkpoint.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["grad_scaler"])
        sampler.load_state_dict(checkpoint["sampler"])
        restore_rank_rng(checkpoint, info, self.cfg.train.seed)

    # -------------------------------------------------------------------------------- saving
    def state(self, iteration: int, rng_state: dict | None = None) -> dict:
        """The checkpoint dict at `iteration` (collective: every rank must call; only rank 0's result
        is complete). `rng_state` replaces this rank's current RNG states (e.g. from before a step)."""
        model, optimizer, scaler, sampler, start_iter = self._attached()
        model_state = get_model_state_dict(model, options=_FULL)
        optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
        rng_states = distributed.all_gather_object(rng_state or checkpointing.capture_rng_state())
        return {
            "model": model_state,
            "optimizer": optim_state,
            "iteration": iteration,
            "sampler": sampler.state_dict(iteration - start_iter),
            "rng": rng_states,
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "world_size": distributed.get_global_size(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self, iteration: int, rng_state: dict | None = None) -> Path:
        """Write the checkpoint of `iteration` from rank 0, keeping the newest `train.checkpoint_keep`
        (and those in `protect`); collective. Returns the checkpoint's path."""
        state = self.state(iteration, rng_state)
        keep = self.cfg.train.checkpoint_keep
        _write_on_main_process(
            lambda: checkpointing.save_checkpoint(state, self.checkpoint_dir, keep, self.protect),
            "checkpoint saved",
            self._describe_kept,
        )
        self.saved_at = iteration
        return self.checkpoint_dir / checkpointing.checkpoint_name(iteration)

    def export_teacher(self, iteration: int) -> None:
        """eval/<iteration>/teacher_checkpoint.pth in Meta's format (collective for FSDP)."""
        model = self._attached()[0]
        teacher_state = get_model_state_dict(model.teacher, options=_FULL)
        _write_on_main_process(
            lambda: checkpointing.export_teacher(teacher_state, self.output_dir, iteration, self.cfg.student),
            "teacher exported",
            lambda: "earlier teacher exports are intact",
        )

    def teacher_exported(self, iteration: int) -> bool:
        return (self.output_dir / "eval" / str(iteration) / "teacher_checkpoint.pth").is_file()

    def _describe_kept(self) -> str:
        found = checkpointing.list_checkpoints(self.checkpoint_dir)
        return f"the previous checkpoint {found[-1][1]} is intact" if found else "no earlier checkpoint"

    def _attached(self):
        if self._parts is None:
            raise RuntimeError("Checkpointer.attach(model, optimizer, scaler, sampler, start_iter) first")
        return self._parts


def newest_outputs_before(output_dir: Path, iteration: int) -> tuple[Path | None, Path | None]:
    """(newest training checkpoint, newest teacher export) of a run written before `iteration`."""
    found = checkpointing.list_checkpoints(Path(output_dir) / "checkpoints")
    checkpoints = [path for it, path in found if it < iteration]
    exports = [(it, path) for it, path in checkpointing.list_teacher_exports(output_dir) if it < iteration]
    return (checkpoints[-1] if checkpoints else None), (exports[-1][1] if exports else None)


def restore_rank_rng(checkpoint: dict, info: distributed.DistributedInfo, seed: int) -> None:
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
    fix_random_seeds(seed + 1_000_003 * (info.rank + 1) + checkpoint["iteration"])


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
