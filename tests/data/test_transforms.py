"""Fast tensor kernels of dinov2.data.transforms against torchvision and hand formulas."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

from dinov2.data import transforms as T


@pytest.fixture(autouse=True)
def _single_thread():
    """Crops are made in single-threaded DataLoader workers; 2 threads on tiny tensors add sync cost."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 37, 45, generator=gen)


@pytest.fixture
def image_with_ties() -> torch.Tensor:
    """Quantised values: many pixels where two channels tie for the max, plus grey and black pixels."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 20, 30, generator=gen) * 4).round() / 4
    x[:, 0, :] = 0.5  # grey row
    x[:, 1, :] = 0.0  # black row
    return x


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.37])
def test_brightness_contrast_saturation_match_torchvision(image, factor):
    torch.testing.assert_close(
        T.adjust_brightness_(image.clone(), factor), F2.adjust_brightness(image, factor)
    )
    torch.testing.assert_close(
        T.adjust_contrast_(image.clone(), factor), F2.adjust_contrast(image, factor), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        T.adjust_saturation_(image.clone(), factor), F2.adjust_saturation(image, factor), atol=1e-6, rtol=0
    )


def test_contrast_blends_with_mean_luma_by_hand():
    x = torch.zeros(3, 2, 2)
    x[0] = 1.0  # pure red image: luma 0.2989 everywhere
    out = T.adjust_contrast_(x.clone(), 0.5)
    expected_red = 0.5 * 1.0 + 0.5 * 0.2989
    expected_other = 0.5 * 0.2989
    assert torch.allclose(out[0], torch.full((2, 2), expected_red))
    assert torch.allclose(out[1:], torch.full((2, 2, 2), expected_other))


@pytest.mark.parametrize("factor", [-0.5, -0.1, 0.0, 0.03, 0.1, 0.25, 0.5])
def test_hue_matches_torchvision_hsv_roundtrip(image, image_with_ties, factor):
    torch.testing.assert_close(T.adjust_hue(image, factor), F2.adjust_hue(image, factor), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        T.adjust_hue(image_with_ties, factor), F2.adjust_hue(image_with_ties, factor), atol=1e-5, rtol=0
    )


def test_hue_by_hand_and_invariants(image):
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    # A third of a turn maps red to green, two thirds to blue.
    torch.testing.assert_close(T.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1))
    torch.testing.assert_close(T.adjust_hue(red, -1 / 3), torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1))
    # Hue rotation keeps each pixel's max and min.
    out = T.adjust_hue(image, 0.17)
    torch.testing.assert_close(out.amax(0), image.amax(0))
    torch.testing.assert_close(out.amin(0), image.amin(0))
    with pytest.raises(ValueError, match="hue factor"):
        T.adjust_hue(image, 0.6)


def test_rgb_to_gray_matches_torchvision(image):
    torch.testing.assert_close(T.rgb_to_gray(image), F2.rgb_to_grayscale(image), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="RGB"):
        T.rgb_to_gray(image[:2])


def test_gaussian_kernel_by_hand():
    k = T.gaussian_kernel1d(1.0, 3, torch.float64)
    e = math.exp(-0.5)
    torch.testing.assert_close(k, torch.tensor([e, 1.0, e], dtype=torch.float64) / (1 + 2 * e))
    with pytest.raises(ValueError, match="odd"):
        T.gaussian_kernel1d(1.0, 4)
    with pytest.raises(ValueError, match="sigma"):
        T.gaussian_kernel1d(0.0, 9)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_gaussian_blur_matches_torchvision(image, sigma):
    expected = F2.gaussian_blur(image, [9, 9], [sigma, sigma])
    torch.testing.assert_close(T.gaussian_blur(image, sigma), expected, atol=2e-6, rtol=0)
    gray = image[:1]
    torch.testing.assert_close(
        T.gaussian_blur(gray, sigma), F2.gaussian_blur(gray, [9, 9], [sigma, sigma]), atol=2e-6, rtol=0
    )


def test_gaussian_blur_keeps_constant_image_and_rejects_tiny():
    flat = torch.full((3, 12, 12), 0.3)
    torch.testing.assert_close(T.gaussian_blur(flat, 1.5), flat)
    with pytest.raises(ValueError, match="too small"):
        T.gaussian_blur(torch.rand(3, 4, 20), 1.0)


def test_solarize_formula():
    x = torch.tensor([0.0, 0.2, 127 / 255, 128 / 255, 0.6, 1.0]).view(1, 1, -1)
    expected = torch.tensor([0.0, 0.2, 127 / 255, 1 - 128 / 255, 0.4, 0.0]).view(1, 1, -1)
    torch.testing.assert_close(T.solarize_(x.clone()), expected)
    # Same as torchvision's float solarize at the uint8 threshold 128.
    y = torch.rand(3, 9, 9)
    torch.testing.assert_close(T.solarize_(y.clone()), F2.solarize(y, 128 / 255))


def test_normalize_formula_and_gray_expansion(image):
    mean, std = T.IMAGENET_DEFAULT_MEAN, T.IMAGENET_DEFAULT_STD
    expected = torch.stack([(image[c] - mean[c]) / std[c] for c in range(3)])
    torch.testing.assert_close(T.normalize(image), expected)
    gray = image[:1]
    expected_gray = torch.stack([(gray[0] - mean[c]) / std[c] for c in range(3)])
    torch.testing.assert_close(T.normalize(gray), expected_gray)


def test_uint8_conversion_and_resized_crop_match_torchvision():
    gen = torch.Generator().manual_seed(3)
    rgb = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8, generator=gen)
    pil = PIL.Image.fromarray(rgb.numpy())
    chw = T.pil_to_uint8_chw(pil)
    assert chw.dtype == torch.uint8 and chw.shape == (3, 50, 70)
    assert torch.equal(chw, rgb.permute(2, 0, 1))
    torch.testing.assert_close(T.uint8_to_float(chw), F2.to_dtype(chw, torch.float32, scale=True))

    out = T.resized_crop_uint8(chw, 5, 7, 30, 40, 24)
    expected = F2.resized_crop(
        chw, 5, 7, 30, 40, [24, 24], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    assert torch.equal(out, expected)
    # Within one grey level of Meta's PIL pipeline (crop, then Pillow's bicubic resize), up and down.
    for size in (24, 64):
        ours = T.resized_crop_uint8(chw, 5, 7, 30, 40, size).permute(1, 2, 0).numpy().astype(np.int16)
        pil_out = np.asarray(pil.crop((7, 5, 47, 35)).resize((size, size), PIL.Image.BICUBIC))
        diff = np.abs(ours - pil_out.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.02
    # A crop already at the output size is copied, not resampled.
    assert torch.equal(T.resized_crop_uint8(chw, 1, 2, 24, 24, 24), chw[:, 1:25, 2:26])


def test_pil_conversion_modes():
    gray = PIL.Image.new("L", (4, 3), 77)
    assert torch.equal(T.pil_to_uint8_chw(gray), torch.full((3, 3, 4), 77, dtype=torch.uint8))
    with pytest.raises(ValueError, match="RGBA"):
        T.pil_to_uint8_chw(PIL.Image.new("RGBA", (4, 3)))


def test_stain_jitter_identity_and_white_background():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(3, 16, 16, generator=gen) * 0.9 + 0.05
    torch.testing.assert_close(T.stain_jitter(x, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), x, atol=1e-5, rtol=0)
    white = torch.ones(3, 4, 4)
    out = T.stain_jitter(white, (1.3, 0.7, 1.2), (0.2, -0.2, 0.1))
    torch.testing.assert_close(out, white)


def test_stain_jitter_moves_optical_density_along_the_stain_vector():
    # Scaling only the first stain changes OD by a multiple of that stain's (normalised) OD vector.
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 8, 8, generator=gen) * 0.6 + 0.2
    out = T.stain_jitter(x, (1.4, 1.0, 1.0), (0.0, 0.0, 0.0))
    delta = (-out.log() + x.log()).reshape(3, -1).T.double()  # OD' - OD per pixel
    stain = torch.tensor(T.HED_FROM_RGB_STAINS[0], dtype=torch.float64)
    stain = stain / stain.norm()
    residual = delta - (delta @ stain)[:, None] * stain[None]
    assert residual.abs().max() < 1e-4
    assert (delta @ stain).abs().max() > 1e-2


def test_sample_resized_crop_box_by_hand():
    # Trial 1 fits: area fraction 0.25 of 100x100 with ratio 1 -> a 50x50 box.
    u = [0.0, 0.5] + [0.0] * 18 + [0.5, 0.99999]
    ratio = (3 / 4, 4 / 3)
    top, left, h, w = T.sample_resized_crop_box(100, 100, (0.25, 0.5), ratio, u)
    assert (h, w) == (50, 50)
    assert top == int(0.5 * 51) and left == 50
    # No trial fits a 200-wide, 120-high image at full area: centre crop clamped to the max ratio 4/3.
    box = T.sample_resized_crop_box(120, 200, (1.0, 1.0), ratio, [0.3] * 22)
    assert box == (0, 20, 120, 160)
    with pytest.raises(ValueError, match="22"):
        T.sample_resized_crop_box(10, 10, (0.5, 1.0), ratio, [0.1] * 5)


def test_gaussian_blur_transform_probability_means_apply():
    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    always, never = T.GaussianBlur(p=1.0), T.GaussianBlur(p=0.0)
    torch.manual_seed(0)
    assert not np.array_equal(np.asarray(always(img)), np.asarray(img))
    assert np.array_equal(np.asarray(never(img)), np.asarray(img))
    with pytest.raises(ValueError, match="p must be"):
        T.GaussianBlur(p=1.5)


def test_classification_eval_transform_matches_manual_steps():
    img = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = T.make_classification_eval_transform()(img)
    resized = F1.resize(img, 256, interpolation=InterpolationMode.BICUBIC)  # short side 256
    assert resized.size == (341, 256)
    crop = F1.center_crop(resized, 224)
    expected = F1.normalize(F1.to_tensor(crop), T.IMAGENET_DEFAULT_MEAN, T.IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(out, expected)
    tensor = torch.rand(3, 5, 5)
    assert T.MaybeToTensor()(tensor) is tensor
    train = T.make_classification_train_transform(crop_size=32)
    assert train(img).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_size"):
        T.make_classification_eval_transform(crop_size=0)
