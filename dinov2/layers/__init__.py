"""Building blocks of DINOv2's vision transformer and its projection head."""

from dinov2.layers.attention import Attention, MemEffAttention
from dinov2.layers.block import Block, NestedTensorBlock, drop_add_residual_stochastic_depth
from dinov2.layers.dino_head import DINOHead, WeightNormLinear
from dinov2.layers.drop_path import DropPath, drop_path
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp
from dinov2.layers.patch_embed import PatchEmbed
from dinov2.layers.swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "Attention",
    "Block",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "MemEffAttention",
    "Mlp",
    "NestedTensorBlock",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "WeightNormLinear",
    "drop_add_residual_stochastic_depth",
    "drop_path",
    "swiglu_hidden_features",
]
