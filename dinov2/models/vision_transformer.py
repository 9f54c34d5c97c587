"""DINOv2's vision transformer (Oquab et al. 2023) with optional register tokens (Darcet et al. 2024).

Same constructor arguments, methods, token order and state-dict keys as Meta's
`DinoVisionTransformer`, so its released `dinov2_*_pretrain.pth` files load with strict key checks:
`cls_token` [1,1,D], `pos_embed` [1,1+N,D], `register_tokens` [1,R,D], `mask_token` [1,D],
`patch_embed.proj.*`, `blocks.{i}.*` (or `blocks.{chunk}.{i}.*` when `block_chunks > 0`), `norm.*`.

Example:
    model = vit_small(patch_size=14, num_register_tokens=4, img_size=224, init_values=1e-5)
    out = model.forward_features(images)           # images [B, 3, 224, 224]
    out["x_norm_clstoken"]                         # [B, 384]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import MemEffAttention, Mlp, NestedTensorBlock, PatchEmbed, SwiGLUFFNFused
from dinov2.models.block_layout import block_chunk_size, convert_block_layout

FFN_LAYERS = ("mlp", "swiglufused", "swiglu", "identity")
# DINOv2's vit_* constructors use this block: list-capable, xformers kernel when available.
DEFAULT_BLOCK_FN = partial(NestedTensorBlock, attn_class=MemEffAttention)


def _identity_ffn(*args, **kwargs) -> nn.Module:
    """`ffn_layer="identity"`: a block whose feed-forward branch is the identity."""
    return nn.Identity()


def _ffn_class(ffn_layer: str) -> Callable[..., nn.Module]:
    if ffn_layer == "mlp":
        return Mlp
    if ffn_layer in ("swiglufused", "swiglu"):
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return _identity_ffn
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")


def init_weights_vit_timm(module: nn.Module, name: str = "") -> None:
    """DINOv2's (timm's) ViT init: linear weights trunc_normal(std=0.02), linear biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _apply_block(block: nn.Module, x: torch.Tensor | list[torch.Tensor]):
    """Run a block on a tensor or on a list of tensors (packed when the block supports lists)."""
    if isinstance(x, torch.Tensor) or isinstance(block, (NestedTensorBlock, BlockChunk, nn.Identity)):
        return block(x)
    return [block(t) for t in x]


class BlockChunk(nn.ModuleList):
    """A group of consecutive blocks (one FSDP unit). Earlier positions hold `nn.Identity` padding
    so each block keeps its global index in the state dict: `blocks.{chunk}.{global index}.*`."""

    def forward(self, x):
        for block in self:
            x = _apply_block(block, x)
        return x


class DinoVisionTransformer(nn.Module):
    """Vision transformer of DINOv2.

    Args:
        img_size: training image size; sets the learned position grid (img_size / patch_size)^2.
        patch_size: patch side in pixels.
        in_chans: image channels.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        qkv_bias, ffn_bias, proj_bias: biases of q/k/v, feed-forward and attention output layers.
        drop_path_rate: stochastic depth rate (of the last block unless `drop_path_uniform`).
        drop_path_uniform: same rate for every block instead of a linear ramp from 0.
        init_values: LayerScale init (None/0 disables LayerScale).
        embed_layer: patch embedding class.
        act_layer: MLP activation class.
        block_fn: block class (must accept lists for the packed multi-crop path to be used).
        ffn_layer: "mlp", "swiglufused" (or "swiglu") or "identity".
        block_chunks: group blocks into this many chunks (FSDP wrapping units); 0 = no chunks.
        num_register_tokens: learned register tokens R inserted after the CLS token.
        interpolate_antialias: antialias when resampling the position grid.
        interpolate_offset: DINOv2's offset added to the target grid size to derive the
            interpolation scale factor (0 = interpolate to the exact size).

    Token order everywhere: [cls, registers (R), patches (row-major)].
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = DEFAULT_BLOCK_FN,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        if depth <= 0 or embed_dim <= 0:
            raise ValueError(
                f"depth and embed_dim must be positive, got depth={depth}, embed_dim={embed_dim}"
            )
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if not 0.0 <= interpolate_offset < 1.0:
            raise ValueError(f"interpolate_offset must be in [0, 1), got {interpolate_offset}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under meta
        ffn_cls = _ffn_class(ffn_layer)
        blocks_list = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn_cls,
                init_values=init_values,
            )
            for i in range(depth)
        ]
        chunk_size = block_chunk_size(depth, block_chunks)
        self.chunked_blocks = chunk_size > 0
        self.block_chunk_size = chunk_size
        if self.chunked_blocks:
            chunks = [
                BlockChunk([nn.Identity()] * start + blocks_list[start : start + chunk_size])
                for start in range(0, depth, chunk_size)
            ]
            self.blocks = nn.ModuleList(chunks)
        else:
            self.blocks = nn.ModuleList(blocks_list)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()
        # Accept checkpoints in either block layout (chunked or flat) in load_state_dict.
        self.register_load_state_dict_pre_hook(self._convert_block_layout_hook)

    # ----------------------------------------------------------------------------- setup
    def init_weights(self) -> None:
        """pos_embed trunc_normal(0.02), cls/register tokens normal(1e-6), mask_token 0, linear
        layers trunc_normal(0.02) with zero bias; patch conv and norms keep torch's defaults.
        Skipped on the meta device (no values to set; weights are loaded later)."""
        if self.cls_token.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for name, module in self.named_modules():
            init_weights_vit_timm(module, name)

    def _convert_block_layout_hook(self, module, state_dict, prefix, *args) -> None:
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix + "blocks.")}
        if not own:
            return
        converted = convert_block_layout(own, self.block_chunk_size)
        for key in own:
            del state_dict[key]
        state_dict.update(converted)

    def iter_blocks(self) -> list[nn.Module]:
        """The `depth` transformer blocks in order, whatever the chunk layout."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [b for chunk in self.blocks for b in chunk if not isinstance(b, nn.Identity)]

    # ----------------------------------------------------------------------------- tokens
    def _pos_grid(self) -> tuple[int, int]:
        """(rows, cols) of the learned position grid: the patch grid of img_size (square in every
        DINOv2 model; a non-square img_size gives a non-square grid)."""
        n = self.pos_embed.shape[1] - 1
        grid = getattr(self.patch_embed, "patches_resolution", None)
        if grid is not None and grid[0] * grid[1] == n:
            return int(grid[0]), int(grid[1])
        m = math.isqrt(n)
        if m * m != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid; cannot interpolate")
        return m, m

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embeddings [1, 1+N', D] for tokens x [B, 1+N', D] of an h x w pixel image.

        The learned M x M grid is resampled bicubically to (h/p, w/p) like DINOv2: with an offset,
        F.interpolate gets scale_factor ((h/p + offset)/M, (w/p + offset)/M) (the output size is the
        floor, i.e. h/p x w/p, but the sampling positions use that scale); without one it gets
        size=(h/p, w/p). At the training grid the learned table is returned as is. Computed in
        float32, returned in x's dtype. (DINOv2 only handles square grids; a non-square one,
        from a non-square img_size, is resampled per axis the same way.)
        """
        previous_dtype = x.dtype
        h0 = h // self.patch_size
        w0 = w // self.patch_size
        gh, gw = self._pos_grid()
        if (h0, w0) == (gh, gw):  # for square grids: DINOv2's `npatch == N and w == h`
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        if self.interpolate_offset:
            # The offset only moves DINOv2's sampling positions; the floor gives (h0, w0).
            kwargs = {
                "scale_factor": ((h0 + self.interpolate_offset) / gh, (w0 + self.interpolate_offset) / gw)
            }
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, gh, gw, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        if tuple(patch_pos_embed.shape[-2:]) != (h0, w0):
            raise RuntimeError(f"interpolated grid {tuple(patch_pos_embed.shape[-2:])} != {(h0, w0)}")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] (+ bool masks [B, N], True = masked patch) -> tokens [B, 1+R+N, D].

        Masked patch embeddings are replaced by `mask_token` before position embeddings are added;
        registers get no position embedding.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.dtype != torch.bool or tuple(masks.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"masks must be a bool tensor of shape {tuple(x.shape[:2])} (batch, patches), "
                    f"got {masks.dtype} {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    # ----------------------------------------------------------------------------- forward
    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None
    ) -> list[dict]:
        """`forward_features` of several image batches (e.g. 2 global + 8 local crops of other
        sizes) in one pass: every block runs the batches packed together (see NestedTensorBlock).
        Returns one output dict per batch, equal to separate `forward_features` calls."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} image batches but {len(masks_list)} masks")
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for blk in self.blocks:
            xs = _apply_block(blk, xs)
        return [self._output_dict(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(self, x, masks: torch.Tensor | None = None):
        """Images [B, C, H, W] -> dict x_norm_clstoken [B,D], x_norm_regtokens [B,R,D],
        x_norm_patchtokens [B,N,D], x_prenorm [B,1+R+N,D], masks. A list of batches is passed to
        `forward_features_list` (masks then is a list too)."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._output_dict(x, masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        """head(x_norm_clstoken) (head is the identity), or the feature dict when is_training."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    def _blocks_to_take(self, n: int | Sequence[int]) -> list[int]:
        if isinstance(n, int):
            if not 1 <= n <= self.n_blocks:
                raise ValueError(f"n must be between 1 and depth ({self.n_blocks}), got {n}")
            return list(range(self.n_blocks - n, self.n_blocks))
        idx = [int(i) for i in n]
        bad = [i for i in idx if not 0 <= i < self.n_blocks]
        if bad or not idx:
            raise ValueError(f"block indices must be in [0, {self.n_blocks}), got {list(n)}")
        return idx

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Patch tokens of the last `n` blocks (or of the blocks with indices `n`), in block order.

        Each output is [B, N, D], or [B, D, H/p, W/p] with `reshape`; with `return_class_token`
        each item is a pair (patch tokens, class token [B, D]). `norm` applies the final norm.
        """
        take = self._blocks_to_take(n)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.iter_blocks()):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, h, w = x.shape
            outputs = [
                out.reshape(b, h // self.patch_size, w // self.patch_size, -1)
                .permute(0, 3, 1, 2)
                .contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def get_last_self_attention(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities of the last block, [B, heads, 1+R+N, 1+R+N] (float32; rows are
        queries in token order cls, registers, patches, and sum to 1)."""
        tokens = self.prepare_tokens_with_masks(x, masks)
        blocks = self.iter_blocks()
        for blk in blocks[:-1]:
            tokens = blk(tokens)
        last = blocks[-1]
        return last.attn.attention_probs(last.norm1(tokens))


def _vit(arch: dict, patch_size: int, num_register_tokens: int, kwargs: dict) -> DinoVisionTransformer:
    """The named architecture `arch`; keyword arguments may still override any constructor argument."""
    params = {**arch, "patch_size": patch_size, "mlp_ratio": 4, "num_register_tokens": num_register_tokens}
    params.update(kwargs)
    return DinoVisionTransformer(**params)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S: D=384, 12 blocks, 6 heads (~22M parameters at patch 14)."""
    return _vit({"embed_dim": 384, "depth": 12, "num_heads": 6}, patch_size, num_register_tokens, kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: D=768, 12 blocks, 12 heads (~86M parameters)."""
    return _vit({"embed_dim": 768, "depth": 12, "num_heads": 12}, patch_size, num_register_tokens, kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L: D=1024, 24 blocks, 16 heads (~304M parameters)."""
    return _vit({"embed_dim": 1024, "depth": 24, "num_heads": 16}, patch_size, num_register_tokens, kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g/2 (DINOv2's giant): D=1536, 40 blocks, 24 heads, head dim 64 (~1.1B parameters
    with ffn_layer="swiglufused")."""
    return _vit({"embed_dim": 1536, "depth": 40, "num_heads": 24}, patch_size, num_register_tokens, kwargs)


ARCHS: dict[str, Callable[..., DinoVisionTransformer]] = {
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}

# Hyper-parameters of Meta's released backbones (torch.hub names); "_reg" adds 4 registers and the
# interpolation settings those models were trained with.
_RELEASED_ARCHS = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}


def _released_config(arch: str, registers: bool) -> dict:
    return {
        "arch": arch,
        "img_size": 518,
        "patch_size": 14,
        "init_values": 1e-5,
        "ffn_layer": "swiglufused" if arch == "vit_giant2" else "mlp",
        "block_chunks": 0,
        "num_register_tokens": 4 if registers else 0,
        "interpolate_antialias": registers,
        "interpolate_offset": 0.0 if registers else 0.1,
    }


RELEASED_BACKBONES: dict[str, dict] = {
    f"dinov2_{short}{'_reg' if reg else ''}": _released_config(arch, reg)
    for short, arch in _RELEASED_ARCHS.items()
    for reg in (False, True)
}


def make_released_backbone(name: str, **overrides) -> DinoVisionTransformer:
    """Randomly initialised backbone with the hyper-parameters of Meta's released model `name`
    (e.g. "dinov2_vits14_reg"); keyword overrides replace individual constructor arguments."""
    if name not in RELEASED_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(RELEASED_BACKBONES)}")
    cfg = dict(RELEASED_BACKBONES[name])
    cfg.update(overrides)
    arch = cfg.pop("arch")
    return ARCHS[arch](**cfg)
