import logging
import math
import sys
import types

import pytest
import torch

from dinov2.layers import Attention, MemEffAttention
from dinov2.layers import attention as attention_module


def explicit_attention(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head with plain tensor ops (mask: bool [N, N], True = attend)."""
    b, n, c = x.shape
    h, d = attn.num_heads, c // attn.num_heads
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    outs = []
    for i in range(h):
        q = qkv[..., i * d : (i + 1) * d]
        k = qkv[..., c + i * d : c + (i + 1) * d]
        v = qkv[..., 2 * c + i * d : 2 * c + (i + 1) * d]
        s = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ v)
    return torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("cls", [Attention, MemEffAttention])
def test_attention_matches_explicit_softmax(cls):
    torch.manual_seed(0)
    attn = cls(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=0)


def test_attention_probs_are_row_stochastic_softmax():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=True)
    x = torch.randn(2, 5, 16)
    probs = attn.attention_probs(x)
    assert probs.shape == (2, 2, 5, 5) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))
    # out = proj(probs @ v): the probabilities are the ones the forward pass uses
    v = (x @ attn.qkv.weight[32:].T + attn.qkv.bias[32:]).reshape(2, 5, 2, 8).transpose(1, 2)
    out = (probs @ v).transpose(1, 2).reshape(2, 5, 16) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=0)


def test_block_diagonal_mask_equals_separate_sequences():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    a, b = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    seg = torch.tensor([0] * 5 + [1] * 3)
    mask = seg[:, None] == seg[None, :]
    out = attn(torch.cat([a, b], dim=1), attn_bias=mask)
    torch.testing.assert_close(out[:, :5], attn(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], attn(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [Attention, MemEffAttention])
def test_forward_packed_equals_per_group_forward(cls):
    torch.manual_seed(0)
    attn = cls(16, num_heads=4, qkv_bias=True).eval()
    xs = [torch.randn(2, 9, 16), torch.randn(5, 4, 16)]
    packed = torch.cat([x.reshape(-1, 16) for x in xs])
    out = attn.forward_packed(packed, [(2, 9), (5, 4)])
    torch.testing.assert_close(out[:18].reshape(2, 9, 16), attn(xs[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[18:].reshape(5, 4, 16), attn(xs[1]), atol=1e-5, rtol=0)


def test_memeff_xformers_path_layout(monkeypatch):
    """With xformers present (a stand-in implementing its documented [B, N, heads, d] API) the
    packed path makes one call with a block-diagonal bias and gives the per-image results."""
    calls = []

    class BlockDiagonalMask:
        def __init__(self, seqlens):
            self.seqlens = seqlens

        @classmethod
        def from_seqlens(cls, seqlens):
            return cls(list(seqlens))

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        calls.append(attn_bias)
        b, n, h, d = q.shape
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
        if attn_bias is not None:
            seg = torch.repeat_interleave(
                torch.arange(len(attn_bias.seqlens)), torch.tensor(attn_bias.seqlens)
            )
            s = s.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)

    fake = types.SimpleNamespace(
        memory_efficient_attention=memory_efficient_attention,
        fmha=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask),
    )
    monkeypatch.setattr(attention_module, "XFORMERS_OPS", fake)
    monkeypatch.setattr(attention_module, "XFORMERS_AVAILABLE", True)
    monkeypatch.setattr(MemEffAttention, "_use_xformers", lambda self, x: True)
    torch.manual_seed(0)
    attn = MemEffAttention(16, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=0)
    xs = [torch.randn(2, 5, 16), torch.randn(3, 2, 16)]
    out = attn.forward_packed(torch.cat([t.reshape(-1, 16) for t in xs]), [(2, 5), (3, 2)])
    assert calls[-1].seqlens == [5, 5, 2, 2, 2]
    torch.testing.assert_close(out[:10].reshape(2, 5, 16), explicit_attention(attn, xs[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[10:].reshape(3, 2, 16), explicit_attention(attn, xs[1]), atol=1e-5, rtol=0)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        Attention(30, num_heads=4)


def test_attention_runs_under_bf16_autocast():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attn(x), atol=5e-2, rtol=5e-2)


def _reference_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
    """xformers' documented contract: [B, N, heads, d] in and out, scale 1/sqrt(d)."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


def test_xformers_check_accepts_a_working_kernel_and_names_what_breaks():
    cpu = torch.device("cpu")
    working = types.SimpleNamespace(memory_efficient_attention=_reference_memory_efficient_attention)
    assert attention_module.check_xformers(working, cpu, torch.float32) is None
    with torch.device("meta"):  # how weights.py builds models before a strict load
        assert attention_module.check_xformers(working, cpu, torch.float32) is None

    def raises(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`\nmore detail")

    broken = types.SimpleNamespace(memory_efficient_attention=raises)
    assert attention_module.check_xformers(broken, cpu, torch.float32) == (
        "NotImplementedError: No operator found for `memory_efficient_attention_forward`"
    )
    wrong = types.SimpleNamespace(memory_efficient_attention=lambda q, k, v: v)  # runs, wrong values
    assert "differs from SDPA" in attention_module.check_xformers(wrong, cpu, torch.float32)
    nan = types.SimpleNamespace(memory_efficient_attention=lambda q, k, v: torch.full_like(q, float("nan")))
    assert "differs from SDPA" in attention_module.check_xformers(nan, cpu, torch.float32)


def test_xformers_wheel_that_imports_but_fails_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    """A wheel built for another torch: `import xformers.ops` works, the first kernel call fails."""

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        raise RuntimeError("xformers/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")

    package = types.ModuleType("xformers")
    package.__version__ = "0.0.99"
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
    imported = attention_module._import_xformers_ops()
    assert imported is ops  # an ImportError check alone would have accepted this wheel
    monkeypatch.setattr(attention_module, "XFORMERS_OPS", imported)
    attention_module.xformers_usable.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dinov2"):
            assert attention_module.xformers_usable("cpu") is False
            assert attention_module.xformers_usable("cpu") is False  # checked once, warned once
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            f"xformers 0.0.99 does not work with torch {torch.__version__} (RuntimeError: "
            "xformers/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi): attention uses PyTorch SDPA instead"
        ]
        ops.memory_efficient_attention = _reference_memory_efficient_attention
        attention_module.xformers_usable.cache_clear()
        assert attention_module.xformers_usable("cpu") is True
    finally:
        attention_module.xformers_usable.cache_clear()


def test_memeff_attention_does_not_use_xformers_without_a_working_gpu_kernel(monkeypatch):
    monkeypatch.setattr(attention_module, "XFORMERS_OPS", None)
    attention_module.xformers_usable.cache_clear()
    try:
        attn = MemEffAttention(16, num_heads=2)
        assert attn.xformers_ok is False and attn._use_xformers(torch.zeros(1, 2, 16)) is False
    finally:
        attention_module.xformers_usable.cache_clear()
