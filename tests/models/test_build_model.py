from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dinov2.layers import DropPath, SwiGLUFFNFused
from dinov2.models import build_model, build_model_from_cfg

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "dinov2" / "configs" / "ssl_default_config.yaml"


def cfg(**student):
    c = OmegaConf.load(DEFAULT_CONFIG)
    c.student.arch = "vit_small"
    c.student.patch_size = 14
    c.crops.global_crops_size = 56
    for k, v in student.items():
        c.student[k] = v
    return c


def test_build_model_from_default_config():
    c = cfg(
        num_register_tokens=4, drop_path_rate=0.2, drop_path_uniform=True, layerscale=1e-4, block_chunks=4
    )
    with torch.device("meta"):  # structure only: skip initialising real weights
        student, teacher, embed_dim = build_model_from_cfg(c)
    assert embed_dim == 384 == student.embed_dim == teacher.embed_dim
    for m in (student, teacher):
        assert m.pos_embed.shape == (1, 1 + 4 * 4, 384)  # 56 px / 14 = 4x4 grid
        assert m.num_register_tokens == 4 and m.chunked_blocks and len(m.blocks) == 4
        assert m.iter_blocks()[0].ls1.init_values == 1e-4 and m.iter_blocks()[0].ls1.gamma.shape == (384,)
        assert m.interpolate_offset == 0.1 and not m.interpolate_antialias
    assert all(b.sample_drop_ratio == 0.2 for b in student.iter_blocks())
    assert all(isinstance(b.drop_path1, DropPath) for b in student.iter_blocks())
    assert all(
        b.sample_drop_ratio == 0.0 and isinstance(b.drop_path1, nn.Identity) for b in teacher.iter_blocks()
    )


def test_build_model_only_teacher_and_options():
    c = cfg(ffn_layer="swiglufused", qkv_bias=False, layerscale=None)
    with torch.device("meta"):  # structure only: skip initialising real weights
        teacher, embed_dim = build_model(c.student, only_teacher=True, img_size=28)
    assert embed_dim == 384 and teacher.pos_embed.shape == (1, 5, 384)
    blk = teacher.iter_blocks()[0]
    assert (
        isinstance(blk.mlp, SwiGLUFFNFused) and blk.attn.qkv.bias is None and isinstance(blk.ls1, nn.Identity)
    )


def test_build_model_accepts_plain_mapping_and_rejects_unknown_arch():
    with torch.device("meta"):
        student, teacher, d = build_model({"arch": "vit_small_memeff", "patch_size": 14}, img_size=28)
    assert d == 384 and student.patch_size == 14
    with pytest.raises(ValueError, match="unknown student.arch 'vit_huge'"):
        build_model({"arch": "vit_huge"})
    with pytest.raises(ValueError, match="missing the required key 'arch'"):
        build_model({"patch_size": 14})


def test_width_depth_and_heads_override_the_arch_for_small_models():
    c = cfg(embed_dim=48, depth=3, num_heads=4, drop_path_rate=0.1, layerscale=None)
    student, teacher, embed_dim = build_model_from_cfg(c)
    assert embed_dim == 48 == student.embed_dim == teacher.embed_dim
    for m in (student, teacher):
        assert len(m.iter_blocks()) == 3 and m.iter_blocks()[0].attn.num_heads == 4
    # Parameters of one block by hand: 2 LayerNorms (2 * 2 * 48), qkv (48 * 144 + 144), proj
    # (48 * 48 + 48), MLP with ratio 4: fc1 (48 * 192 + 192) and fc2 (192 * 48 + 48); no LayerScale.
    per_block = 4 * 48 + (48 * 144 + 144) + (48 * 48 + 48) + (48 * 192 + 192) + (192 * 48 + 48)
    assert sum(p.numel() for b in student.iter_blocks() for p in b.parameters()) == 3 * per_block
    assert all(b.sample_drop_ratio == 0.0 for b in teacher.iter_blocks())
    # Without overrides the arch's own sizes (ViT-S: 384 wide, 12 blocks, 6 heads).
    with torch.device("meta"):
        s, _, d = build_model_from_cfg(cfg(embed_dim=None, depth=None, num_heads=None))
    assert d == 384 and len(s.iter_blocks()) == 12 and s.iter_blocks()[0].attn.num_heads == 6
