"""Multi-head self-attention of DINOv2's ViT, computed with `F.scaled_dot_product_attention`.

`Attention` and `MemEffAttention` have the same parameters (`qkv`, `proj`) and results; the latter
additionally uses xformers' memory-efficient kernel when xformers is installed, one tiny call to it
works on the GPU (`xformers_usable`, else a warning and SDPA), and the input is on CUDA (never
required). Both accept sequences of different lengths packed into one tensor
(`forward_packed`), which is how `NestedTensorBlock` runs global and local crops together.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("dinov2")


def _import_xformers_ops() -> ModuleType | None:
    """xformers.ops when installed and not disabled with XFORMERS_DISABLED=1, else None."""
    if os.environ.get("XFORMERS_DISABLED"):
        return None
    try:
        return importlib.import_module("xformers.ops")
    except ImportError:
        return None


# Read once at import: whether the optional xformers kernels can be used at all.
XFORMERS_OPS = _import_xformers_ops()
XFORMERS_AVAILABLE = XFORMERS_OPS is not None


def check_xformers(ops: ModuleType, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run one tiny `ops.memory_efficient_attention` call and compare it with SDPA.

    A wheel built for another torch often imports fine and fails only at its first kernel call
    (missing symbol, no kernel for this GPU), or returns garbage. Returns None when the call works
    and agrees with `F.scaled_dot_product_attention`, else the reason it cannot be used.
    """
    gen = torch.Generator().manual_seed(0)
    # Made on the CPU explicitly: models may be built under `with torch.device("meta")`.
    q, k, v = (torch.randn(1, 8, 2, 32, generator=gen, device="cpu").to(device, dtype) for _ in range(3))
    try:
        out = ops.memory_efficient_attention(q, k, v)
    except Exception as e:  # any failure of the foreign kernel means: do not use it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape:
        return f"returned {getattr(out, 'shape', type(out).__name__)} instead of {tuple(q.shape)}"
    error = (out.float() - expected).abs().max().item()
    if not error <= 1e-2:  # fp16 rounding of unit-scale values is ~1e-3; also catches NaN
        return f"result differs from SDPA by {error:.3g}"
    return None


@functools.cache
def xformers_usable(device_type: str = "cuda") -> bool:
    """Whether MemEffAttention may call xformers: importable, the device present, and one tiny
    attention call on it works (checked once per process; a one-line warning when it does not)."""
    if XFORMERS_OPS is None or (device_type == "cuda" and not torch.cuda.is_available()):
        return False
    dtype = torch.float16 if device_type == "cuda" else torch.float32
    problem = check_xformers(XFORMERS_OPS, torch.device(device_type), dtype)
    if problem is not None:
        version = getattr(importlib.import_module("xformers"), "__version__", "?")
        logger.warning(
            "xformers %s does not work with torch %s (%s): attention uses PyTorch SDPA instead",
            version, torch.__version__, problem,
        )  # fmt: skip
    return problem is None


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over all heads, then an output projection.

    Args:
        dim: channels C (must be divisible by `num_heads`).
        num_heads: number of heads h; head dim d = C / h.
        qkv_bias: whether the fused q/k/v projection `qkv` [3C, C] has a bias.
        proj_bias: whether the output projection `proj` [C, C] has a bias.
        attn_drop: dropout on attention probabilities (training only).
        proj_drop: dropout after the output projection.

    Shapes: [B, N, C] -> [B, N, C]. `attention_probs` returns [B, h, N, N].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_heads(self, qkv: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
        """[B*N or B, N, 3C] -> q, k, v each [B, h, N, d]."""
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias=None) -> torch.Tensor:
        """Attention of [B, h, N, d] heads -> [B, N, C]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=self._dropout_p())
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, C]; attn_bias: optional mask broadcastable to [B, h, N, N], bool (True = may
        attend) or additive float."""
        b, n, _ = x.shape
        q, k, v = self._split_heads(self.qkv(x), b, n)
        return self.proj_drop(self.proj(self._attend(q, k, v, attn_bias)))

    def forward_packed(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Attention over several batches of different sequence lengths packed into one tensor.

        x: [sum_i B_i * N_i, C], the row-major concatenation of tensors [B_i, N_i, C];
        shapes: the (B_i, N_i) pairs. Returns the same layout. The linear projections run once
        over all tokens (fewer, larger matmuls); attention is computed per group, so no token
        attends across images and no work is spent on masked-out pairs.
        """
        qkv = self.qkv(x)
        outs = []
        for part, (b, n) in zip(qkv.split([b * n for b, n in shapes]), shapes):
            q, k, v = self._split_heads(part, b, n)
            outs.append(self._attend(q, k, v).reshape(b * n, -1))
        return self.proj_drop(self.proj(torch.cat(outs)))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit softmax(q k^T * scale) for x [B, N, C] -> [B, h, N, N], computed in float32 so
        rows sum to 1 whatever the input precision (used by attention-map tools)."""
        b, n, _ = x.shape
        q, k, _ = self._split_heads(self.qkv(x), b, n)
        logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)
        return logits.softmax(dim=-1)


class MemEffAttention(Attention):
    """`Attention` that calls xformers' `memory_efficient_attention` when xformers is installed and
    works (`xformers_usable`) and x is on CUDA; otherwise identical to `Attention` (SDPA picks
    flash/memory-efficient kernels on GPU by itself).

    `attn_bias` may be a tensor mask (as for `Attention`) or an xformers attention-bias object such
    as `BlockDiagonalMask` (xformers path only; on the fallback path it is materialised).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Decided when the model is built (start-up), not in forward, so compiled graphs see a constant.
        self.xformers_ok = xformers_usable()

    def _use_xformers(self, x: torch.Tensor) -> bool:
        return self.xformers_ok and x.is_cuda

    def forward(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        b, n, c = x.shape
        if not self._use_xformers(x):
            if attn_bias is not None and not isinstance(attn_bias, torch.Tensor):
                # An xformers bias object on a CPU tensor: use its dense [B, h, N, N] form.
                attn_bias = attn_bias.materialize((b, self.num_heads, n, n), dtype=x.dtype, device=x.device)
            return super().forward(x, attn_bias)
        # xformers wants [B, N, h, d].
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        out = XFORMERS_OPS.memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=self._dropout_p())
        return self.proj_drop(self.proj(out.reshape(b, n, c)))

    def forward_packed(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        if not self._use_xformers(x):
            return super().forward_packed(x, shapes)
        # One kernel over all groups: a block-diagonal mask keeps every image to itself.
        seqlens = [n for b, n in shapes for _ in range(b)]
        attn_bias = XFORMERS_OPS.fmha.BlockDiagonalMask.from_seqlens(seqlens)
        return self.forward(x.unsqueeze(0), attn_bias).squeeze(0)
