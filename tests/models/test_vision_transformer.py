"""Behaviour of DinoVisionTransformer beyond the numerical contract: sizes, counts, init, layouts,
masking invariants, multi-crop packing, errors and mixed precision."""

from functools import partial

import pytest
import torch
from torch import nn

from dinov2.layers import Attention, Block, DropPath, MemEffAttention, NestedTensorBlock, SwiGLUFFNFused
from dinov2.models.vision_transformer import (
    RELEASED_BACKBONES,
    DinoVisionTransformer,
    make_released_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=0.1,
                num_register_tokens=2, block_chunks=0)  # fmt: skip
    args.update(kw)
    return DinoVisionTransformer(**args).eval()


# ------------------------------------------------------------------ parameter counts (meta device)
def vit_param_count(d, depth, registers, grid, ffn="mlp", patch=14, chans=3):
    """Hand formula. Patch embed: chans*p*p*D + D. Tokens: cls D, pos (1+grid)*D, registers R*D,
    mask D. Per block: 2 norms 4D, qkv 3D^2+3D, proj D^2+D, 2 LayerScales 2D, and the FFN: MLP
    (ratio 4) 8D^2+5D, or SwiGLU with width H=((int(4D*2/3)+7)//8)*8: w12 2HD+2H, w3 HD+D.
    Final norm 2D. MLP blocks: 12D^2 + 15D."""
    if ffn == "mlp":
        ffn_params = 8 * d * d + 5 * d
    else:
        h = (int(4 * d * 2 / 3) + 7) // 8 * 8
        ffn_params = 2 * h * d + 2 * h + h * d + d
    block = 4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + ffn_params
    tokens = d + (1 + grid) * d + registers * d + d
    return chans * patch * patch * d + d + tokens + depth * block + 2 * d


@pytest.mark.parametrize(
    "name,d,depth,ffn,low,high",
    [
        ("dinov2_vits14", 384, 12, "mlp", 21e6, 23e6),  # published: ~22M (21M in Meta's table)
        ("dinov2_vitb14_reg", 768, 12, "mlp", 85e6, 88e6),  # ~86M
        ("dinov2_vitl14", 1024, 24, "mlp", 300e6, 310e6),  # ~304M (300M in Meta's table)
        ("dinov2_vitg14_reg", 1536, 40, "swiglu", 1.1e9, 1.2e9),  # ~1.1B (1,100M)
    ],
)
def test_released_parameter_counts_on_meta_device(name, d, depth, ffn, low, high):
    with torch.device("meta"):
        model = make_released_backbone(name)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    n = sum(p.numel() for p in params)
    registers = 4 if name.endswith("_reg") else 0
    assert n == vit_param_count(d, depth, registers, grid=37 * 37, ffn=ffn)
    assert low <= n <= high


def test_vit_constructors_shapes():
    with torch.device("meta"):
        for fn, d, depth, heads in [(vit_small, 384, 12, 6), (vit_base, 768, 12, 12),
                                    (vit_large, 1024, 24, 16), (vit_giant2, 1536, 40, 24)]:  # fmt: skip
            m = fn(patch_size=14, img_size=224, num_register_tokens=4, block_chunks=0)
            assert (m.embed_dim, m.num_features, m.n_blocks, m.num_heads) == (d, d, depth, heads)
            assert m.patch_size == 14 and m.num_register_tokens == 4
            assert m.pos_embed.shape == (1, 257, d) and m.register_tokens.shape == (1, 4, d)
            assert isinstance(m.blocks[0], NestedTensorBlock) and isinstance(
                m.blocks[0].attn, MemEffAttention
            )


def test_named_constructors_accept_overrides():
    with torch.device("meta"):
        m = vit_small(patch_size=14, depth=2, embed_dim=64, num_heads=4, img_size=28)
    assert (m.n_blocks, m.embed_dim, m.num_heads) == (2, 64, 4)


def test_released_hyperparameters():
    assert set(RELEASED_BACKBONES) == {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")}
    with torch.device("meta"):
        g = make_released_backbone("dinov2_vitg14_reg")
        s = make_released_backbone("dinov2_vits14")
    assert isinstance(g.blocks[0].mlp, SwiGLUFFNFused) and g.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert g.num_register_tokens == 4 and g.interpolate_antialias and g.interpolate_offset == 0.0
    assert s.num_register_tokens == 0 and not s.interpolate_antialias and s.interpolate_offset == 0.1
    assert s.pos_embed.shape == (1, 1 + (518 // 14) ** 2, 384) == (1, 1370, 384)
    assert s.blocks[0].ls1.init_values == 1e-5


# ------------------------------------------------------------------ init
def test_init_follows_dinov2():
    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=224, patch_size=14, embed_dim=192, depth=2, num_heads=3,
                              init_values=1e-5, num_register_tokens=4)  # fmt: skip
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002
    assert 0 < m.cls_token.abs().max() < 1e-5 and 0 < m.register_tokens.abs().max() < 1e-5
    assert torch.all(m.mask_token == 0)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            assert abs(mod.weight.std().item() - 0.02) < 0.002, name
            assert torch.all(mod.bias == 0), name
    assert torch.all(m.blocks[0][0].ls1.gamma == 1e-5)  # default block_chunks=1: one chunk
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0)


# ------------------------------------------------------------------ API
def test_forward_returns_head_of_cls_and_training_dict():
    m = tiny()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = m.forward_features(x)
        torch.testing.assert_close(m(x), out["x_norm_clstoken"])
        d = m(x, is_training=True)
    assert set(d) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert d["x_prenorm"].shape == (2, 1 + 2 + 16, 32) and d["x_norm_regtokens"].shape == (2, 2, 32)


def test_masked_patches_ignore_their_pixels():
    """Masked patch embeddings are replaced by mask_token: changing the pixels of a masked patch
    changes nothing, changing an unmasked patch changes the output."""
    m = tiny()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(1, 3, 56, 56)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 5] = True  # patch row 1, col 1 -> pixels [14:28, 14:28]
    x2 = x.clone()
    x2[:, :, 14:28, 14:28] += 5.0
    x3 = x.clone()
    x3[:, :, 0:14, 0:14] += 5.0
    with torch.no_grad():
        a = m.forward_features(x, masks)["x_prenorm"]
        b = m.forward_features(x2, masks)["x_prenorm"]
        c = m.forward_features(x3, masks)["x_prenorm"]
        unmasked = m.forward_features(x2)["x_prenorm"]
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3 and (a - unmasked).abs().max() > 1e-3
    assert m.forward_features(x, masks)["masks"] is masks


def test_registers_have_no_position_embedding():
    m = tiny(num_register_tokens=3)
    tokens = m.prepare_tokens_with_masks(torch.randn(2, 3, 56, 56))
    torch.testing.assert_close(tokens[:, 1:4], m.register_tokens.expand(2, -1, -1))
    # CLS does get its position embedding
    torch.testing.assert_close(tokens[:, 0], (m.cls_token + m.pos_embed[:, :1])[:, 0].expand(2, -1))


@pytest.mark.parametrize("train", [False, True])
def test_forward_features_list_equals_separate_calls(train):
    m = tiny(drop_path_rate=0.0)
    m.train(train)
    xs = [torch.randn(2, 3, 56, 56), torch.randn(5, 3, 28, 28), torch.randn(1, 3, 28, 42)]
    masks = [torch.rand(2, 16) < 0.5, None, torch.rand(1, 6) < 0.5]
    with torch.no_grad():
        outs = m.forward_features(xs, masks)
        assert len(outs) == 3
        for x, mask, out in zip(xs, masks, outs):
            ref = m.forward_features(x, mask)
            assert out["masks"] is mask
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
                torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=0)


def test_forward_features_list_with_chunks_and_gradients():
    m = tiny(block_chunks=2)
    xs = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)]
    outs = m.forward_features_list(xs, None)
    sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    assert set(grads) == {k for k, _ in m.named_parameters()} - {"mask_token"}  # no masks: no mask grad
    m.zero_grad()
    sum(m.forward_features(x)["x_norm_clstoken"].sum() + m.forward_features(x)["x_norm_patchtokens"].sum()
        for x in xs).backward()  # fmt: skip
    for k, g in grads.items():
        torch.testing.assert_close(g, m.get_parameter(k).grad, atol=1e-4, rtol=1e-4, msg=k)


def test_drop_path_schedule_and_teacher_without_it():
    m = tiny(drop_path_rate=0.3)
    rates = [b.sample_drop_ratio for b in m.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 4))
    assert isinstance(m.blocks[0].drop_path1, nn.Identity) and isinstance(m.blocks[3].drop_path1, DropPath)
    uniform = tiny(drop_path_rate=0.3, drop_path_uniform=True)
    assert [b.sample_drop_ratio for b in uniform.blocks] == [0.3] * 4


def test_block_chunks_keep_global_indices_and_load_both_layouts():
    chunked = tiny(depth=6, block_chunks=3)  # 2 blocks per chunk
    keys = [k for k in chunked.state_dict() if k.endswith("norm1.weight")]
    assert keys == [f"blocks.{i // 2}.{i}.norm1.weight" for i in range(6)]
    flat = tiny(depth=6, block_chunks=0)
    with torch.no_grad():
        for p in flat.parameters():
            p.normal_()
    chunked.load_state_dict(flat.state_dict(), strict=True)  # flat -> chunked
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), flat(x))
        again = tiny(depth=6, block_chunks=0)
        again.load_state_dict(chunked.state_dict(), strict=True)  # chunked -> flat
        torch.testing.assert_close(again(x), flat(x))
        other = tiny(depth=6, block_chunks=2)  # 3 per chunk: re-chunking works too
        other.load_state_dict(chunked.state_dict(), strict=True)
        torch.testing.assert_close(other(x), flat(x))
        torch.testing.assert_close(chunked.get_intermediate_layers(x, n=[1, 4])[0],
                                   flat.get_intermediate_layers(x, n=[1, 4])[0])  # fmt: skip


def test_identity_ffn_and_unknown_ffn():
    m = tiny(ffn_layer="identity")
    assert isinstance(m.blocks[0].mlp, nn.Identity)
    with pytest.raises(ValueError, match="unknown ffn_layer 'gelu'"):
        tiny(ffn_layer="gelu")


def test_last_self_attention_rows_are_distributions():
    m = tiny()
    probs = m.get_last_self_attention(torch.randn(3, 3, 42, 56))
    assert probs.shape == (3, 2, 1 + 2 + 12, 1 + 2 + 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 15))
    assert torch.all(probs >= 0)


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    m = tiny()
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        m(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match=r"masks must be a bool tensor of shape \(1, 16\)"):
        m.forward_features(torch.randn(1, 3, 56, 56), torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be a bool"):
        m.forward_features(torch.randn(1, 3, 56, 56), torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"image batch \[B, C, H, W\]"):
        m(torch.randn(3, 56, 56))
    with pytest.raises(ValueError, match="2 image batches but 1 masks"):
        m.forward_features_list([torch.randn(1, 3, 56, 56)] * 2, [None])
    with pytest.raises(ValueError, match=r"n must be between 1 and depth \(4\)"):
        m.get_intermediate_layers(torch.randn(1, 3, 56, 56), n=5)
    with pytest.raises(ValueError, match=r"block indices must be in \[0, 4\)"):
        m.get_intermediate_layers(torch.randn(1, 3, 56, 56), n=[0, 4])
    with pytest.raises(ValueError, match="interpolate_offset"):
        tiny(interpolate_offset=1.5)
    with pytest.raises(ValueError, match=r"block_chunks \(5\) cannot exceed depth \(4\)"):
        tiny(block_chunks=5)


# ------------------------------------------------------------------ precision
def test_bf16_autocast_close_to_fp32():
    m = tiny(embed_dim=64, num_heads=4)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = m.forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m.forward_features(x)
            lows = m.forward_features_list([x, x[:, :, :28, :28]], None)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert torch.isfinite(low[key]).all()
        err = (low[key].float() - ref[key]).abs().max().item()
        assert err < 0.1, (key, err)  # bf16 has ~3 significant digits; values are O(1)
    cos = nn.functional.cosine_similarity(low["x_norm_clstoken"].float(), ref["x_norm_clstoken"], dim=-1)
    assert torch.all(cos > 0.999)
    torch.testing.assert_close(
        lows[0]["x_norm_clstoken"].float(), low["x_norm_clstoken"].float(), atol=0.05, rtol=0
    )


def test_blocks_without_list_support_run_crops_one_by_one():
    m = tiny(block_fn=partial(Block, attn_class=Attention), block_chunks=2)
    xs = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)]
    with torch.no_grad():
        outs = m.forward_features_list(xs, [None, None])
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out["x_prenorm"], m.forward_features(x)["x_prenorm"])


def test_fp16_autocast_runs_on_cpu():
    m = tiny(embed_dim=64, num_heads=4)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.float16):
            low = m(x)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0)


def test_non_square_training_grid():
    """DINOv2 only supports square grids; a non-square img_size is used as is at its own size and
    resampled per axis elsewhere (its rows follow image rows)."""
    m = tiny(img_size=(28, 56))  # 2 x 4 learned grid
    tokens = torch.zeros(1, 1 + 8, 32)
    assert m.interpolate_pos_encoding(tokens, 28, 56) is m.pos_embed
    with torch.no_grad():
        m.pos_embed[0, 1:] = torch.arange(4.0).repeat(2)[:, None]  # value = column index
    pos = m.interpolate_pos_encoding(torch.zeros(1, 1 + 16, 32), 56, 56)
    assert pos.shape == (1, 17, 32)
    # every row of the 4 x 4 result is the same resampled column profile
    grid = pos[0, 1:, 0].reshape(4, 4)
    torch.testing.assert_close(grid, grid[:1].expand(4, 4))
    assert m(torch.randn(1, 3, 42, 70)).shape == (1, 32)
