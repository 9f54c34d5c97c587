import pytest
import torch
import torch.nn.functional as F

from dinov2.layers import PatchEmbed


def test_patch_embed_equals_unfold_matmul_row_major():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=56, patch_size=14, in_chans=3, embed_dim=8)
    x = torch.randn(2, 3, 28, 42)
    out = pe(x)
    assert out.shape == (2, 2 * 3, 8)
    # Token k is the patch at row k // 3, column k % 3 (row-major), projected by the conv kernel.
    for k in range(6):
        r, c = divmod(k, 3)
        patch = x[:, :, 14 * r : 14 * (r + 1), 14 * c : 14 * (c + 1)].reshape(2, -1)
        expected = patch @ pe.proj.weight.reshape(8, -1).T + pe.proj.bias
        torch.testing.assert_close(out[:, k], expected, atol=1e-5, rtol=0)
    cols = F.unfold(x, 14, stride=14).transpose(1, 2)
    torch.testing.assert_close(out, cols @ pe.proj.weight.reshape(8, -1).T + pe.proj.bias, atol=1e-5, rtol=0)


def test_patch_embed_attributes_and_unflattened_output():
    pe = PatchEmbed(img_size=224, patch_size=14, embed_dim=16, flatten_embedding=False)
    assert pe.num_patches == 256 and pe.patches_resolution == (16, 16)
    assert pe(torch.randn(1, 3, 28, 56)).shape == (1, 2, 4, 16)


@pytest.mark.parametrize("shape", [(1, 3, 30, 28), (1, 3, 28, 29)])
def test_patch_embed_rejects_sizes_not_multiple_of_patch(shape):
    pe = PatchEmbed(img_size=28, patch_size=14, embed_dim=4)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14x14"):
        pe(torch.randn(*shape))


def test_patch_embed_rejects_wrong_channels_and_bad_img_size():
    pe = PatchEmbed(img_size=28, patch_size=14, embed_dim=4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        pe(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PatchEmbed(img_size=30, patch_size=14)
