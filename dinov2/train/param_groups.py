"""Optimizer parameter groups of DINOv2: layer-wise lr decay, patch-embed lr multiplier, no weight decay
on biases / norms / LayerScale, and a flag on the DINO head's last layer (which has its own schedule).

Each parameter gets ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``;
dinov2.train.schedules.apply_optim_scheduler turns them into per-group lr and weight decay every
iteration. Parameters with equal multipliers are fused into one group to keep the optimizer fast.

Layer ids (BEiT-style decay, DINOv2's get_vit_lr_decay_rate): patch_embed, pos_embed, cls_token,
register_tokens and mask_token are layer 0, ``blocks.i`` is layer i + 1 (``blocks.<chunk>.i`` with
block chunks, whose indices are global), everything else (final norm, heads) is layer n_blocks + 1.
A parameter of layer l gets lr_multiplier = layerwise_decay ** (n_blocks + 1 - l).

Example::

    groups = get_params_groups(student_backbone, cfg.optim)  # or the student ModuleDict
    optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
"""

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

logger = logging.getLogger("dinov2")

_EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token")
# Wrappers that insert a level into parameter names without changing the model.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _block_index(parts: list[str]) -> int | None:
    """Global block index from name parts, for ``blocks.i.*`` and chunked ``blocks.c.i.*``."""
    if "blocks" not in parts:
        return None
    k = parts.index("blocks")
    if k + 1 >= len(parts) or not parts[k + 1].isdigit():
        return None
    if k + 2 < len(parts) and parts[k + 2].isdigit():  # BlockChunk: blocks.<chunk>.<global index>
        return int(parts[k + 2])
    return int(parts[k + 1])


def get_vit_lr_decay_rate(
    name: str,
    lr_decay_rate: float = 1.0,
    num_layers: int = 12,
    force_is_backbone: bool = False,
    chunked_blocks: bool = False,
) -> float:
    """lr multiplier of parameter ``name`` under layer-wise decay (see module doc).

    Args:
        name: parameter name relative to the backbone, or prefixed with ``backbone.``.
        lr_decay_rate: decay per layer (cfg.optim.layerwise_decay).
        num_layers: number of transformer blocks.
        force_is_backbone: treat names without a ``backbone.`` prefix as backbone parameters.
        chunked_blocks: accepted for DINOv2 compatibility; chunked names are recognised from their shape.
    """
    del chunked_blocks
    name = _clean_name(name)
    parts = name.split(".")
    layer_id = num_layers + 1
    if parts[0] == "backbone" or force_is_backbone:
        if any(p in _EMBEDDING_NAMES for p in parts):
            layer_id = 0
        else:
            block = _block_index(parts)
            if block is not None:
                layer_id = block + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _num_blocks(model: nn.Module) -> int:
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is None:
            continue
        if hasattr(candidate, "n_blocks"):
            return int(candidate.n_blocks)
        if hasattr(candidate, "blocks"):
            return len(candidate.blocks)
    return 0


def _no_weight_decay(name: str, ndim: int) -> bool:
    """Biases, normalisation weights, LayerScale gammas and any other 1-D tensor."""
    return ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name


def get_params_groups_with_decay(
    model: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    include_frozen: bool = False,
) -> list[dict]:
    """One dict per parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer.

    ``model`` is a backbone (names relative to it), a head (every multiplier 1), or a module holding a
    ``backbone`` child. Parameters with requires_grad False are skipped unless ``include_frozen``
    (a temporarily frozen backbone must stay in the optimizer to be trained once unfrozen).
    """
    if not lr_decay_rate > 0:
        raise ValueError(f"layerwise_decay must be > 0, got {lr_decay_rate}")
    n_blocks = _num_blocks(model)
    groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad and not include_frozen:
            continue
        name = _clean_name(raw_name)
        lr_mult = get_vit_lr_decay_rate(
            name, lr_decay_rate, num_layers=n_blocks, force_is_backbone=n_blocks > 0
        )
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_mult,
                "wd_multiplier": 0.0 if _no_weight_decay(name, param.ndim) else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
        logger.debug("%s: lr_multiplier %s, wd_multiplier %s", name, lr_mult, groups[-1]["wd_multiplier"])
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[dict],
    keys: Sequence[str] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> list[dict]:
    """Merge per-parameter dicts with equal ``keys`` into groups {keys..., "params": [...]}, in order of
    first appearance (so the optimizer's group order, and its state dict, are reproducible)."""
    fused: dict[tuple, dict] = {}
    for d in all_params_groups:
        identifier = tuple(d[k] for k in keys)
        group = fused.setdefault(identifier, {**{k: d[k] for k in keys}, "params": []})
        group["params"].append(d["params"])
    return list(fused.values())


def get_params_groups(model: nn.Module, cfg_optim: Any, include_frozen: bool = False) -> list[dict]:
    """Fused parameter groups for AdamW from ``cfg_optim.layerwise_decay`` and
    ``cfg_optim.patch_embed_lr_mult``.

    An ``nn.ModuleDict`` (DINOv2's student: backbone, dino_head, ibot_head) is handled part by part,
    each part with its own layer count, as DINOv2 does; any other module as one part.
    """
    parts = list(model.values()) if isinstance(model, nn.ModuleDict) else [model]
    groups: list[dict] = []
    for part in parts:
        groups += fuse_params_groups(
            get_params_groups_with_decay(
                part,
                lr_decay_rate=float(cfg_optim.layerwise_decay),
                patch_embed_lr_mult=float(cfg_optim.patch_embed_lr_mult),
                include_frozen=include_frozen,
            )
        )
    return groups
