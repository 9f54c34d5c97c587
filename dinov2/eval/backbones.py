"""The backbone an evaluation runs: what identifies its weights, loading it frozen, and pooling its
tokens into one feature vector per image.

A backbone is given as a checkpoint path, a hub name (``dinov2_vits14_reg``, optionally
``NAME:WEIGHTS.pth``), a baseline spec (``"pixels:S"``, ``"colorstats"``, see
:mod:`dinov2.eval.baselines`) or an ``nn.Module``. Poolings (:data:`POOLINGS`):

- ``"cls"``: the class token of each of the last ``n_last_blocks`` blocks, concatenated;
- ``"avgpool"``: the mean of the patch tokens (registers excluded) of each of those blocks;
- ``"cls+avgpool"``: both, concatenated (DINOv2's linear-probe features).

Example::

    model = load_eval_backbone("dinov2_vits14_reg:weights.pth", device="cpu")
    feats = pool_tokens(model, images, "cls+avgpool")      # [B, 2 * embed_dim]
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov2.eval.baselines import is_baseline_spec, make_baseline

POOLINGS = ("cls", "avgpool", "cls+avgpool")


def _file_signature(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_signature(backbone: str | os.PathLike | nn.Module, seed: int = 0) -> dict[str, Any]:
    """What identifies a backbone's weights, for the cache key (no model is built for strings)."""
    if isinstance(backbone, nn.Module):
        return {"module": type(backbone).__name__, "weights_sha256": _weights_hash(backbone)}
    spec = os.fspath(backbone)
    if is_baseline_spec(spec):
        return {"baseline": spec}
    from dinov2.models.vision_transformer import RELEASED_BACKBONES

    name, sep, rest = spec.partition(":")
    if sep and name in RELEASED_BACKBONES:
        if not Path(rest).is_file():
            raise FileNotFoundError(f"pretrained weights for {name} not found: {rest}")
        return {"name": name, "weights": _file_signature(rest)}
    if spec in RELEASED_BACKBONES:
        return {"name": spec, "random_init_seed": seed}
    if not Path(spec).is_file():
        raise FileNotFoundError(
            f"backbone checkpoint not found: {spec} (expected a checkpoint file, a hub name such as "
            f"'dinov2_vits14_reg' or 'dinov2_vits14_reg:WEIGHTS.pth', 'pixels:S' or 'colorstats')"
        )
    return {"checkpoint": _file_signature(spec)}


def load_eval_backbone(
    backbone: str | os.PathLike | nn.Module,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> nn.Module:
    """An eval-mode model on ``device`` from a spec (see :func:`extract_features`) or a module.

    A hub name without weights is randomly initialised under ``torch.manual_seed(seed)`` (without
    touching the global RNG state), so a "random ViT" baseline is reproducible. ``overrides`` go
    to :func:`dinov2.models.weights.load_backbone` (constructor arguments such as ``depth``).
    """
    if isinstance(backbone, nn.Module):
        return backbone.to(device).eval()
    spec = os.fspath(backbone)
    if is_baseline_spec(spec):
        return make_baseline(spec).to(device).eval()
    backbone_signature(spec, seed)  # clear FileNotFoundError before any loading
    from dinov2.models.weights import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_backbone(spec, device=device, **overrides).eval()


def pool_tokens(
    model: nn.Module, images: torch.Tensor, pooling: str = "cls", n_last_blocks: int = 1
) -> torch.Tensor:
    """Features ``[B, D']`` of a batch (see module doc for the poolings)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not hasattr(model, "get_intermediate_layers"):
        out = model(images)
        if out.ndim != 2:
            raise ValueError(
                f"a model without get_intermediate_layers must return [B, D], got {tuple(out.shape)}"
            )
        return out
    layers = model.get_intermediate_layers(images, n_last_blocks, return_class_token=True, norm=True)
    parts = []
    if pooling in ("cls", "cls+avgpool"):
        parts += [cls for _, cls in layers]
    if pooling in ("avgpool", "cls+avgpool"):
        parts += [patches.mean(dim=1) for patches, _ in layers]
    return torch.cat(parts, dim=-1)
