"""Backbone construction from the training config (DINOv2's `build_model`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer

# DINOv2's defaults for cfg.student keys that a config may leave out.
_STUDENT_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "drop_path_rate": 0.0,
    "layerscale": None,
    "drop_path_uniform": False,
    "ffn_layer": "mlp",
    "block_chunks": 0,
    "qkv_bias": True,
    "proj_bias": True,
    "ffn_bias": True,
    "num_register_tokens": 0,
    "interpolate_antialias": False,
    "interpolate_offset": 0.1,
    # Overrides of the arch's width, depth and heads (small CPU models); None keeps the arch's own.
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
}


def _arg(args: Any, name: str) -> Any:
    """Read `name` from a mapping / OmegaConf node / namespace, falling back to DINOv2's default."""
    if isinstance(args, Mapping) or hasattr(args, "keys"):
        if name in args:
            return args[name]
    elif hasattr(args, name):
        return getattr(args, name)
    if name not in _STUDENT_DEFAULTS:
        raise ValueError(f"student config is missing the required key {name!r}")
    return _STUDENT_DEFAULTS[name]


def build_model(args: Any, only_teacher: bool = False, img_size: int = 224):
    """Student and teacher backbones from `cfg.student`-style args.

    Args:
        args: mapping/namespace with keys arch (vit_small|vit_base|vit_large|vit_giant2, an optional
            "_memeff" suffix is ignored), patch_size, drop_path_rate, layerscale (LayerScale init),
            drop_path_uniform, ffn_layer, block_chunks, qkv_bias, proj_bias, ffn_bias,
            num_register_tokens, interpolate_antialias, interpolate_offset; optionally embed_dim,
            depth, num_heads to override the arch's (None: the arch's own).
        only_teacher: build the teacher only.
        img_size: training (global crop) size; sets the position-embedding grid.

    Returns:
        (student, teacher, embed_dim); with only_teacher, (teacher, embed_dim) as in DINOv2.
        The teacher has no stochastic depth; the student uses drop_path_rate / drop_path_uniform.
    """
    arch = str(_arg(args, "arch")).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ValueError(f"unknown student.arch {arch!r}; expected one of {sorted(ARCHS)}")
    vit_kwargs = {
        "img_size": img_size,
        "patch_size": _arg(args, "patch_size"),
        "init_values": _arg(args, "layerscale"),
        "ffn_layer": _arg(args, "ffn_layer"),
        "block_chunks": _arg(args, "block_chunks"),
        "qkv_bias": _arg(args, "qkv_bias"),
        "proj_bias": _arg(args, "proj_bias"),
        "ffn_bias": _arg(args, "ffn_bias"),
        "num_register_tokens": _arg(args, "num_register_tokens"),
        "interpolate_offset": _arg(args, "interpolate_offset"),
        "interpolate_antialias": _arg(args, "interpolate_antialias"),
    }
    sizes = {k: _arg(args, k) for k in ("embed_dim", "depth", "num_heads")}
    vit_kwargs.update({k: v for k, v in sizes.items() if v is not None})
    teacher = ARCHS[arch](**vit_kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = ARCHS[arch](
        **vit_kwargs,
        drop_path_rate=_arg(args, "drop_path_rate"),
        drop_path_uniform=_arg(args, "drop_path_uniform"),
    )
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg: Any, only_teacher: bool = False):
    """`build_model(cfg.student, only_teacher, img_size=cfg.crops.global_crops_size)`."""
    return build_model(cfg.student, only_teacher=only_teacher, img_size=cfg.crops.global_crops_size)


__all__ = ["DinoVisionTransformer", "build_model", "build_model_from_cfg"]
