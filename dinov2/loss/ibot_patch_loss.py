"""iBOT masked-image-modelling loss on patch tokens (Zhou et al. 2022; Oquab et al. 2023).

The student sees a global crop with some patches replaced by the mask token; for each masked patch it
predicts the teacher's prototype distribution of the same patch in the unmasked crop. The per-patch
cross-entropy is averaged within each image over its masked patches, then over images, so every
masked image weighs the same whatever its mask size.

Example::

    loss_fn = iBOTPatchLoss(patch_out_dim=65536)
    t = loss_fn.softmax_center_teacher(teacher_masked_logits, teacher_temp=0.07)  # [M, K]
    loss = loss_fn.forward_masked(student_masked_logits, t, student_masks_flat=masks)  # masks [B, N]
    loss_fn.update_center(teacher_masked_logits.unsqueeze(0))
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.loss.center import CenterUpdate, apply_center_update_before_state_dict
from dinov2.loss.dino_clstoken_loss import _check_student_temp, _check_teacher_temp, sinkhorn_knopp
from dinov2.utils.distributed import is_enabled


def _patch_cross_entropy(teacher: Tensor, student: Tensor, student_temp: float) -> Tensor:
    """H(t, s) per token: -sum_k t_k log_softmax(s / temp)_k over the last dim."""
    return -torch.sum(teacher * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1)


class iBOTPatchLoss(nn.Module):  # noqa: N801 (DINOv2's public name)
    """Cross-entropy between teacher and student prototype scores of masked patch tokens.

    Args:
        patch_out_dim: number of prototypes K of the head applied to patch tokens.
        student_temp: temperature dividing the student logits before log-softmax.
        center_momentum: EMA momentum of the teacher center (softmax-centering only).

    Buffers:
        center: [1, 1, K] running mean of the teacher's masked-patch logits. Its update is lazy
            (``center_update``, a `CenterUpdate`): started by update_center(), applied before the
            centre is next used or the state dict is produced, so a resumed run continues exactly.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if patch_out_dim < 1:
            raise ValueError(f"patch_out_dim must be >= 1, got {patch_out_dim}")
        _check_student_temp(student_temp)
        self.center_update = CenterUpdate(center_momentum)
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.register_state_dict_pre_hook(apply_center_update_before_state_dict)

    @property
    def center_momentum(self) -> float:
        """EMA momentum of the centre (held by `center_update`)."""
        return self.center_update.momentum

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """softmax((tokens - center) / teacher_temp) over the last dim after any pending center update.

        Shape [..., K] -> [..., K] (float32 when the input is lower precision)."""
        _check_teacher_temp(teacher_temp)
        self._check_last_dim(teacher_patch_tokens, "teacher_patch_tokens")
        self.apply_center_update()
        # center is [1, 1, K]; flattening it keeps the input shape ([M, K] stays [M, K]).
        return F.softmax((teacher_patch_tokens - self.center.reshape(-1)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor | int,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets for the [M, K] masked teacher logits of this rank.

        n_masked_patches_tensor: this rank's number of masked patches (1-element tensor from the
        collate function, or int); summed over ranks (without touching the caller's tensor) to get the
        number of samples to equipartition. Works without a process group. Returns [M, K] float32.
        """
        self._check_last_dim(teacher_output, "teacher_output")
        if isinstance(n_masked_patches_tensor, Tensor):
            n_total = n_masked_patches_tensor.detach().reshape(-1)[:1].clone().to(teacher_output.device)
        else:
            n_total = torch.tensor([int(n_masked_patches_tensor)], device=teacher_output.device)
        if is_enabled():
            dist.all_reduce(n_total)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_total, n_iterations)

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor):
        """Dense form: every patch is scored, only masked ones count.

        Args:
            student_patch_tokens: [B, N, K] student logits.
            teacher_patch_tokens: [B, N, K] teacher targets (probabilities).
            student_masks_flat: [B, N] bool mask of the student's masked patches.

        Returns:
            scalar: mean over images of (sum of CE over the image's masked patches / max(n_masked, 1)).
        """
        if student_patch_tokens.shape != teacher_patch_tokens.shape or student_patch_tokens.ndim != 3:
            raise ValueError(
                "student and teacher patch tokens must both be [B, N, K], got "
                f"{tuple(student_patch_tokens.shape)} and {tuple(teacher_patch_tokens.shape)}"
            )
        if tuple(student_masks_flat.shape) != tuple(student_patch_tokens.shape[:2]):
            raise ValueError(
                f"student_masks_flat must be [B, N] = {tuple(student_patch_tokens.shape[:2])}, "
                f"got {tuple(student_masks_flat.shape)}"
            )
        ce = _patch_cross_entropy(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        masks = student_masks_flat.float()
        per_image = torch.sum(ce * masks, dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Compact form on the masked tokens only (what training uses).

        Args:
            student_patch_tokens_masked: [M', K] student logits of the masked patches in
                ``student_masks_flat[student_masks_flat]`` order (M' >= M rows allowed: padding).
            teacher_patch_tokens_masked: [M', K] teacher targets in the same order.
            student_masks_flat: [B, N] bool masks; B (all images, masked or not) divides the sum.
            n_masked_patches: M; rows beyond it are padding and ignored (default: all rows).
            masks_weight: [M] weight of each masked token, 1 / (masked patches of its image); computed
                from the masks when None.

        Returns:
            scalar: sum_m masks_weight_m * CE_m / B, i.e. the dense ``forward`` value.
        """
        if student_patch_tokens_masked.shape != teacher_patch_tokens_masked.shape:
            raise ValueError(
                "student and teacher masked tokens must have the same shape, got "
                f"{tuple(student_patch_tokens_masked.shape)} and {tuple(teacher_patch_tokens_masked.shape)}"
            )
        if student_masks_flat.ndim != 2:
            raise ValueError(f"student_masks_flat must be [B, N], got {tuple(student_masks_flat.shape)}")
        masks = student_masks_flat.bool()
        if masks_weight is None:
            per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
            masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]
        ce = _patch_cross_entropy(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if n_masked_patches is not None:
            ce = ce[:n_masked_patches]
        if ce.shape[0] != masks_weight.shape[0]:
            raise ValueError(
                f"{ce.shape[0]} masked tokens but {masks_weight.shape[0]} mask weights; pass "
                "n_masked_patches to drop padding rows"
            )
        return torch.sum(ce * masks_weight) / masks.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """Start the center update with teacher logits [n, P, K] (lazy, applied at the next centering).

        The batch center is the mean over the P tokens summed over n and over ranks, divided by
        n * world_size (DINOv2 passes the masked tokens as one [1, M, K] group).
        """
        if teacher_patch_tokens.ndim != 3:
            raise ValueError(
                f"teacher_patch_tokens must be [n, P, K], got {tuple(teacher_patch_tokens.shape)}"
            )
        self._check_last_dim(teacher_patch_tokens, "teacher_patch_tokens")
        self.apply_center_update()  # never drop an update that was not consumed yet
        n_groups = len(teacher_patch_tokens)
        if teacher_patch_tokens.shape[1] == 0:
            # No masked token on this rank: contribute the current center so the (collective) update
            # stays finite and unbiased instead of averaging an empty set into NaN.
            rows = self.center.reshape(1, -1).expand(n_groups, -1)
        else:
            rows = teacher_patch_tokens.float().mean(1)  # [n, K]: each group's mean token
        self.center_update.update(rows)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a pending update_center() (wait for its all_reduce); no-op when none is pending."""
        self.center_update.apply(self.center)

    def _check_last_dim(self, x: Tensor, what: str) -> None:
        if x.ndim < 2 or x.shape[-1] != self.patch_out_dim:
            raise ValueError(f"{what} must have shape [..., {self.patch_out_dim}], got {tuple(x.shape)}")
