import pytest
import torch
from torch import nn

from dinov2.layers import DINOHead


def test_dino_head_structure_and_checkpoint_keys():
    head = DINOHead(in_dim=32, out_dim=100, nlayers=3, hidden_dim=64, bottleneck_dim=16)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (64, 32), "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64), "mlp.2.bias": (64,),
        "mlp.4.weight": (16, 64), "mlp.4.bias": (16,),
        "last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16),
    }  # fmt: skip
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU)
    bn = DINOHead(32, 10, use_bn=True, nlayers=2, hidden_dim=64, bottleneck_dim=8, mlp_bias=False)
    assert isinstance(bn.mlp[1], nn.BatchNorm1d) and bn.mlp[0].bias is None
    single = DINOHead(32, 10, nlayers=1, bottleneck_dim=8)
    assert isinstance(single.mlp, nn.Linear) and single.mlp.weight.shape == (8, 32)


def test_dino_head_init():
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=300, hidden_dim=512, bottleneck_dim=256)
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert torch.all(head.mlp[0].bias == 0)
    assert torch.all(head.last_layer.weight_g == 1)
    # g = 1 makes every effective prototype row unit-norm.
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(300))


def test_dino_head_forward_matches_torch_weight_norm():
    torch.manual_seed(0)
    head = DINOHead(in_dim=12, out_dim=7, nlayers=2, hidden_dim=20, bottleneck_dim=5)
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.rand(7, 1) + 0.5)
    ref_last = nn.utils.parametrizations.weight_norm(nn.Linear(5, 7, bias=False))
    with torch.no_grad():
        ref_last.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref_last.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(4, 12)
    z = head.mlp[2](nn.functional.gelu(head.mlp[0](x)))
    z = z / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head(x), ref_last(z), atol=1e-6, rtol=0)


def test_dino_head_logits_are_bounded_cosines_and_train_g_and_v():
    torch.manual_seed(0)
    head = DINOHead(in_dim=12, out_dim=50, nlayers=3, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(6, 12) * 100)
    assert out.shape == (6, 50) and out.abs().max() <= 1 + 1e-6
    out.sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None


def test_dino_head_loads_dinov2_style_state_dict():
    src = {
        "mlp.0.weight": torch.randn(16, 8), "mlp.0.bias": torch.randn(16),
        "mlp.2.weight": torch.randn(4, 16), "mlp.2.bias": torch.randn(4),
        "last_layer.weight_g": torch.rand(9, 1), "last_layer.weight_v": torch.randn(9, 4),
    }  # fmt: skip
    head = DINOHead(8, 9, nlayers=2, hidden_dim=16, bottleneck_dim=4)
    head.load_state_dict(src, strict=True)
    v = src["last_layer.weight_v"]
    torch.testing.assert_close(
        head.last_layer.weight, src["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    )


def test_dino_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="out_dim must be positive"):
        DINOHead(8, 0)
