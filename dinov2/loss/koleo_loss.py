"""KoLeo regulariser: Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al. 2019).

DINOv2 (Oquab et al. 2023, eq. for L_koleo) spreads the L2-normalised CLS features of a batch by
penalising small nearest-neighbour distances:

    L = -1/n * sum_i log(d_i + eps),   d_i = min_{j != i} || x_i - x_j ||

The constant log(n) of the entropy estimator is dropped, as in DINOv2.

Example::

    koleo = KoLeoLoss()
    loss = koleo(student_cls_tokens)  # [B, D] -> scalar
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """KoLeo loss on a batch of vectors [n, D]; computed in float32 outside any autocast region.

    Duplicate rows stay finite: the distance uses torch.nn.PairwiseDistance's eps (|x - y + eps|), so two
    identical vectors are eps * sqrt(D) apart instead of 0. With fewer than two rows no neighbour exists;
    the loss is then 0 (still attached to the graph), which gives the same zero gradient DINOv2 would.
    """

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: Tensor) -> Tensor:  # noqa: N802 (DINOv2's public name)
        """Index of each row's nearest other row, for L2-normalised rows [n, D] -> [n] (long).

        For unit vectors the largest inner product is the smallest distance; the diagonal is set to -1
        (below any other inner product) so that a row is never its own neighbour.
        """
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)
        return dots.argmax(dim=1)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """Args: student_output [n, D] (any float dtype), eps added inside the log. Returns a scalar."""
        if student_output.ndim != 2:
            raise ValueError(f"KoLeoLoss expects [n, D] vectors, got shape {tuple(student_output.shape)}")
        if student_output.shape[0] < 2:
            return student_output.float().sum() * 0.0
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            nn_index = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[nn_index])
            return -torch.log(distances + eps).mean()
