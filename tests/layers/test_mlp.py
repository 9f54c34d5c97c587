import math

import pytest
import torch

from dinov2.layers import Mlp, SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features


def test_mlp_is_fc2_gelu_fc1():
    torch.manual_seed(0)
    mlp = Mlp(6, hidden_features=24, bias=True)
    x = torch.randn(3, 5, 6)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    torch.testing.assert_close(mlp(x), h @ mlp.fc2.weight.T + mlp.fc2.bias)
    assert Mlp(6, 24, bias=False).fc1.bias is None


def test_swiglu_is_silu_gate_times_value():
    torch.manual_seed(0)
    ffn = SwiGLUFFN(6, hidden_features=10)
    assert ffn.w12.weight.shape == (20, 6) and ffn.w3.weight.shape == (6, 10)
    x = torch.randn(4, 6)
    z = x @ ffn.w12.weight.T + ffn.w12.bias
    gate, value = z[:, :10], z[:, 10:]
    expected = (gate / (1 + torch.exp(-gate)) * value) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize(
    "hidden,expected",
    [
        (4 * 1536, 4096),  # ViT-g: int(6144 * 2/3) = 4096, already a multiple of 8
        (4 * 384, 1024),  # int(1024) -> 1024
        (400, 272),  # int(266.67) = 266 -> (266 + 7) // 8 * 8 = 272
    ],
)
def test_swiglu_fused_hidden_width_rule(hidden, expected):
    assert swiglu_hidden_features(hidden) == expected
    ffn = SwiGLUFFNFused(in_features=hidden // 4, hidden_features=hidden)
    assert ffn.w12.weight.shape == (2 * expected, hidden // 4)
    assert ffn.w3.weight.shape == (hidden // 4, expected)
