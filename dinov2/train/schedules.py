"""Per-iteration schedules of DINOv2 pretraining: lr, weight decay, teacher momentum and temperature.

Every schedule is a table indexed by the global iteration, so resuming at iteration i needs nothing but
i. Epochs are "official" epochs of ``cfg.train.OFFICIAL_EPOCH_LENGTH`` iterations.

Example::

    scheds = build_schedulers(cfg, world_size=8)
    for it in range(start, end):
        apply_optim_scheduler(optimizer, scheds.lr[it], scheds.wd[it], scheds.last_layer_lr[it])
        loss_dict = meta_arch.forward_backward(batch, teacher_temp=scheds.teacher_temp[it])
        ...
        meta_arch.update_teacher(scheds.momentum[it])
"""

from typing import Any, NamedTuple

import numpy as np
import torch

from dinov2.utils import distributed
from dinov2.utils.config import scaled_lr  # noqa: F401 (public here too: DINOv2 users look for it in schedules)


class CosineScheduler:
    """Freeze (zeros) for ``freeze_iters``, linear warm-up from ``start_warmup_value`` to ``base_value``
    over ``warmup_iters`` (both ends included), then a half cosine from ``base_value`` down (or up) to
    ``final_value``; indices at or past ``total_iters`` return ``final_value``.

    The cosine part has length L = total - warmup - freeze and value
    final + (base - final) * (1 + cos(pi * i / L)) / 2 at its i-th iteration.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ):
        total_iters, warmup_iters, freeze_iters = int(total_iters), int(warmup_iters), int(freeze_iters)
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"iteration counts must be >= 0, got total_iters={total_iters}, "
                f"warmup_iters={warmup_iters}, freeze_iters={freeze_iters}"
            )
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed "
                f"total_iters ({total_iters})"
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        n_cos = total_iters - warmup_iters - freeze_iters
        steps = np.arange(n_cos)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cos, 1)))
        self.schedule = np.concatenate((freeze, warmup, cosine))

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, it: int) -> float:
        it = int(it)
        if it < 0:
            raise ValueError(f"schedule index must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])


class Schedulers(NamedTuple):
    """The five DINOv2 schedules; unpacks like DINOv2's tuple
    (lr, wd, momentum, teacher_temp, last_layer_lr)."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler


def peak_lr(cfg: Any, world_size: int | None = None) -> float:
    """``cfg.optim.lr`` when the start-up scaling rule already set it (> 0), else the scaled base lr
    for ``train.batch_size_per_gpu * world_size`` images per iteration."""
    lr = float(getattr(cfg.optim, "lr", 0.0) or 0.0)
    if lr > 0:
        return lr
    world_size = distributed.get_global_size() if world_size is None else int(world_size)
    total = int(cfg.train.batch_size_per_gpu) * world_size
    return scaled_lr(float(cfg.optim.base_lr), str(cfg.optim.scaling_rule), total)


def build_schedulers(cfg: Any, world_size: int | None = None) -> Schedulers:
    """Build the schedules from a DINOv2 config (keys of dinov2/configs/ssl_default_config.yaml).

    Args:
        cfg: config with ``optim``, ``teacher`` and ``train`` sections.
        world_size: number of training processes (default: from torch.distributed, else 1); used only
            when ``optim.lr`` is 0 (not yet set by the scaling rule), see ``peak_lr``.

    Returns:
        Schedulers(lr, wd, momentum, teacher_temp, last_layer_lr):
        lr: linear warm-up 0 -> peak over ``optim.warmup_epochs``, cosine to ``optim.min_lr``.
        wd: cosine ``optim.weight_decay`` -> ``optim.weight_decay_end``.
        momentum: cosine ``teacher.momentum_teacher`` -> ``teacher.final_momentum_teacher``.
        teacher_temp: linear ``teacher.warmup_teacher_temp`` -> ``teacher.teacher_temp`` over
            ``teacher.warmup_teacher_temp_epochs``, then constant.
        last_layer_lr: the lr schedule with its first ``optim.freeze_last_layer_epochs`` set to 0.
    """
    epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    if epoch_len < 1:
        raise ValueError(f"train.OFFICIAL_EPOCH_LENGTH must be >= 1, got {epoch_len}")
    total = int(cfg.optim.epochs) * epoch_len
    if total < 1:
        raise ValueError(f"optim.epochs must be >= 1, got {cfg.optim.epochs}")
    lr_args = dict(
        base_value=peak_lr(cfg, world_size),
        final_value=float(cfg.optim.min_lr),
        total_iters=total,
        warmup_iters=int(cfg.optim.warmup_epochs) * epoch_len,
        start_warmup_value=0.0,
    )
    temp_iters = int(cfg.teacher.warmup_teacher_temp_epochs) * epoch_len
    last_layer_lr = CosineScheduler(**lr_args)
    last_layer_lr.schedule[: int(cfg.optim.freeze_last_layer_epochs) * epoch_len] = 0.0
    return Schedulers(
        lr=CosineScheduler(**lr_args),
        wd=CosineScheduler(float(cfg.optim.weight_decay), float(cfg.optim.weight_decay_end), total),
        momentum=CosineScheduler(
            float(cfg.teacher.momentum_teacher), float(cfg.teacher.final_momentum_teacher), total
        ),
        teacher_temp=CosineScheduler(
            base_value=float(cfg.teacher.teacher_temp),
            final_value=float(cfg.teacher.teacher_temp),
            total_iters=temp_iters,
            warmup_iters=temp_iters,
            start_warmup_value=float(cfg.teacher.warmup_teacher_temp),
        ),
        last_layer_lr=last_layer_lr,
    )


def apply_optim_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float
) -> None:
    """Set every param group's lr and weight decay for this iteration.

    Groups carry ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer`` (see
    dinov2.train.param_groups); missing keys mean 1.0, 1.0 and False. The DINO head's last layer follows
    ``last_layer_lr`` (zero while it is frozen).
    """
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
