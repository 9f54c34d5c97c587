"""DINO image-level self-distillation loss on the CLS token (Caron et al. 2021; Oquab et al. 2023).

The teacher's prototype scores for a global crop are turned into a target distribution, either by
softmax-centering (subtract an EMA "center", divide by a low temperature, softmax) or by a few
Sinkhorn-Knopp iterations (DINOv2's default for large runs). The student's scores for another crop of
the same image are compared with it by cross-entropy:

    H(t, s) = - sum_k t_k * log_softmax(s / student_temp)_k

Example::

    loss_fn = DINOLoss(out_dim=65536)
    targets = loss_fn.softmax_center_teacher(teacher_logits, teacher_temp=0.07)  # [2, B, K] ok too
    loss = loss_fn([student_logits], [targets])
    loss_fn.update_center(teacher_logits)  # applied lazily at the next softmax_center_teacher call
"""

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.loss.center import CenterUpdate, apply_center_update_before_state_dict
from dinov2.utils.distributed import get_global_size, is_enabled


def _check_student_temp(student_temp: float) -> None:
    if not student_temp > 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")


def _check_teacher_temp(teacher_temp: float) -> None:
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")


def sinkhorn_knopp(
    scores: Tensor, teacher_temp: float, n_samples_total: Tensor | int, n_iterations: int = 3
) -> Tensor:
    """Sinkhorn-Knopp equipartition of teacher scores (SwAV; DINOv2's ``sinkhorn_knopp`` centering).

    Finds Q ~ exp(scores / teacher_temp) rescaled so that, over all ranks, every prototype receives the
    same total mass 1/K and every sample 1/B; the returned rows (one per local sample) then sum to 1.

    Args:
        scores: [n, K] teacher logits of the local samples (any float dtype; computed in float32).
        teacher_temp: sharpening temperature (> 0).
        n_samples_total: B, the number of samples summed over all ranks (int or 1-element tensor).
        n_iterations: number of (row, column) normalisation rounds.

    Returns:
        [n, K] float32 assignment, rows summing to 1.

    Collective: when a process group is initialised, every rank must call this (all_reduces of the
    total mass and of the per-prototype masses).
    """
    _check_teacher_temp(teacher_temp)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_samples, n_prototypes], got shape {tuple(scores.shape)}")
    if n_iterations < 0:
        raise ValueError(f"n_iterations must be >= 0, got {n_iterations}")
    # The normalisations run in the log domain: the same algorithm as SwAV/DINOv2's exp-then-divide,
    # but a sample whose scores all sit far below another's no longer underflows to 0 / 0 = NaN.
    log_q = (scores.float() / teacher_temp).t()  # [K, n]: prototypes x samples, as in the SwAV paper
    n_protos = log_q.shape[0]
    if isinstance(n_samples_total, Tensor):
        # log(B) stays on the device: reading the count would synchronise host and device every step.
        log_b = n_samples_total.detach().reshape(-1)[0].to(log_q.device, torch.float64).log().float()
    else:
        log_b = math.log(n_samples_total)
    log_q = log_q - _global_logsumexp(log_q.reshape(1, -1))  # total mass 1 over all ranks
    for _ in range(n_iterations):
        log_q = log_q - _global_logsumexp(log_q) - math.log(n_protos)  # each prototype: 1 / K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b  # each sample: 1 / B
    return torch.exp(log_q + log_b).t()  # columns sum to 1: an assignment per sample


def _global_logsumexp(x: Tensor) -> Tensor:
    """log(sum over dim 1 and over all ranks of exp(x)) for x [R, C] -> [R, 1] (collective)."""
    if x.shape[1] == 0:
        row_max = x.new_full((x.shape[0], 1), float("-inf"))
    else:
        row_max = x.max(dim=1, keepdim=True).values
    if is_enabled():
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = torch.exp(x - row_max).sum(dim=1, keepdim=True)
    if is_enabled():
        dist.all_reduce(sums)
    return row_max + torch.log(sums)


class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets and student predictions on CLS-token prototype scores.

    Args:
        out_dim: number of prototypes K (the DINO head's output width).
        student_temp: temperature dividing the student logits before log-softmax.
        center_momentum: EMA momentum of the teacher center (softmax-centering only).

    Buffers:
        center: [1, K] running mean of the teacher logits, saved in the state dict. Its update is
            lazy (``center_update``, a `CenterUpdate`): started by update_center(), applied before
            the centre is next used or the state dict is produced, so a resumed run continues exactly.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        _check_student_temp(student_temp)
        self.center_update = CenterUpdate(center_momentum)
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_state_dict_pre_hook(apply_center_update_before_state_dict)

    @property
    def center_momentum(self) -> float:
        """EMA momentum of the centre (held by `center_update`)."""
        return self.center_update.momentum

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """softmax((teacher_output - center) / teacher_temp) over the last dim, after applying any
        pending center update. Shape [..., K] -> [..., K] (float32 when the input is lower precision)."""
        _check_teacher_temp(teacher_temp)
        self._check_last_dim(teacher_output, "teacher_output")
        self.apply_center_update()
        return F.softmax((teacher_output - self.center.reshape(-1)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets for [n, K] teacher logits, equipartitioned over n * world_size samples.

        Collective when a process group is initialised. Returns [n, K] float32, rows summing to 1.
        """
        self._check_last_dim(teacher_output, "teacher_output")
        return sinkhorn_knopp(
            teacher_output, teacher_temp, teacher_output.shape[0] * get_global_size(), n_iterations
        )

    def forward(
        self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]
    ) -> Tensor:
        """Sum over every (student, teacher) pair of the batch-mean cross-entropy.

        Args:
            student_output_list: tensors [B, K] of student logits (one per student crop).
            teacher_out_softmaxed_centered_list: tensors [B, K] of teacher targets (one per teacher crop),
                or a single [n_crops, B, K] tensor, which iterates as its crops.

        Returns:
            scalar: sum_s sum_t mean_b H(t_b, s_b). The caller divides by the number of pairs.
            Every pair is used, including same-index ones: the caller pairs crops (DINOv2 swaps the
            teacher's two global crops so no student crop ever meets its own view).
        """
        if len(student_output_list) == 0 or len(teacher_out_softmaxed_centered_list) == 0:
            raise ValueError(
                "DINOLoss needs at least one student and one teacher tensor, got "
                f"{len(student_output_list)} and {len(teacher_out_softmaxed_centered_list)}"
            )
        total = 0.0
        for s in student_output_list:
            self._check_last_dim(s, "student output")
            log_probs = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                if t.shape != s.shape:
                    raise ValueError(
                        f"teacher target shape {tuple(t.shape)} does not match student shape {tuple(s.shape)}"
                    )
                total = total - torch.sum(t * log_probs, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start the center update with this batch's teacher logits [n, K] (lazy, see class doc).

        With a process group, the batch sum is all-reduced asynchronously; the new center
        center * m + (sum over ranks) / (n * world_size) * (1 - m) is applied by apply_center_update().
        """
        if teacher_output.ndim != 2:
            raise ValueError(f"teacher_output must be [n, {self.out_dim}], got {tuple(teacher_output.shape)}")
        self._check_last_dim(teacher_output, "teacher_output")
        self.apply_center_update()  # never drop an update that was not consumed yet
        self.center_update.update(teacher_output)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a pending update_center() (wait for its all_reduce); no-op when none is pending."""
        self.center_update.apply(self.center)

    def _check_last_dim(self, x: Tensor, what: str) -> None:
        if x.ndim < 2 or x.shape[-1] != self.out_dim:
            raise ValueError(f"{what} must have shape [..., {self.out_dim}], got {tuple(x.shape)}")
