import pytest
import torch
from torch import nn

from dinov2.layers import (
    Block,
    MemEffAttention,
    NestedTensorBlock,
    SwiGLUFFNFused,
    drop_add_residual_stochastic_depth,
)


def _block(cls=NestedTensorBlock, drop_path=0.0, **kw):
    torch.manual_seed(0)
    blk = cls(
        dim=16, num_heads=2, qkv_bias=True, init_values=0.5, drop_path=drop_path,
        norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), attn_class=MemEffAttention, **kw,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return blk


def test_block_is_two_prenorm_residuals():
    blk = _block().eval()
    x = torch.randn(3, 5, 16)
    y = x + blk.ls1.gamma * blk.attn(blk.norm1(x))
    y = y + blk.ls2.gamma * blk.mlp.fc2(nn.functional.gelu(blk.mlp.fc1(blk.norm2(y))))
    torch.testing.assert_close(blk(x), y)


def test_block_parameter_names_follow_dinov2():
    names = set(dict(_block(ffn_layer=SwiGLUFFNFused).named_parameters()))
    assert names == {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight",
        "mlp.w3.bias", "ls2.gamma",
    }  # fmt: skip
    plain = Block(dim=16, num_heads=2, init_values=None)
    assert isinstance(plain.ls1, nn.Identity) and plain.attn.qkv.bias is None


def test_nested_block_list_equals_separate_calls():
    blk = _block().eval()
    xs = [torch.randn(2, 11, 16), torch.randn(4, 3, 16), torch.randn(1, 7, 16)]
    outs = blk(xs)
    assert isinstance(outs, list) and len(outs) == 3
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, blk(x), atol=1e-5, rtol=0)


def test_drop_add_residual_updates_exactly_the_subset():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4)
    out = drop_add_residual_stochastic_depth(x, lambda t: torch.ones_like(t), sample_drop_ratio=0.25)
    changed = (out - x).abs().flatten(1).amax(1) > 0
    # int(8 * 0.75) = 6 samples get the residual, scaled by 8 / 6 to keep its expectation.
    assert changed.sum() == 6
    torch.testing.assert_close(out[changed], x[changed] + 8 / 6)
    torch.testing.assert_close(out[~changed], x[~changed])


def _zero_ffn(blk):
    with torch.no_grad():
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
    return blk


@pytest.mark.parametrize("as_list", [False, True])
def test_stochastic_depth_large_ratio_keeps_int_b_times_keep_samples(as_list):
    """ratio 0.5 > 0.1: DINOv2 computes the branch for int(B/2) random samples, scaled by 2.
    With the MLP branch zeroed, every sample is x (dropped) or x + 2 * attention residual."""
    blk = _zero_ffn(_block(drop_path=0.5))
    xs = [torch.randn(6, 5, 16), torch.randn(4, 2, 16)]
    blk.eval()
    full = [blk(x) - x for x in xs]
    blk.train()
    torch.manual_seed(3)
    outs = blk(xs) if as_list else [blk(x) for x in xs]
    for x, out, res in zip(xs, outs, full):
        delta = out - x
        kept = delta.flatten(1).abs().amax(1) > 0
        assert kept.sum() == x.shape[0] // 2
        torch.testing.assert_close(delta[kept], 2 * res[kept], atol=1e-5, rtol=0)


@pytest.mark.parametrize("as_list", [False, True])
def test_stochastic_depth_small_ratio_is_per_sample_drop_path(as_list):
    """0 < ratio <= 0.1: each sample's residual is dropped or scaled by 1 / (1 - ratio)."""
    blk = _zero_ffn(_block(drop_path=0.1))
    xs = [torch.randn(64, 5, 16), torch.randn(64, 2, 16)]
    blk.eval()
    full = [blk(x) - x for x in xs]
    blk.train()
    torch.manual_seed(0)
    outs = blk(xs) if as_list else [blk(x) for x in xs]
    n_dropped = 0
    for x, out, res in zip(xs, outs, full):
        delta = out - x
        kept = delta.flatten(1).abs().amax(1) > 0
        n_dropped += int((~kept).sum())
        torch.testing.assert_close(delta[kept], res[kept] / 0.9, atol=1e-5, rtol=0)
    assert 1 <= n_dropped <= 30  # binomial(128, 0.1): mean 12.8


def test_nested_block_rejects_other_inputs():
    with pytest.raises(ValueError, match="list of tensors"):
        _block()(["not a tensor"])
