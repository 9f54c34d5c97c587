"""Student, EMA teacher and the three DINOv2 losses; one call computes a training step's losses and grads.

The step (Oquab et al. 2023, sec. 4; DINOv2's SSLMetaArch.forward_backward):

1. Teacher (no grad) on the 2 global crops: backbone CLS tokens -> DINO head, masked patch tokens ->
   iBOT head (the DINO head itself unless ``ibot.separate_head``). Its two crops are swapped so that
   student crop 0 is compared with teacher crop 1 and vice versa. Targets by softmax-centering (with
   the lazy EMA center update) or Sinkhorn-Knopp, per ``train.centering``.
2. Student on the global crops (with iBOT masks) and the local crops: CLS tokens of every crop and the
   masked patch tokens go through the student heads.
3. Losses, normalised as in DINOv2. With n_l local crops there are P = 2 + 2 * n_l (student crop,
   teacher crop) pairs of different views; each pair contributes its batch-mean cross-entropy / P:
     dino_local_crops_loss  = sum over (local crop, teacher global crop) pairs / P
     dino_global_crops_loss = 2 * mean over the 2B crossed global rows / P  (= sum over 2 pairs / P)
     koleo                  = koleo_loss_weight * sum over the 2 global crops of KoLeo(student CLS)
     ibot                   = iBOTPatchLoss.forward_masked (mean over all 2B global crops of the per-crop
                              mean CE of masked patches; crops without a mask count as 0)
   total = dino.loss_weight * (local + global) + koleo + ibot.loss_weight * ibot.
   DINOv2 divides by 2 + max(2 * n_l, 1); the two agree whenever there are local crops.
4. backward of total (scaled by the GradScaler when one is given).

The returned dict keeps DINOv2's logged values: ``koleo_loss`` and ``ibot_loss`` are the terms above
divided by 2 (per global crop), ``total_loss`` is the exact quantity that was back-propagated.

Distributed training: the loss and center code is collective-aware (all_reduce in centering/Sinkhorn).
Gradients are averaged (per-parameter hooks, overlapped with backward), or the parts sharded with
FSDP2, by dinov2.train.distributed_wrap: the student is called part by part
(``student["backbone"].forward_features_list``, ``student["dino_head"]``, ``student["ibot_head"]``), so
a wrapper must act on those parts or on each parameter; every trainable student parameter receives a
gradient (possibly zero) on every step, so ranks always agree.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dinov2.layers import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.loss.center import CenterUpdate
from dinov2.models import build_model_from_cfg
from dinov2.train.ema import paired_parameters, update_ema
from dinov2.train.param_groups import get_params_groups
from dinov2.utils.dtypes import dtype_from_name

logger = logging.getLogger("dinov2")

N_GLOBAL_CROPS = 2


@dataclass(frozen=True)
class SSLObjectiveConfig:
    """What the training step reads from the config (read once, at construction)."""

    dino_loss_weight: float  # weight of the image-level DINO loss (cfg.dino.loss_weight)
    koleo_loss_weight: float  # weight of the KoLeo regulariser (cfg.dino.koleo_loss_weight)
    ibot_loss_weight: float  # weight of the patch-level iBOT loss (cfg.ibot.loss_weight)
    ibot_separate_head: bool  # iBOT uses its own head instead of the DINO head (cfg.ibot.separate_head)
    centering: str  # "centering" (softmax) or "sinkhorn_knopp" (cfg.train.centering)
    autocast_dtype: torch.dtype  # compute dtype on CUDA (cfg.compute_precision.student.backbone...)
    head_dtypes: dict  # (who, head) -> compute dtype of that head (compute_precision.<who>.<head>...)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "SSLObjectiveConfig":
        centering = str(cfg.train.centering)
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"train.centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        names = {
            (who, part): str(cfg.compute_precision[who][part].mixed_precision.param_dtype)
            for who in ("student", "teacher")
            for part in ("backbone", "dino_head", "ibot_head")
        }
        dtypes = {
            (who, part): dtype_from_name(name, f"compute_precision.{who}.{part}.mixed_precision.param_dtype")
            for (who, part), name in names.items()
        }
        out = cls(
            dino_loss_weight=float(cfg.dino.loss_weight),
            koleo_loss_weight=float(cfg.dino.koleo_loss_weight),
            ibot_loss_weight=float(cfg.ibot.loss_weight),
            ibot_separate_head=bool(cfg.ibot.separate_head),
            centering=centering,
            autocast_dtype=dtypes["student", "backbone"],
            head_dtypes={key: dtype for key, dtype in dtypes.items() if key[1] != "backbone"},
        )
        for name in ("dino_loss_weight", "koleo_loss_weight", "ibot_loss_weight"):
            if getattr(out, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(out, name)}")
        if out.dino_loss_weight == 0 and out.ibot_loss_weight == 0:
            raise ValueError(
                "dino.loss_weight and ibot.loss_weight are both 0: nothing would train the heads"
            )
        return out


def _head(cfg_section: Any, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=int(cfg_section.head_n_prototypes),
        hidden_dim=int(cfg_section.head_hidden_dim),
        bottleneck_dim=int(cfg_section.head_bottleneck_dim),
        nlayers=int(cfg_section.head_nlayers),
    )


class SSLMetaArch(nn.Module):
    """DINOv2 student/teacher pair with DINO, iBOT and KoLeo objectives.

    Args:
        cfg: the training config (dinov2/configs/ssl_default_config.yaml keys).
        backbones: optional (student_backbone, teacher_backbone) to use instead of building
            ``cfg.student.arch`` (e.g. a tiny ViT in tests); both must expose ``embed_dim``.

    Attributes:
        student, teacher: ``nn.ModuleDict`` with ``backbone``, ``dino_head`` and, with a separate iBOT
            head, ``ibot_head`` (DINOv2's checkpoint keys). The teacher starts as a copy of the student
            (after ``cfg.student.pretrained_weights`` is loaded) and never requires grad.
        dino_loss, ibot_patch_loss, koleo_loss: the loss modules (their centers are buffers).
        autocast_dtype: compute dtype used on CUDA (None or float32 disables autocast; set it to None
            when FSDP2's MixedPrecisionPolicy already casts). CPU always runs in float32.
    """

    def __init__(self, cfg: Any, backbones: tuple[nn.Module, nn.Module] | None = None):
        super().__init__()
        self.objective = SSLObjectiveConfig.from_cfg(cfg)
        if backbones is None:
            student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        else:
            student_backbone, teacher_backbone = backbones
            embed_dim = student_backbone.embed_dim
        pretrained = str(getattr(cfg.student, "pretrained_weights", "") or "")
        if pretrained:
            from dinov2.models.weights import load_pretrained_weights

            load_pretrained_weights(student_backbone, pretrained)
            logger.info("student backbone initialised from %s", pretrained)
        self.embed_dim = embed_dim
        self.do_dino = self.objective.dino_loss_weight > 0
        self.do_koleo = self.objective.koleo_loss_weight > 0
        self.do_ibot = self.objective.ibot_loss_weight > 0
        self.ibot_separate_head = self.objective.ibot_separate_head
        if self.do_ibot and not (
            max(cfg.ibot.mask_ratio_min_max) > 0 and cfg.ibot.mask_sample_probability > 0
        ):
            raise ValueError(
                "ibot.loss_weight > 0 needs masks: ibot.mask_ratio_min_max and ibot.mask_sample_probability "
                f"must be > 0, got {list(cfg.ibot.mask_ratio_min_max)} and {cfg.ibot.mask_sample_probability}"
            )

        student = {"backbone": student_backbone, "dino_head": _head(cfg.dino, embed_dim)}
        teacher = {"backbone": teacher_backbone, "dino_head": _head(cfg.dino, embed_dim)}
        self.dino_out_dim = int(cfg.dino.head_n_prototypes)
        self.dino_loss = DINOLoss(self.dino_out_dim)
        self.koleo_loss = KoLeoLoss()
        if self.ibot_separate_head:
            student["ibot_head"] = _head(cfg.ibot, embed_dim)
            teacher["ibot_head"] = _head(cfg.ibot, embed_dim)
        self.ibot_out_dim = int(
            cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        )
        self.ibot_patch_loss = iBOTPatchLoss(self.ibot_out_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        for name in self.student:
            self.teacher[name].load_state_dict(self.student[name].state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.autocast_dtype: torch.dtype | None = self.objective.autocast_dtype
        self._cfg_optim = cfg.optim

    # ------------------------------------------------------------------ helpers for the training loop
    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Train mode for the student; the teacher always stays in eval mode (no stochastic depth)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step: every teacher parameter <- m * teacher + (1 - m) * student (fused foreach ops)."""
        teacher_params, student_params = [], []
        for name in self.student:
            t, s = paired_parameters(self.teacher[name], self.student[name])
            teacher_params += t
            student_params += s
        update_ema(teacher_params, student_params, momentum)

    def centers(self) -> tuple[CenterUpdate, ...]:
        """The lazy centre updates of the DINO and iBOT losses (the step discards them when its
        loss is not finite)."""
        return (self.dino_loss.center_update, self.ibot_patch_loss.center_update)

    def get_params_groups(self) -> list[dict]:
        """AdamW groups of the student (layer-wise decay etc.); frozen parameters are included so a
        backbone frozen for head warm-up is trained once unfrozen."""
        return get_params_groups(self.student, self._cfg_optim, include_frozen=True)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze (head warm-up of continued pretraining) or unfreeze the student backbone."""
        self.student["backbone"].requires_grad_(not frozen)

    # Devices where autocast runs (the CPU computes in float32; tests add "cpu" to check the casts).
    autocast_devices: tuple[str, ...] = ("cuda",)

    def _autocast(self, device: torch.device):
        dtype = self.autocast_dtype
        enabled = device.type in self.autocast_devices and dtype is not None and dtype != torch.float32
        return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=enabled)

    def _run_head(self, who: str, name: str, x: Tensor) -> Tensor:
        """`who`'s head `name` on x, in the head's own compute dtype (compute_precision.<who>.<name>).

        fp32 heads (the default) keep the ~0.05 nats of bf16 rounding out of the teacher targets at
        temperature 0.04. Under FSDP2 (autocast_dtype None) the part's MixedPrecisionPolicy casts.
        """
        head = getattr(self, who)[name]
        if self.autocast_dtype is None or x.device.type not in self.autocast_devices:
            return head(x)
        dtype = self.objective.head_dtypes[who, name]
        if dtype == torch.float32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return head(x.float())
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return head(x)

    # ------------------------------------------------------------------------------- the step
    def forward(self, *args, **kwargs):
        raise RuntimeError("SSLMetaArch has no forward(); call forward_backward(images, teacher_temp)")

    def forward_backward(
        self, images: dict, teacher_temp: float, grad_scaler: torch.amp.GradScaler | None = None
    ) -> dict[str, Tensor]:
        """Losses of one step and their gradients (accumulated into the student's ``.grad``).

        Args:
            images: a batch from dinov2.data.collate.collate_data_and_cast (moved to the student's
                device here).
            teacher_temp: teacher softmax / Sinkhorn temperature for this iteration.
            grad_scaler: an enabled GradScaler for fp16 (the loss is scaled before backward).

        Returns:
            detached scalars: dino_local_crops_loss (when there are local crops),
            dino_global_crops_loss, koleo_loss, ibot_loss (when enabled) and total_loss.
        """
        batch = self._unpack(images)
        device = batch["global_crops"].device
        with self._autocast(device):
            teacher_dino, teacher_ibot = self._teacher_targets(batch, teacher_temp)
            student = self._student_outputs(batch)
        total, loss_dict = self._losses(batch, student, teacher_dino, teacher_ibot)
        if grad_scaler is not None and grad_scaler.is_enabled():
            grad_scaler.scale(total).backward()
        else:
            total.backward()
        loss_dict["total_loss"] = total.detach()
        return loss_dict

    def _unpack(self, images: dict) -> dict:
        missing = [
            k
            for k in (
                "collated_global_crops",
                "collated_local_crops",
                "collated_masks",
                "mask_indices_list",
                "masks_weight",
                "upperbound",
                "n_masked_patches",
            )  # fmt: skip
            if k not in images
        ]
        if missing:
            raise ValueError(
                f"batch is missing {missing}; build it with dinov2.data.collate.collate_data_and_cast"
            )
        device = next(self.student.parameters()).device
        global_crops = images["collated_global_crops"].to(device, non_blocking=True)
        local_crops = images["collated_local_crops"].to(device, non_blocking=True)
        if global_crops.ndim != 4 or global_crops.shape[0] % N_GLOBAL_CROPS:
            raise ValueError(
                f"collated_global_crops must be [2 * B, C, H, W] (2 global crops per image), "
                f"got {tuple(global_crops.shape)}"
            )
        batch_size = global_crops.shape[0] // N_GLOBAL_CROPS
        n_local = local_crops.shape[0] // batch_size if local_crops.numel() else 0
        if local_crops.numel() and local_crops.shape[0] != n_local * batch_size:
            raise ValueError(
                f"{local_crops.shape[0]} local crops is not a multiple of the batch size {batch_size}"
            )
        if self.autocast_dtype is None or device.type not in self.autocast_devices:
            global_crops, local_crops = global_crops.float(), local_crops.float()
        masks = images["collated_masks"].to(device, non_blocking=True)
        if masks.shape[0] != global_crops.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks for {global_crops.shape[0]} global crops")
        mask_indices = images["mask_indices_list"].to(device, non_blocking=True)
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "batch_size": batch_size,
            "n_local": n_local,
            "masks": masks,
            "mask_indices": mask_indices,
            "n_masked": int(mask_indices.shape[0]),
            "n_masked_tensor": images["n_masked_patches"].to(device, non_blocking=True),
            "masks_weight": images["masks_weight"].to(device, non_blocking=True),
            "upperbound": int(images["upperbound"]),
        }

    @torch.no_grad()
    def _teacher_targets(self, batch: dict, teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher targets: DINO [2, B, K] (crop order swapped) and iBOT [M, K] (or None)."""
        out = self.teacher["backbone"](batch["global_crops"], is_training=True)
        cls = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls = torch.cat((cls[1], cls[0]))  # teacher crop 1 is the target of student crop 0, and back
        n_cls = cls.shape[0]
        masked_patches = None
        if self.do_ibot:
            masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices"])
        if self.do_ibot and not self.ibot_separate_head:
            logits = self._run_head("teacher", "dino_head", torch.cat((cls, masked_patches))).float()
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits = self._run_head("teacher", "dino_head", cls).float()
            patch_logits = (
                self._run_head("teacher", "ibot_head", masked_patches).float() if self.do_ibot else None
            )

        if self.objective.centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            ibot_targets = None
            if self.do_ibot:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_patch_loss.update_center(patch_logits.unsqueeze(0))
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            ibot_targets = None
            if self.do_ibot:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp, batch["n_masked_tensor"]
                )
        return dino_targets.view(N_GLOBAL_CROPS, -1, dino_targets.shape[-1]), ibot_targets

    def _student_outputs(self, batch: dict) -> dict[str, Tensor]:
        """Student head logits: global CLS [2B, K], local CLS [n_l * B, K], masked patches [M, K']."""
        backbone = self.student["backbone"]
        if batch["n_local"] > 0:
            global_out, local_out = backbone.forward_features_list(
                [batch["global_crops"], batch["local_crops"]], [batch["masks"], None]
            )
        else:
            global_out, local_out = (
                backbone.forward_features(batch["global_crops"], masks=batch["masks"]),
                None,
            )
        global_cls = global_out["x_norm_clstoken"]
        # One head call on every token that shares the DINO head (the MLP acts per token).
        head_inputs = [global_cls]
        if local_out is not None:
            head_inputs.append(local_out["x_norm_clstoken"])
        masked_patches = None
        if self.do_ibot:
            masked_patches = (
                global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices"])
            )
            if not self.ibot_separate_head:
                head_inputs.append(masked_patches)
        logits = self._run_head("student", "dino_head", torch.cat(head_inputs)).float()
        sizes = [t.shape[0] for t in head_inputs]
        parts = list(logits.split(sizes))
        result = {"global_backbone_cls": global_cls, "global_cls": parts[0]}
        result["local_cls"] = parts[1] if local_out is not None else None
        if self.do_ibot and not self.ibot_separate_head:
            result["masked_patches"] = parts[-1]
        elif self.do_ibot:
            # Padded to the batch-layout bound so the iBOT head runs (and gets a gradient, zero when
            # nothing is masked) on every step and every rank.
            padded = masked_patches.new_zeros(
                max(batch["upperbound"], batch["n_masked"]), masked_patches.shape[1]
            )
            padded[: batch["n_masked"]] = masked_patches
            result["masked_patches"] = self._run_head("student", "ibot_head", padded).float()[
                : batch["n_masked"]
            ]
        return result

    def _losses(
        self, batch: dict, student: dict, teacher_dino: Tensor, teacher_ibot: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n_local = batch["n_local"]
        n_pairs = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * n_local
        obj = self.objective
        total = student["global_cls"].new_zeros(())
        loss_dict: dict[str, Tensor] = {}
        if self.do_dino:
            if n_local > 0:
                local = self.dino_loss(student["local_cls"].chunk(n_local), teacher_dino) / n_pairs
                loss_dict["dino_local_crops_loss"] = local.detach()
                total = total + obj.dino_loss_weight * local
            # Both global crops at once: the mean over 2B rows is half the sum over the two pairs.
            glob = (
                self.dino_loss([student["global_cls"]], [teacher_dino.flatten(0, 1)])
                * N_GLOBAL_CROPS
                / n_pairs
            )
            loss_dict["dino_global_crops_loss"] = glob.detach()
            total = total + obj.dino_loss_weight * glob
        if self.do_koleo:
            # per global crop: never compare the two crops of one image with each other
            koleo = obj.koleo_loss_weight * sum(
                self.koleo_loss(c) for c in student["global_backbone_cls"].chunk(N_GLOBAL_CROPS)
            )
            loss_dict["koleo_loss"] = koleo.detach() / N_GLOBAL_CROPS
            total = total + koleo
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                student["masked_patches"],
                teacher_ibot,
                student_masks_flat=batch["masks"],
                n_masked_patches=batch["n_masked"],
                masks_weight=batch["masks_weight"],
            )
            loss_dict["ibot_loss"] = ibot.detach() / N_GLOBAL_CROPS
            total = total + obj.ibot_loss_weight * ibot
        return total, loss_dict
