"""Reading, converting and writing backbone weights.

Handles Meta's released `dinov2_*_pretrain.pth` files (flat state dicts), our teacher exports,
our training checkpoints (`{"teacher": {"backbone.*": ...}}` or `{"model": {"teacher": ...}}`),
DDP / torch.compile key prefixes, both block layouts (`blocks.{i}.` and `blocks.{chunk}.{i}.`) and
safetensors files. Files are read with `torch.load(weights_only=True)`, which never runs pickled
code.

Example:
    model = load_backbone("dinov2_vits14_reg", pretrained_weights="dinov2_vits14_reg4_pretrain.pth")
    model = load_backbone("runs/exp1/eval/12500/teacher_checkpoint.pth")   # architecture inferred
    export_backbone(model, "backbone.safetensors")
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import Mlp, SwiGLUFFN, swiglu_hidden_features
from dinov2.models.block_layout import convert_block_layout
from dinov2.models.vision_transformer import RELEASED_BACKBONES, DinoVisionTransformer, make_released_backbone
from dinov2.utils.files import atomic_path

logger = logging.getLogger("dinov2")

PathLike = str | os.PathLike
SAFETENSORS_CONFIG_KEY = "dinov2_config"
_WRAPPER_PREFIX = re.compile(r"(^|\.)(?:module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_BLOCK_INDEX = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.")
_MAX_LISTED_KEYS = 20


class LoadResult(NamedTuple):
    """Keys the model expected but the checkpoint lacked, and checkpoint keys the model lacks."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# ---------------------------------------------------------------------------------------- reading
def read_checkpoint(path: PathLike) -> tuple[Any, dict[str, str]]:
    """Load a checkpoint file without unpickling code.

    Returns (content, metadata): content is whatever the file holds (a state dict or a dict of
    them); metadata is the safetensors header metadata ({} for torch files).
    Raises FileNotFoundError for a missing file and ValueError for a file that is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise ValueError(
                f"{path} holds pickled objects other than tensors and plain containers; refusing to "
                f"load it (only weights_only=True loading is allowed): {str(e).splitlines()[0]}"
            ) from e
        raise ValueError(f"{path} is not a PyTorch checkpoint: {e}") from e
    except Exception as e:  # torch's loader fails with many types (IndexError, EOFError, ...) on junk
        raise ValueError(f"{path} is not a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _select(obj: Any, checkpoint_key: str | None) -> tuple[Mapping, bool]:
    """The state dict inside a checkpoint and whether it is a flat dict still holding several
    networks under "<name>." prefixes (an SSLMetaArch state dict: "student.*", "teacher.*").

    With a key: obj[key], obj["model"][key], else the flat obj["model"] / obj (its "<key>." keys are
    taken later). Without: a flat state dict, then "teacher", "model" -> "teacher", "model",
    "state_dict".
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(obj).__name__}")
    model = obj.get("model")
    if checkpoint_key is not None:
        if checkpoint_key in obj:
            return obj[checkpoint_key], False
        if isinstance(model, Mapping) and checkpoint_key in model:
            return model[checkpoint_key], False
        for flat in (model, obj):
            if _is_tensor_dict(flat):
                return flat, True
        raise ValueError(
            f"checkpoint has no entry {checkpoint_key!r}; its top-level keys are {sorted(obj)[:20]}"
        )
    if _is_tensor_dict(obj):
        return obj, True
    for first, second in (("teacher", None), ("model", "teacher"), ("model", None), ("state_dict", None)):
        sub = obj.get(first)
        if second is not None:
            sub = sub.get(second) if isinstance(sub, Mapping) else None
        if _is_tensor_dict(sub):
            return sub, second is None
    raise ValueError(
        f"no state dict found in checkpoint (top-level keys {sorted(obj)[:20]}); pass checkpoint_key"
    )


def extract_backbone_state_dict(obj: Any, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """Backbone tensors from a checkpoint's content.

    Wrapper prefixes (module., _orig_mod., ...) are removed; in a flat training state dict the
    "<checkpoint_key>." keys (default "teacher.", the EMA teacher) are taken; when keys carry a
    `backbone.` prefix only those are kept (prefix stripped), so heads stored beside the backbone
    are dropped.
    """
    state_dict, flat = _select(obj, checkpoint_key)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        out[_WRAPPER_PREFIX.sub(r"\1", key)] = value
    if flat:
        prefix = f"{checkpoint_key or 'teacher'}."
        if any(k.startswith(prefix) for k in out):
            out = {k.removeprefix(prefix): v for k, v in out.items() if k.startswith(prefix)}
        elif checkpoint_key is not None:
            raise ValueError(f"checkpoint has no entry {checkpoint_key!r} (no keys starting with {prefix!r})")
    if any(k.startswith("backbone.") for k in out):
        out = {k.removeprefix("backbone."): v for k, v in out.items() if k.startswith("backbone.")}
    return out


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _resample_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[1, 1+M^2, D] -> [1, num_tokens, D]: bicubic (antialiased) resampling of the square grid."""
    old_m, new_m = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_tokens - 1)
    if old_m**2 != pos_embed.shape[1] - 1 or new_m**2 != num_tokens - 1:
        raise ValueError(f"cannot resample pos_embed {tuple(pos_embed.shape)} to {num_tokens} tokens")
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, old_m, old_m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_m, new_m), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_m * new_m, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def load_pretrained_weights(
    model: nn.Module,
    path_or_state_dict: PathLike | Mapping[str, Any],
    checkpoint_key: str | None = None,
    strict: bool = True,
    resample_pos_embed: bool = True,
) -> LoadResult:
    """Load backbone weights into `model` in place.

    Args:
        model: a DinoVisionTransformer (possibly wrapped by torch.compile).
        path_or_state_dict: a checkpoint file (.pth/.pt/.safetensors) or its loaded content.
        checkpoint_key: entry holding the state dict, e.g. "teacher" for our training checkpoints
            (looked up at the top level, then under "model"); None auto-detects.
        strict: raise ValueError naming missing/unexpected keys (otherwise they are logged).
        resample_pos_embed: when the checkpoint's position grid has another size than the model's
            (e.g. Meta's 518 px weights into a 224 px training model), resample it bicubically
            instead of failing.

    Returns: LoadResult(missing_keys, unexpected_keys).
    """
    if isinstance(path_or_state_dict, Mapping):
        content, source = path_or_state_dict, "state dict"
    else:
        content, _ = read_checkpoint(path_or_state_dict)
        source = str(path_or_state_dict)
    state_dict = extract_backbone_state_dict(content, checkpoint_key)
    target = getattr(model, "_orig_mod", model)
    state_dict = convert_block_layout(state_dict, getattr(target, "block_chunk_size", 0))

    own = target.state_dict()
    pe = state_dict.get("pos_embed")
    if resample_pos_embed and pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        if pe.shape[0] == 1 and pe.shape[2] == own["pos_embed"].shape[2]:
            logger.info(
                "resampling pos_embed from %s to %s (%s)",
                tuple(pe.shape),
                tuple(own["pos_embed"].shape),
                source,
            )
            state_dict["pos_embed"] = _resample_pos_embed(pe, own["pos_embed"].shape[1])
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"shape mismatch loading {source}: " + "; ".join(mismatched[:_MAX_LISTED_KEYS]))
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {source} does not match the model: missing keys [{_list_keys(missing)}]; "
            f"unexpected keys [{_list_keys(unexpected)}]"
        )
    if missing or unexpected:
        logger.warning(
            "loading %s: missing keys [%s]; unexpected keys [%s]",
            source,
            _list_keys(missing),
            _list_keys(unexpected),
        )
    target.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    logger.info("loaded backbone weights from %s", source)
    return LoadResult(missing, unexpected)


# ---------------------------------------------------------------------------------------- writing
def backbone_config(model: DinoVisionTransformer) -> dict[str, Any]:
    """Constructor arguments that rebuild `model`'s architecture (block_chunks always 0)."""
    model = getattr(model, "_orig_mod", model)
    block = model.iter_blocks()[0]
    if isinstance(block.mlp, SwiGLUFFN):
        ffn_layer, ffn_bias = "swiglufused", block.mlp.w12.bias is not None
    elif isinstance(block.mlp, Mlp):
        ffn_layer, ffn_bias = "mlp", block.mlp.fc1.bias is not None
    else:
        ffn_layer, ffn_bias = "identity", True
    img_h, img_w = model.patch_embed.img_size
    return {
        "img_size": img_h if img_h == img_w else [img_h, img_w],
        "patch_size": model.patch_size,
        "in_chans": model.patch_embed.in_chans,
        "embed_dim": model.embed_dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim if ffn_layer == "mlp" else 4.0,
        "qkv_bias": block.attn.qkv.bias is not None,
        "proj_bias": block.attn.proj.bias is not None,
        "ffn_bias": ffn_bias,
        "init_values": float(block.ls1.init_values) if hasattr(block.ls1, "gamma") else None,
        "ffn_layer": ffn_layer,
        "block_chunks": 0,
        "num_register_tokens": model.num_register_tokens,
        "interpolate_antialias": model.interpolate_antialias,
        "interpolate_offset": model.interpolate_offset,
    }


def export_backbone(model: DinoVisionTransformer, path: PathLike) -> Path:
    """Write `model`'s weights with Meta's key names (flat `blocks.{i}.` layout).

    `.pth`/`.pt`: a plain state dict (loads into Meta's code with strict=True).
    `.safetensors`: the same tensors, plus the architecture (`backbone_config`) as JSON in the
    header metadata under "dinov2_config". The file is written atomically. Returns the path.
    """
    path = Path(path)
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(
            f"unsupported backbone file type {path.suffix!r} for {path}; use .pth, .pt or .safetensors"
        )
    target = getattr(model, "_orig_mod", model)
    state_dict = convert_block_layout(target.state_dict(), 0)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"format": "pt", SAFETENSORS_CONFIG_KEY: json.dumps(backbone_config(target))}
            save_file(state_dict, str(tmp), metadata=metadata)
        else:
            torch.save(state_dict, tmp)
    return path


# ---------------------------------------------------------------------------------------- inference
def infer_backbone_config(
    state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None, head_dim: int = 64
) -> dict[str, Any]:
    """DinoVisionTransformer arguments read off a (flat or chunked) backbone state dict.

    embed_dim from cls_token, patch size and channels from patch_embed.proj.weight, depth from the
    block indices, heads = `num_heads` or else embed_dim / head_dim (64 in every DINOv2 model), registers from
    register_tokens, ffn type from mlp.w12 (SwiGLU) / mlp.fc1 (MLP) / neither (identity), biases and
    LayerScale from key presence, img_size from the length of pos_embed (square grid). Interpolation
    settings cannot be read off the keys; they are left out.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state_dict:
            raise ValueError(
                f"not a DINOv2 backbone state dict: no {key!r} "
                f"(first keys: {_list_keys(sorted(state_dict)[:5])})"
            )
    sd = convert_block_layout(state_dict, 0)
    embed_dim = sd["cls_token"].shape[-1]
    proj = sd["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected [D, C, p, p]")
    patch_size = proj.shape[-1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_INDEX.match(k))), default=-1)
    if depth == 0:
        raise ValueError("not a DINOv2 backbone state dict: no blocks.* keys")
    if num_heads is None:
        if embed_dim % head_dim:
            raise ValueError(
                f"embed_dim {embed_dim} is not a multiple of head_dim {head_dim}; pass num_heads"
            )
        num_heads = embed_dim // head_dim
    grid = sd["pos_embed"].shape[1] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise ValueError(f"pos_embed has {grid} patch positions, not a square grid")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn_layer, hidden = "swiglufused", sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = round(hidden * 3 / 2 / embed_dim, 4)
        if swiglu_hidden_features(int(embed_dim * mlp_ratio)) != hidden:
            mlp_ratio = 4.0 if swiglu_hidden_features(4 * embed_dim) == hidden else None
        if mlp_ratio is None:
            raise ValueError(f"cannot infer mlp_ratio from SwiGLU width {hidden} at embed_dim {embed_dim}")
        ffn_bias = "blocks.0.mlp.w12.bias" in sd
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn_layer, ffn_bias = "mlp", "blocks.0.mlp.fc1.bias" in sd
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    else:
        ffn_layer, ffn_bias, mlp_ratio = "identity", True, 4.0
    return {
        "img_size": side * patch_size,
        "patch_size": patch_size,
        "in_chans": proj.shape[1],
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ffn_bias,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        "ffn_layer": ffn_layer,
        "block_chunks": 0,
        "num_register_tokens": sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
    }


def _stored_config(content: Any, metadata: Mapping[str, str]) -> dict[str, Any]:
    """Architecture hints saved beside the weights: our safetensors metadata, or a training
    checkpoint's `config["student"]` interpolation keys."""
    if SAFETENSORS_CONFIG_KEY in metadata:
        return json.loads(metadata[SAFETENSORS_CONFIG_KEY])
    config = content.get("config") if isinstance(content, Mapping) else None
    student = config.get("student") if isinstance(config, Mapping) else None
    if isinstance(student, Mapping):
        return {k: student[k] for k in ("interpolate_antialias", "interpolate_offset") if k in student}
    return {}


def _without_init(factory) -> nn.Module:
    """Build a model whose every tensor is about to be overwritten by a strict load: construct it
    on the meta device (no random init of millions of weights) and allocate uninitialised storage."""
    with torch.device("meta"):
        model = factory()
    return model.to_empty(device="cpu")


def _split_spec(spec: str) -> tuple[str, str | None]:
    """ "dinov2_vits14_reg:/path/w.pth" -> (name, path); anything else -> (spec, None)."""
    name, sep, rest = spec.partition(":")
    if sep and name in RELEASED_BACKBONES:
        return name, rest
    return spec, None


def load_backbone(
    spec: PathLike,
    device: str | torch.device | None = "cpu",
    pretrained_weights: PathLike | None = None,
    checkpoint_key: str | None = None,
    **overrides: Any,
) -> DinoVisionTransformer:
    """A backbone in eval mode on `device`, from a hub name or a checkpoint file.

    Args:
        spec: a released-model name ("dinov2_vits14_reg", optionally "NAME:PATH" for weights), or a
            checkpoint path (Meta's file, our export, our training checkpoint) whose architecture is
            inferred from its keys (see `infer_backbone_config`).
        device: where to put the model (None: leave it where it was built).
        pretrained_weights: weights for a hub name (random init with a warning when omitted).
        checkpoint_key: entry of the checkpoint holding the weights (auto-detected when None).
        overrides: constructor arguments that replace the named or inferred ones (e.g.
            interpolate_offset, num_heads).

    Interpolation settings of an inferred model come from the file's stored config when it has one,
    else the released models' convention: registers -> antialias on, offset 0; none -> offset 0.1.
    """
    spec_str = os.fspath(spec)
    name, spec_weights = _split_spec(spec_str)
    if name in RELEASED_BACKBONES:
        weights = pretrained_weights if pretrained_weights is not None else spec_weights
        if weights is None:
            logger.warning("no pretrained_weights given for %s: the backbone is randomly initialised", name)
            model = make_released_backbone(name, **overrides)
        else:
            content, _ = read_checkpoint(weights)
            state_dict = extract_backbone_state_dict(content, checkpoint_key)
            if "pos_embed" in state_dict and "img_size" not in overrides:
                # Keep the checkpoint's own grid (e.g. our 224 px teacher) instead of resampling it.
                overrides["img_size"] = infer_backbone_config(state_dict)["img_size"]
            model = _without_init(lambda: make_released_backbone(name, **overrides))
            load_pretrained_weights(model, state_dict, strict=True)
        return (model if device is None else model.to(device)).eval()

    path = Path(spec_str)
    if not path.exists():
        if spec_str.startswith("dinov2_"):
            raise ValueError(
                f"unknown backbone name {spec_str!r}; expected one of {sorted(RELEASED_BACKBONES)}"
            )
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    content, metadata = read_checkpoint(path)
    state_dict = extract_backbone_state_dict(content, checkpoint_key)
    stored = _stored_config(content, metadata)
    config = infer_backbone_config(state_dict, num_heads=overrides.get("num_heads", stored.get("num_heads")))
    registers = config["num_register_tokens"] > 0
    config["interpolate_antialias"] = stored.get("interpolate_antialias", registers)
    config["interpolate_offset"] = stored.get("interpolate_offset", 0.0 if registers else 0.1)
    if not {"interpolate_antialias", "interpolate_offset"} <= set(stored) | set(overrides):
        logger.warning(
            "%s stores no interpolation settings; assuming the released models' (antialias=%s, offset=%s). "
            "Pass interpolate_antialias/interpolate_offset if the model was trained otherwise.",
            path,
            config["interpolate_antialias"],
            config["interpolate_offset"],
        )
    for key in ("num_heads", "mlp_ratio", "init_values", "img_size"):
        if key in stored:
            config[key] = stored[key]
    config.update(overrides)
    model = _without_init(lambda: DinoVisionTransformer(**config))
    load_pretrained_weights(model, state_dict, strict=True)
    logger.info("built backbone from %s: %s", path, config)
    return (model if device is None else model.to(device)).eval()


__all__ = [
    "LoadResult",
    "backbone_config",
    "export_backbone",
    "extract_backbone_state_dict",
    "infer_backbone_config",
    "load_backbone",
    "load_pretrained_weights",
    "read_checkpoint",
]
