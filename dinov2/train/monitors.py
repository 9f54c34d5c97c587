"""What the training loop watches besides the losses: teacher collapse and online kNN accuracy.

Every `train.collapse_check_period_iterations` the teacher's probabilities and CLS embeddings on the
step's global crops give the collapse metrics (dinov2.train.collapse); after the lr warm-up rank 0
judges them against `train.collapse_thresholds` and every rank receives its verdict. After
`train.collapse_stop_after_warnings` consecutive warnings the run stops with `CollapseError`, naming
the last checkpoint and teacher export written before the warnings began (rotation keeps that
checkpoint meanwhile). Every `evaluation.knn_period_iterations` the teacher backbone is scored by
k-NN on a held-out labelled folder (dinov2.train.online_knn).
"""

import logging

import torch
from omegaconf import DictConfig

from dinov2.train import checkpointing
from dinov2.train.checkpointer import Checkpointer, newest_outputs_before
from dinov2.train.collapse import (
    CollapseStreak,
    CollapseThresholds,
    collapse_metrics,
    collapse_warnings_by_metric,
)
from dinov2.train.online_knn import OnlineKNN
from dinov2.utils import distributed

logger = logging.getLogger("dinov2")


class CollapseError(RuntimeError):
    """The collapse monitor warned at train.collapse_stop_after_warnings consecutive checks."""


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


class TrainingMonitors:
    """The collapse check and the online kNN monitor of a run, with the collapse streak's state."""

    def __init__(self, cfg: DictConfig, checkpointer: Checkpointer):
        self.cfg = cfg
        self.checkpointer = checkpointer
        self.streak = CollapseStreak(cfg.train.collapse_stop_after_warnings)
        self.knn = None
        self._warned: list[str] | None = None  # verdict of the last collapse check, until judged
        if cfg.evaluation.knn_period_iterations > 0:
            self.knn = OnlineKNN(cfg.evaluation.knn_dataset_path, cfg.crops.global_crops_size,
                                 cfg.evaluation.knn_max_images, seed=cfg.train.seed)  # fmt: skip

    def due(self, it: int) -> bool:
        """True when a monitor runs after `it` completed iterations."""
        periods = (self.cfg.train.collapse_check_period_iterations, self.cfg.evaluation.knn_period_iterations)
        return any(p > 0 and it % p == 0 for p in periods)

    def run(self, model, data: dict, it: int, teacher_temp: float, device) -> dict:
        """Collapse metrics and kNN accuracy due at `it` (collective); the metrics to log."""
        cfg = self.cfg
        out, warned = {}, None
        period = cfg.train.collapse_check_period_iterations
        if period > 0 and it % period == 0:
            images = data["collated_global_crops"].to(device)
            out.update(teacher_collapse_metrics(model, images, teacher_temp, cfg))
            # Not during the lr warm-up: at initialisation LayerScale (1e-5) makes every image's
            # embedding nearly the same, which is not collapse.
            if it > cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH:
                reasons = {}
                if distributed.is_main_process():
                    reasons = collapse_warnings_by_metric(
                        out, CollapseThresholds(**cfg.train.collapse_thresholds)
                    )
                    for reason in reasons.values():
                        logger.warning("possible collapse at iteration %d: %s", it, reason)
                warned = distributed.broadcast_object(list(reasons))
        if self.knn is not None and it % cfg.evaluation.knn_period_iterations == 0:
            out.update(self.knn.evaluate(model.teacher["backbone"], device))
        self._warned = warned
        return out

    def judge(self, it: int) -> None:
        """After the metrics of `it` are logged: count its collapse check, if one counted (collective).

        Raises CollapseError when the run must stop. While a streak lasts (and stopping is on) the
        newest checkpoint written before its first warning is kept from rotation (`protect`).
        """
        warned, self._warned = self._warned, None
        if warned is not None:
            self.checkpointer.protect = self._track_collapse(warned, it)

    def _track_collapse(self, warned: list[str], it: int) -> tuple[int, ...]:
        streak, output_dir = self.streak, self.checkpointer.output_dir
        first_warning = bool(warned) and not streak.started
        if streak.update(it, warned):
            kept = newest_outputs_before(output_dir, streak.iterations[0])
            checkpoint, export = distributed.broadcast_object(kept)  # rank 0 wrote them
            raise CollapseError(
                f"stopping: the collapse monitor {streak.describe()} "
                f"(train.collapse_stop_after_warnings={self.cfg.train.collapse_stop_after_warnings}); "
                f"last good checkpoint: {checkpoint or 'none written before the warnings'}; "
                f"last good teacher export: {export or 'none written before the warnings'}"
            )
        if not streak.started:
            return ()
        if first_warning and streak.stop_after > 0:
            checkpoint, _ = newest_outputs_before(output_dir, it)
            return (checkpointing.checkpoint_iteration(checkpoint),) if checkpoint else ()
        return self.checkpointer.protect
