"""The teacher centre's EMA update, started when a batch is seen and applied when the centre is next used.

DINO and iBOT softmax-centering subtract a running mean of the teacher's logits (Caron et al. 2021):

    center <- m * center + (1 - m) * (sum over ranks of the batch rows) / (n_local * world_size)

The batch mean is an all_reduce over processes. DINOv2 starts it asynchronously right after the
teacher's forward and waits for it only when the centre is needed again (the next step's
centering, or a checkpoint), so the collective overlaps the student's forward and backward.
`CenterUpdate` holds that update in flight: `update` starts it, `apply` finishes it into the centre,
`discard` drops it (a step whose loss was not finite must not move the centre).

The centre tensor itself stays a buffer of the loss module (state-dict keys ``dino_loss.center`` and
``ibot_patch_loss.center``, moved by ``.to(device)`` and filled by ``load_state_dict``); `apply` is
handed that buffer, so a buffer replaced by a device move is never updated through a stale reference.

Example::

    ema = CenterUpdate(momentum=0.9)
    ema.update(teacher_logits)   # [n, K]: all_reduce of the row sum starts (when distributed)
    ...                          # student forward/backward overlaps the collective
    ema.apply(center)            # center [1, K] <- 0.9 * center + 0.1 * (mean row over all ranks)
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinov2.utils.distributed import get_global_size, is_enabled


class CenterUpdate:
    """One pending EMA update of a teacher centre (see the module docstring).

    Args:
        momentum: m in [0, 1]; the weight the old centre keeps (DINOv2's ``center_momentum``).
    """

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self._batch_sum: Tensor | None = None  # this rank's row sum, all-reduced in place when distributed
        self._n_rows = 0  # number of rows summed on each rank
        self._world_size = 1
        self._handle = None  # the async all_reduce's work object (None when not distributed)

    @property
    def pending(self) -> bool:
        """True between `update` and the `apply` or `discard` that consumes it."""
        return self._batch_sum is not None

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Start the update with this rank's batch `rows` [n, ...] (summed over dim 0, in float32).

        Collective when a process group is initialised: every rank must call it, in the same order.
        Raises RuntimeError when an update is already pending (apply or discard it first: silently
        replacing it would lose a batch from the centre).
        """
        if self.pending:
            raise RuntimeError("a center update is already pending: apply() or discard() it before update()")
        if rows.ndim < 1 or rows.shape[0] == 0:
            raise ValueError(f"rows must be [n >= 1, ...], got shape {tuple(rows.shape)}")
        batch_sum = torch.sum(rows.float(), dim=0, keepdim=True)
        self._n_rows = rows.shape[0]
        self._world_size = get_global_size()
        if is_enabled():
            self._handle = dist.all_reduce(batch_sum, async_op=True)
        self._batch_sum = batch_sum

    @torch.no_grad()
    def apply(self, center: Tensor) -> None:
        """Finish the pending update into `center` in place (waiting for its all_reduce); no-op when
        none is pending. `center` must have as many elements as one row given to `update`."""
        if not self.pending:
            return
        batch_sum = self._wait()
        if batch_sum.numel() != center.numel():
            raise ValueError(
                f"center has shape {tuple(center.shape)} but the pending update's rows have "
                f"{batch_sum.numel()} elements"
            )
        batch_center = batch_sum.reshape(center.shape) / (self._n_rows * self._world_size)
        center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)

    def discard(self) -> None:
        """Drop the pending update, if any, leaving the centre as it was. Waits for its all_reduce,
        so every rank must discard together (they do: the step's finiteness check is agreed)."""
        if self.pending:
            self._wait()

    def _wait(self) -> Tensor:
        """Wait for the collective; return the reduced sum and clear the pending state."""
        if self._handle is not None:
            self._handle.wait()
        batch_sum = self._batch_sum
        self._batch_sum, self._handle = None, None
        return batch_sum


def apply_center_update_before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook of the centered losses: apply a pending update so a checkpoint holds the
    current centre and a resumed run continues exactly (a plain function, not a lambda, so the
    module stays picklable)."""
    module.apply_center_update()
