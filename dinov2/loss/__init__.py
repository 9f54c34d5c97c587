"""Self-supervised objectives of DINOv2: image-level DINO, patch-level iBOT and the KoLeo regulariser."""

from dinov2.loss.dino_clstoken_loss import DINOLoss, sinkhorn_knopp
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]
