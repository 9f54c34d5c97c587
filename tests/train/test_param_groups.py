"""Parameter groups against multipliers worked out by hand for a tiny ViT-shaped model."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dinov2.train.param_groups import (
    fuse_params_groups,
    get_params_groups,
    get_params_groups_with_decay,
    get_vit_lr_decay_rate,
)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(d))


class TinyViT(nn.Module):
    """Same parameter names as DINOv2's DinoVisionTransformer (2 blocks, optional chunking)."""

    def __init__(self, d=4, chunked=False):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        blocks = [_Block(d), _Block(d)]
        if chunked:  # DINOv2's BlockChunk: identity padding keeps global block indices
            self.blocks = nn.ModuleList(
                [nn.ModuleList([blocks[0]]), nn.ModuleList([nn.Identity(), blocks[1]])]
            )
        else:
            self.blocks = nn.ModuleList(blocks)
        self.n_blocks = 2
        self.norm = nn.LayerNorm(d)


def _expected(decay=0.9, pe=0.2):
    # num_layers = 2: layer 0 -> decay^3, block 0 -> decay^2, block 1 -> decay, rest -> 1
    return {
        "cls_token": (decay**3, 1.0),
        "pos_embed": (decay**3, 1.0),
        "register_tokens": (decay**3, 1.0),
        "mask_token": (decay**3, 1.0),
        "patch_embed.proj.weight": (decay**3 * pe, 1.0),
        "patch_embed.proj.bias": (decay**3 * pe, 0.0),
        "blocks.0.norm1.weight": (decay**2, 0.0),
        "blocks.0.norm1.bias": (decay**2, 0.0),
        "blocks.0.attn.weight": (decay**2, 1.0),
        "blocks.0.attn.bias": (decay**2, 0.0),
        "blocks.0.ls1.gamma": (decay**2, 0.0),
        "blocks.1.norm1.weight": (decay, 0.0),
        "blocks.1.norm1.bias": (decay, 0.0),
        "blocks.1.attn.weight": (decay, 1.0),
        "blocks.1.attn.bias": (decay, 0.0),
        "blocks.1.ls1.gamma": (decay, 0.0),
        "norm.weight": (1.0, 0.0),
        "norm.bias": (1.0, 0.0),
    }


@pytest.mark.parametrize("chunked", [False, True])
def test_per_parameter_multipliers_by_hand(chunked):
    model = TinyViT(chunked=chunked)
    groups = get_params_groups_with_decay(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    got = {}
    for g in groups:
        name = g["name"]
        if chunked:  # blocks.<chunk>.<index>.x -> blocks.<index>.x for comparison
            parts = name.split(".")
            if parts[0] == "blocks":
                name = ".".join(["blocks"] + parts[2:])
        got[name] = (g["lr_multiplier"], g["wd_multiplier"])
        assert g["is_last_layer"] is False
    expected = _expected()
    assert got.keys() == expected.keys()
    for name, (lr_mult, wd_mult) in expected.items():
        assert got[name][0] == pytest.approx(lr_mult), name
        assert got[name][1] == wd_mult, name


def test_decay_rate_of_prefixed_names_and_heads():
    assert get_vit_lr_decay_rate("backbone.blocks.3.mlp.fc1.weight", 0.5, num_layers=4) == pytest.approx(0.5)
    assert get_vit_lr_decay_rate("backbone.pos_embed", 0.5, num_layers=4) == pytest.approx(0.5**5)
    assert get_vit_lr_decay_rate("dino_head.mlp.0.weight", 0.5, num_layers=4) == 1.0
    assert get_vit_lr_decay_rate("blocks.0._fsdp_wrapped_module.attn.qkv.weight", 0.5, 4, True) == 0.5**4


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(4, 3)
        self.last_layer = nn.Module()
        self.last_layer.weight_g = nn.Parameter(torch.ones(5, 1))
        self.last_layer.weight_v = nn.Parameter(torch.ones(5, 3))


def test_fused_groups_for_student_moduledict():
    student = nn.ModuleDict({"backbone": TinyViT(), "dino_head": _Head()})
    cfg = OmegaConf.create({"layerwise_decay": 0.9, "patch_embed_lr_mult": 0.2})
    groups = get_params_groups(student, cfg)
    # backbone: decay^3 (tokens), decay^3*pe with wd and without (patch embed weight / bias),
    # decay^2 wd/no-wd, decay wd/no-wd, 1 no-wd (final norm) -> 8 groups
    # head: mlp weight (1, wd), mlp bias (1, no wd), last layer (1, wd, last) -> 3 groups
    keys = [(round(g["lr_multiplier"], 6), g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert keys == [
        (0.729, 1.0, False),
        (round(0.729 * 0.2, 6), 1.0, False),
        (round(0.729 * 0.2, 6), 0.0, False),
        (0.81, 0.0, False),
        (0.81, 1.0, False),
        (0.9, 0.0, False),
        (0.9, 1.0, False),
        (1.0, 0.0, False),
        (1.0, 1.0, False),
        (1.0, 0.0, False),
        (1.0, 1.0, True),
    ]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(student.parameters()))
    last = groups[-1]["params"]
    assert {id(p) for p in last} == {
        id(student.dino_head.last_layer.weight_g),
        id(student.dino_head.last_layer.weight_v),
    }
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_frozen_parameters_skipped_unless_included():
    model = TinyViT()
    model.norm.weight.requires_grad_(False)
    names = [g["name"] for g in get_params_groups_with_decay(model)]
    assert "norm.weight" not in names
    names = [g["name"] for g in get_params_groups_with_decay(model, include_frozen=True)]
    assert "norm.weight" in names


def test_fuse_keeps_first_appearance_order():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    d = [
        {"params": a, "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False},
        {"params": b, "lr_multiplier": 0.5, "wd_multiplier": 1.0, "is_last_layer": False},
        {"params": c, "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False},
    ]
    fused = fuse_params_groups(d)
    assert [len(g["params"]) for g in fused] == [2, 1]
    assert fused[0]["params"][1] is c


def test_bad_decay_raises():
    with pytest.raises(ValueError, match="layerwise_decay"):
        get_params_groups_with_decay(TinyViT(), lr_decay_rate=0.0)


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_real_backbone_multipliers(block_chunks):
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(
        img_size=28, patch_size=7, embed_dim=16, depth=4, num_heads=2, block_chunks=block_chunks,
        num_register_tokens=1, init_values=1.0,
    )  # fmt: skip
    groups = {
        g["name"]: g for g in get_params_groups_with_decay(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.1)
    }
    assert len(groups) == len(list(model.parameters()))
    prefix = {0: "blocks.{i}.", 2: "blocks.{c}.{i}."}[block_chunks]

    def block(i, rest):
        return prefix.format(c=i // 2, i=i) + rest

    # depth 4: layer 0 -> 0.5^5, block i -> 0.5^(4 - i), final norm -> 1
    expected = {
        "cls_token": (0.5**5, 1.0),
        "register_tokens": (0.5**5, 1.0),
        "pos_embed": (0.5**5, 1.0),
        "mask_token": (0.5**5, 1.0),
        "patch_embed.proj.weight": (0.5**5 * 0.1, 1.0),
        block(0, "attn.qkv.weight"): (0.5**4, 1.0),
        block(1, "mlp.fc1.bias"): (0.5**3, 0.0),
        block(2, "ls1.gamma"): (0.5**2, 0.0),
        block(3, "norm2.weight"): (0.5, 0.0),
        block(3, "attn.proj.weight"): (0.5, 1.0),
        "norm.weight": (1.0, 0.0),
    }
    for name, (lr_mult, wd_mult) in expected.items():
        assert groups[name]["lr_multiplier"] == pytest.approx(lr_mult), name
        assert groups[name]["wd_multiplier"] == wd_mult, name
