"""Attention maps of the CLS and register tokens over the image patches (last block).

For each image: the last block's softmax attention ``[H, T, T]`` (``T = 1 + R + N``, tokens in
the order cls, registers, patches) is cut to the rows of the CLS and register queries and the
columns of the patch keys, giving per-head maps on the patch grid. The values are the attention
probabilities themselves (the mass a token puts on each patch; the cls/register columns are
dropped, not renormalised). They are upsampled to the image size and overlaid on it, one grid
PNG per image: rows CLS, reg0..reg{R-1}; columns the image, the head average, head 0..H-1.

Example::

    maps = attention_to_patch_maps(model.get_last_self_attention(x), model.num_register_tokens, (16, 16))
    save_attention_grids("dinov2_vits14_reg:w.pth", ["cell1.jpg", "cell2.jpg"], "out/attention")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.utils.device import resolve_device
from dinov2.utils.files import atomic_path


def attention_to_patch_maps(
    attn: torch.Tensor, num_register_tokens: int, grid_hw: tuple[int, int]
) -> torch.Tensor:
    """Maps of the CLS and register queries over the patch keys.

    Args:
        attn: attention probabilities [B, H, T, T] with T = 1 + R + gh * gw.
        num_register_tokens: R.
        grid_hw: (gh, gw) patch grid (row-major patch order).

    Returns:
        [B, 1 + R, H, gh, gw]: index 0 is the CLS token, 1..R the registers.
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [B, H, T, T], got {tuple(attn.shape)}")
    gh, gw = grid_hw
    r = int(num_register_tokens)
    t = attn.shape[-1]
    if r < 0 or t != 1 + r + gh * gw:
        raise ValueError(f"{t} tokens do not match 1 cls + {r} registers + {gh}x{gw} patches")
    b, h = attn.shape[:2]
    maps = attn[:, :, : 1 + r, 1 + r :]  # [B, H, 1+R, N]
    return maps.permute(0, 2, 1, 3).reshape(b, 1 + r, h, gh, gw)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize maps [..., gh, gw] to [..., *size] (nearest keeps patch borders visible)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode=mode)
    return out.reshape(*lead, *size)


def token_names(num_register_tokens: int) -> list[str]:
    """``["CLS", "reg0", ...]``: row labels of the maps."""
    return ["CLS"] + [f"reg{i}" for i in range(num_register_tokens)]


@torch.inference_mode()
def compute_attention_maps(model, images: torch.Tensor) -> torch.Tensor:
    """``attention_to_patch_maps`` of ``model.get_last_self_attention(images)``: [B, 1+R, H, gh, gw]."""
    if not hasattr(model, "get_last_self_attention"):
        raise ValueError(
            f"{type(model).__name__} has no get_last_self_attention; attention maps need a ViT backbone"
        )
    p = model.patch_size
    hh, ww = images.shape[-2:]
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} must be a multiple of the patch size {p}")
    attn = model.get_last_self_attention(images)
    return attention_to_patch_maps(attn.float(), model.num_register_tokens, (hh // p, ww // p))


def _normalise01(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def plot_attention_grid(
    image: np.ndarray,
    maps: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    alpha: float = 0.55,
    cmap: str = "inferno",
    title: str | None = None,
    cell_inches: float = 1.6,
    dpi: int = 100,
) -> Path:
    """One grid PNG: rows CLS, reg0.. ; columns image, head mean, head 0..H-1.

    Args:
        image: [S, S, 3] uint8 or float in [0, 1] (the crop the model saw).
        maps: [1 + R, H, gh, gw] attention maps of that image.
        path: output .png.
        alpha: opacity of the overlaid map.
        cmap: colour map of the overlay (each map scaled to its own min..max).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = torch.as_tensor(maps).float()
    if maps.ndim != 4:
        raise ValueError(f"maps must be [1+R, H, gh, gw], got {tuple(maps.shape)}")
    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be [S, S, 3], got {img.shape}")
    n_tok, n_heads = maps.shape[:2]
    up = upsample_maps(torch.cat([maps.mean(1, keepdim=True), maps], dim=1), img.shape[:2]).numpy()
    names = token_names(n_tok - 1)
    cols = 2 + n_heads
    fig = Figure(figsize=(cell_inches * cols, cell_inches * n_tok + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_tok, cols, squeeze=False)
    for r in range(n_tok):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(img)
            if c > 0:
                ax.imshow(_normalise01(up[r, c - 1]), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            if r == 0:
                ax.set_title("image" if c == 0 else "mean" if c == 1 else f"head {c - 2}", fontsize=8)
            if c == 0:
                ax.set_ylabel(names[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def save_attention_grids(
    backbone,
    image_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    image_size: int = 224,
    resize_size: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    save_arrays: bool = True,
) -> list[Path]:
    """Attention grid PNGs (and the raw maps as ``.npy``) for each image.

    Args:
        backbone: a ViT spec or module (see :func:`dinov2.eval.features.extract_features`).
        image_paths: images to show.
        out_dir: receives ``<stem>_attention.png`` (and ``<stem>_attention.npy``, [1+R, H, gh, gw]).
        image_size, resize_size: preprocessing (as for feature extraction).
        device: default CUDA when available.
        seed: random-initialisation seed for a hub name without weights.

    Returns:
        The PNG paths, in input order.
    """
    from dinov2.data.image_io import load_rgb
    from dinov2.eval.backbones import load_eval_backbone
    from dinov2.eval.features import Preprocessing

    if not image_paths:
        raise ValueError("no images given for attention maps")
    for p in image_paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
    dev = resolve_device(device)
    model = load_eval_backbone(backbone, dev, seed)
    if not hasattr(model, "get_last_self_attention"):
        raise ValueError(f"backbone {backbone!r} is not a ViT; attention maps need one")
    if image_size % model.patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {model.patch_size}")
    prep = Preprocessing(image_size=image_size, resize_size=resize_size)
    transform = prep.transform()
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    out = Path(out_dir)
    written = []
    used: set[str] = set()
    for p in image_paths:
        x = transform(load_rgb(p))
        maps = compute_attention_maps(model, x.unsqueeze(0).to(dev))[0].cpu()
        shown = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        stem = Path(p).stem
        while stem in used:  # same file name in two class folders
            stem = f"{Path(p).parent.name}_{stem}" if stem == Path(p).stem else f"{stem}_"
        used.add(stem)
        png = plot_attention_grid(shown, maps, out / f"{stem}_attention.png", title=str(Path(p).name))
        if save_arrays:
            with atomic_path(out / f"{stem}_attention.npy") as tmp:
                np.save(tmp, maps.numpy())
        written.append(png)
    return written
