import pytest
import torch

from dinov2.layers import DropPath, LayerScale, drop_path


def test_layer_scale_multiplies_channels():
    ls = LayerScale(4, init_values=1e-5)
    torch.testing.assert_close(ls.gamma.detach(), torch.full((4,), 1e-5))
    with torch.no_grad():
        ls.gamma.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.ones(2, 3, 4)
    torch.testing.assert_close(ls(x), torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(2, 3, 4))
    inplace = LayerScale(4, init_values=2.0, inplace=True)
    y = torch.ones(1, 4)
    assert inplace(y) is y and torch.equal(y, torch.full((1, 4), 2.0))


def test_drop_path_identity_in_eval_and_zero_prob():
    x = torch.randn(5, 3, 2)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    m = DropPath(0.3).eval()
    assert m(x) is x


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.reshape(4000, -1)
    # Each sample is either all zero or all 1 / keep_prob.
    kept = per_sample[:, 0] != 0
    assert torch.all(per_sample[kept] == 1 / 0.75) and torch.all(per_sample[~kept] == 0)
    # Dropped fraction ~ 0.25 (binomial sd ~ 0.007) and the expectation is preserved.
    assert abs((~kept).float().mean().item() - 0.25) < 0.03
    assert abs(out.mean().item() - 1.0) < 0.04


def test_drop_path_rejects_bad_probability():
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\)"):
        drop_path(torch.ones(2, 2), 1.0, training=True)
