"""Attention maps: token/patch indexing by hand, and a hand-built ViT whose attention must peak on
a planted high-contrast patch."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval.attention_maps import (
    attention_to_patch_maps,
    compute_attention_maps,
    plot_attention_grid,
    upsample_maps,
)
from dinov2.models.vision_transformer import DinoVisionTransformer

D, HEADS, R, P, S = 16, 2, 2, 8, 32  # 4x4 patch grid


def test_attention_to_patch_maps_indexing():
    b, h, gh, gw, r = 2, 3, 2, 3, 1
    t = 1 + r + gh * gw
    # attn[b, h, q, k] = 1000 b + 100 h + 10 q + k: every entry says where it came from.
    attn = (
        1000 * torch.arange(b).view(b, 1, 1, 1)
        + 100 * torch.arange(h).view(1, h, 1, 1)
        + 10 * torch.arange(t).view(1, 1, t, 1)
        + torch.arange(t).view(1, 1, 1, t)
    ).float()
    maps = attention_to_patch_maps(attn, r, (gh, gw))
    assert maps.shape == (b, 1 + r, h, gh, gw)
    for bi in range(b):
        for q in range(1 + r):
            for hi in range(h):
                for i in range(gh):
                    for j in range(gw):
                        key = 1 + r + i * gw + j  # patches follow cls + registers, row-major
                        assert maps[bi, q, hi, i, j] == 1000 * bi + 100 * hi + 10 * q + key
    with pytest.raises(ValueError, match="do not match"):
        attention_to_patch_maps(attn, 2, (gh, gw))


def _planted_vit():
    """One block; every query has a constant q (bias); head 0's keys read the patch brightness,
    head 1's keys its negative. Head 0 must look at the brightest patch, head 1 at the darkest."""
    m = DinoVisionTransformer(
        img_size=S, patch_size=P, embed_dim=D, depth=1, num_heads=HEADS, num_register_tokens=R, block_chunks=0
    )
    hd = D // HEADS
    with torch.no_grad():
        for prm in m.parameters():
            prm.zero_()
        m.patch_embed.proj.weight[0] = 1.0 / (3 * P * P)  # dim 0: mean patch value
        m.patch_embed.proj.bias[1] = 1.0  # dim 1: constant, so LayerNorm keeps the sign of dim 0
        blk = m.blocks[0]
        blk.norm1.weight.fill_(1.0)
        blk.attn.qkv.bias[:D] = 2.0  # q = 2 for every token and head
        blk.attn.qkv.weight[D : D + hd, 0] = 2.0  # head 0 keys: +brightness
        blk.attn.qkv.weight[D + hd : D + 2 * hd, 0] = -2.0  # head 1 keys: -brightness
    return m.eval()


def test_attention_peaks_on_planted_patch():
    m = _planted_vit()
    x = torch.zeros(2, 3, S, S)
    x[0, :, 8:16, 16:24] = 3.0  # bright patch at (1, 2)
    x[0, :, 0:8, 0:8] = -3.0  # dark patch at (0, 0)
    x[1, :, 24:32, 0:8] = 3.0  # bright patch at (3, 0)
    x[1, :, 16:24, 24:32] = -3.0  # dark patch at (2, 3)
    maps = compute_attention_maps(m, x)
    assert maps.shape == (2, 1 + R, HEADS, 4, 4)
    expected = {0: [(1, 2), (0, 0)], 1: [(3, 0), (2, 3)]}
    for b in range(2):
        for tok in range(1 + R):  # CLS and both registers
            for h in range(HEADS):
                peak = divmod(int(maps[b, tok, h].argmax()), 4)
                assert peak == expected[b][h], (b, tok, h)
    # The attention mass on patches is at most 1 (cls/register columns dropped).
    assert float(maps.sum((-1, -2)).max()) <= 1.0 + 1e-5


def test_upsample_and_grid_png(tmp_path):
    m = _planted_vit()
    x = torch.zeros(1, 3, S, S)
    x[0, :, 8:16, 16:24] = 3.0
    maps = compute_attention_maps(m, x)[0]
    up = upsample_maps(maps, (S, S))
    assert up.shape == (1 + R, HEADS, S, S)
    assert torch.equal(up[0, 0, 8:16, 16:24], maps[0, 0, 1, 2].expand(8, 8))
    img = np.zeros((S, S, 3), np.uint8)
    a = plot_attention_grid(img, maps, tmp_path / "a.png", dpi=40)
    x2 = torch.zeros(1, 3, S, S)
    x2[0, :, 24:32, 0:8] = 3.0
    b = plot_attention_grid(img, compute_attention_maps(m, x2)[0], tmp_path / "b.png", dpi=40)
    ia, ib = np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB"))
    # Grid: 1+R rows and 2+H columns of 1.6-inch cells at 40 dpi.
    assert ia.shape == (round(1.6 * (1 + R) * 40), round(1.6 * (2 + HEADS) * 40), 3)
    assert ia.shape == ib.shape and (ia != ib).any()


def test_attention_needs_vit_and_patch_multiple():
    with pytest.raises(ValueError, match="get_last_self_attention"):
        compute_attention_maps(torch.nn.Identity(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        compute_attention_maps(_planted_vit(), torch.zeros(1, 3, 30, 30))
