"""One training iteration: schedules, forward/backward, gradient sync, loss check, clip, AdamW, EMA.

The step makes one host-device synchronisation: the losses, reduced over processes on the device,
are checked for finiteness together with the preemption flags of every process, which ride in the
same all_reduce, in one small `.tolist()`. The loss values themselves are read (a second
synchronisation) only at log steps. With `StepContext.timed` the step also synchronises the device
between its phases and returns their durations (log steps only: each synchronisation drains the
device's queue and would cost throughput on every step).

Example::

    ctx = StepContext(grad_sync=GradientSync(model.student.parameters()), preemption=flag)
    out = train_step(model, optimizer, scaler, ctx, batch, schedules, it, cfg)
    if out.stop: ...  # some process caught SIGTERM/SIGUSR2/SIGINT: checkpoint and return
"""

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from dinov2.train.schedules import apply_optim_scheduler
from dinov2.utils import distributed

logger = logging.getLogger("dinov2")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the last finite state was saved before raising."""


@dataclass
class StepContext:
    """What a training step needs besides the model, its optimizer and the batch."""

    grad_sync: object | None = None
    """A GradientSync (ddp, or fsdp's NO_SHARD parts): finish() waits for the overlapped all_reduce."""
    preemption: object | None = None
    """A PreemptionFlag whose signals are agreed on through the step's loss all_reduce."""
    timed: bool = False
    """Synchronise the device between phases and time them (set at log steps only)."""


@dataclass
class StepOutput:
    """What one step returns."""

    losses: torch.Tensor
    """Losses averaged over processes, still on the device (names in `loss_names`)."""
    loss_names: list[str]
    grad_norms: dict[str, torch.Tensor]
    """Pre-clipping gradient norm per student part (tensors: read them at log steps only)."""
    stop: bool = False
    """True on every process when any process caught a preemption signal (or Ctrl-C)."""
    times: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (forward_backward_time, grad_sync_time, optimizer_time) when timed."""

    def loss_values(self) -> dict[str, float]:
        """The losses as Python floats (a host-device synchronisation: call at log steps)."""
        return dict(zip(self.loss_names, self.losses.tolist()))


class PhaseTimer:
    """Wall-clock durations of consecutive phases, the device synchronised at each boundary."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled
        self.times: dict[str, float] = {}
        self._t = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type != "cpu" and hasattr(torch, self.device.type):
            getattr(torch, self.device.type).synchronize()

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        """End the current phase, recording its duration as `name`."""
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.times[name] = now - self._t
            self._t = now


def discard_pending_center_updates(model) -> None:
    """Drop the lazy center updates (`model.centers()`) started by a step whose loss was not finite
    (they hold its NaNs). Collective when distributed: every process discards, as all agree on the
    loss check."""
    for center in model.centers():
        center.discard()


def _reduce_and_check(loss_dict: dict[str, torch.Tensor], flag) -> tuple[list[str], torch.Tensor, bool, bool]:
    """(names, losses averaged over processes, all finite, any process caught a signal).

    One all_reduce carries the losses (summed, then divided by the world size) and the preemption
    flags (a sum > 0 means some process caught that signal); one `.tolist()` of the finiteness and
    the flags is the step's only host-device synchronisation.
    """
    names = list(loss_dict)
    device = loss_dict[names[0]].device
    losses = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
    n_flags = len(flag.signals) if flag is not None else 0
    flags = torch.zeros(n_flags, device=device)
    for i, caught in enumerate(flag.local_flags() if flag is not None else []):
        if caught:
            flags[i] = 1.0  # a fill on the device, no host-to-device copy
    values = torch.cat((losses, flags))
    world = distributed.get_global_size()
    if world > 1:
        torch.distributed.all_reduce(values)
        values = torch.cat((values[: len(names)] / world, values[len(names) :]))
    losses = values[: len(names)]
    checks = torch.cat((torch.isfinite(losses).all().reshape(1).float(), values[len(names) :])).tolist()
    stop = flag.merge_flags(checks[1:]) if flag is not None else False
    return names, losses, checks[0] > 0.5, stop


def train_step(
    model, optimizer, scaler, ctx: StepContext | None, data: dict, schedules, it: int, cfg: DictConfig
):
    """Iteration `it`: teacher targets, student predictions, losses, backward, sync, clip, step, EMA.

    Returns a StepOutput. Raises NonFiniteLossError naming the bad terms before any weight, optimizer
    state or loss center has changed.
    """
    ctx = ctx or StepContext()
    device = next(model.student.parameters()).device
    timer = PhaseTimer(device, ctx.timed)
    timer.start()
    apply_optim_scheduler(optimizer, schedules.lr[it], schedules.wd[it], schedules.last_layer_lr[it])
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(data, teacher_temp=schedules.teacher_temp[it], grad_scaler=scaler)
    timer.mark("forward_backward_time")
    if ctx.grad_sync is not None:
        ctx.grad_sync.finish()
    names, losses, finite, stop = _reduce_and_check(loss_dict, ctx.preemption)
    timer.mark("grad_sync_time")
    if not finite:
        discard_pending_center_updates(model)
        optimizer.zero_grad(set_to_none=True)
        bad = [f"{k}={v}" for k, v in zip(names, losses.tolist()) if not math.isfinite(v)]
        raise NonFiniteLossError(f"non-finite loss at iteration {it}: " + ", ".join(bad))
    grad_norms = optimizer_step(model, optimizer, scaler, None, cfg.optim.clip_grad)
    model.update_teacher(schedules.momentum[it])
    timer.mark("optimizer_time")
    return StepOutput(losses, names, grad_norms, stop, timer.times)


def build_optimizer(model, optim_cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups with the betas of `optim_cfg` (cfg.optim): the fused
    kernel where torch has one for the parameters' device (CUDA, CPU), else the foreach
    implementation. The fused kernel keeps its step counters on the device, so the step reads
    nothing back to the host."""
    groups = model.get_params_groups()
    betas = (optim_cfg.adamw_beta1, optim_cfg.adamw_beta2)
    try:
        return torch.optim.AdamW(groups, betas=betas, fused=True)
    except RuntimeError as error:  # a device (or tensor type) without the fused kernel
        logger.info("AdamW: no fused kernel here (%s); using the foreach implementation", error)
        return torch.optim.AdamW(groups, betas=betas, foreach=True)


def optimizer_step(model, optimizer, scaler, grad_sync, clip_grad: float) -> dict[str, torch.Tensor]:
    """After backward: finish the gradient sync (when given), unscale (fp16), clip each part, step.

    Returns the pre-clipping gradient norm of each student part (`grad_norm_<part>`).
    """
    if grad_sync is not None:
        grad_sync.finish()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grad_norms = {}
    if clip_grad > 0:
        # Per part, as DINOv2 does: a large head gradient must not shrink the backbone's.
        for name, part in model.student.items():
            params = [p for p in part.parameters() if p.grad is not None]
            if params:
                grad_norms[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norms
