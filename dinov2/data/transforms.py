"""Image transforms: DINOv2's public torchvision helpers plus fast tensor kernels for multi-crop.

Two families live here.

* DINOv2's public names (`GaussianBlur`, `MaybeToTensor`, `make_normalize_transform`,
  `make_classification_train_transform`, `make_classification_eval_transform`): torchvision
  pipelines on PIL images, used by evaluation code.
* Fast kernels used by `dinov2.data.augmentations.DataAugmentationDINO`. They work on float32
  CHW tensors in [0, 1] (or uint8 for cropping) and compute what `torchvision.transforms.v2.functional`
  computes for float tensors (equal up to float rounding; tests check it), with fewer and cheaper
  passes over memory: one uint8 interpolation call per crop, a separable Gaussian blur, a hue rotation
  without building an HSV image and without comparisons (slow on CPU), and normalisation as a single
  multiply-add. Functions ending in `_` work in place.
"""

import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision import transforms

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale uses for tensors.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Stain vectors (rows: optical density of one unit of stain in R, G, B) of the haematoxylin / eosin /
# residual basis of Ruifrok & Johnston (2001), as used by skimage.color.rgb2hed. In Giemsa and
# May-Gruenwald-Giemsa smears, azure/methylene blue stains nuclei blue-purple like haematoxylin and
# eosin stains cytoplasm and red cells pink, so this basis separates the two dyes well enough for
# augmentation (not for quantitative stain measurement).
HED_FROM_RGB_STAINS = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)

# Summed optical density at which a pixel counts as half "stained" when gating the stain shift: pure
# white (OD 0) keeps its colour exactly, near-white glass (OD < 0.1) barely moves, the beige plasma
# background of PBC smears (OD ~ 0.33) gets ~3/4 of the shift and cells (OD > 1) all of it.
_STAIN_OD_HALF = 0.2
# Smallest intensity used before the logarithm (OD = -ln(I) is infinite at I = 0).
_MIN_INTENSITY = 1.0 / 512.0


# --------------------------------------------------------------------------------------------------
# DINOv2's public torchvision helpers
# --------------------------------------------------------------------------------------------------


class GaussianBlur(transforms.RandomApply):
    """Gaussian blur (kernel 9, sigma ~ U(radius_min, radius_max)) applied with probability `p`.

    Meta's class passes `1 - p` to RandomApply (so their `p=1.0` never blurs); here `p` means what it
    says, matching the DINOv2 paper and BYOL's recipe.
    """

    def __init__(self, *, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"GaussianBlur p must be in [0, 1], got {p}")
        if not 0.0 < radius_min <= radius_max:
            raise ValueError(
                f"GaussianBlur needs 0 < radius_min <= radius_max, got {radius_min}, {radius_max}"
            )
        blur = transforms.GaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))
        super().__init__(transforms=[blur], p=p)


class MaybeToTensor(transforms.ToTensor):
    """ToTensor that passes tensors through unchanged (PIL / ndarray -> float tensor in [0, 1])."""

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic
        return super().__call__(pic)


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> transforms.Normalize:
    """Per-channel `(x - mean) / std` on a float CHW tensor."""
    return transforms.Normalize(mean=mean, std=std)


def make_classification_train_transform(
    *,
    crop_size: int = 224,
    interpolation=transforms.InterpolationMode.BICUBIC,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Supervised training transform: random resized crop, optional flip, tensor, normalise."""
    if crop_size <= 0:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}")
    steps = [transforms.RandomResizedCrop(crop_size, interpolation=interpolation)]
    if hflip_prob > 0.0:
        steps.append(transforms.RandomHorizontalFlip(hflip_prob))
    steps += [MaybeToTensor(), make_normalize_transform(mean, std)]
    return transforms.Compose(steps)


def make_classification_eval_transform(
    *,
    resize_size: int = 256,
    interpolation=transforms.InterpolationMode.BICUBIC,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Evaluation transform: resize the short side, centre crop, tensor, normalise."""
    if resize_size <= 0 or crop_size <= 0:
        raise ValueError(f"resize_size and crop_size must be positive, got {resize_size}, {crop_size}")
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=interpolation),
            transforms.CenterCrop(crop_size),
            MaybeToTensor(),
            make_normalize_transform(mean, std),
        ]
    )


# --------------------------------------------------------------------------------------------------
# Fast tensor kernels (multi-crop)
# --------------------------------------------------------------------------------------------------


def pil_to_uint8_chw(image: PIL.Image.Image) -> torch.Tensor:
    """PIL RGB (or L) image -> uint8 tensor [3, H, W] (a channels-last view, one copy of the pixels).

    The channels-last layout is what the uint8 antialiased resampling kernel runs fastest on.
    """
    if image.mode == "L":
        image = image.convert("RGB")
    if image.mode != "RGB":
        raise ValueError(
            f"expected a PIL image in mode RGB (or L), got mode {image.mode!r}; "
            "load images with dinov2.data.image_io.load_rgb"
        )
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1)


def resized_crop_uint8(
    image: torch.Tensor, top: int, left: int, height: int, width: int, size: int | tuple[int, int]
) -> torch.Tensor:
    """Crop box (top, left, height, width) of a uint8 [3, H, W] image and resize it to `size`.

    Bicubic with antialiasing in one resampling call (the same kernel as torchvision's
    `resized_crop(..., BICUBIC, antialias=True)` on uint8 tensors, close to PIL's bicubic resize).
    Returns uint8 [3, size, size].
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    crop = image[:, top : top + height, left : left + width]
    if crop.shape[1:] == (out_h, out_w):
        return crop.contiguous()
    return F.interpolate(crop[None], size=(out_h, out_w), mode="bicubic", antialias=True)[0]


def uint8_to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 tensor -> new contiguous float32 tensor in [0, 1] (torchvision's `to_dtype(scale=True)`)."""
    return image.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)


def adjust_brightness_(image: torch.Tensor, factor: float) -> torch.Tensor:
    """In place `clamp(x * factor, 0, 1)` on a float image in [0, 1] (factor >= 0)."""
    return image.mul_(factor).clamp_(max=1.0)


def rgb_to_gray(image: torch.Tensor) -> torch.Tensor:
    """Luma of a float [3, H, W] image -> [1, H, W] (0.2989 R + 0.587 G + 0.114 B, torchvision's order)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    r, g, b = image.unbind(0)
    w_r, w_g, w_b = GRAY_WEIGHTS
    return r.mul(w_r).add_(g, alpha=w_g).add_(b, alpha=w_b).unsqueeze(0)


def adjust_contrast_(image: torch.Tensor, factor: float) -> torch.Tensor:
    """In place blend with the image's mean luma: `clamp(c * x + (1 - c) * mean_gray, 0, 1)`."""
    # The mean of the luma is the luma of the channel means (both are linear): one reduction pass.
    channel_means = image.mean(dim=(1, 2)).tolist()
    mean_gray = sum(w * m for w, m in zip(GRAY_WEIGHTS, channel_means))
    return image.mul_(factor).add_((1.0 - factor) * mean_gray).clamp_(0.0, 1.0)


def adjust_saturation_(image: torch.Tensor, factor: float) -> torch.Tensor:
    """In place blend with the luma image: `clamp(s * x + (1 - s) * gray, 0, 1)`."""
    gray = rgb_to_gray(image)
    return image.mul_(factor).add_(gray, alpha=1.0 - factor).clamp_(0.0, 1.0)


def _negative_step(x: torch.Tensor) -> torch.Tensor:
    """-1 where x < 0, 0 where x >= 0, for x in [-1, 1] (new tensor).

    Comparisons and torch.where run an order of magnitude slower than arithmetic on CPU tensors;
    floor(min(x, 0)) gives the same step exactly, whatever the size of a negative x.
    """
    return x.clamp(max=0.0).floor_()


def adjust_hue(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Rotate the HSV hue of a float [3, H, W] image in [0, 1] by `factor` turns (|factor| <= 0.5).

    Equal (to float rounding) to torchvision's RGB -> HSV, `h = (h + factor) mod 1`, HSV -> RGB, but
    without building the HSV image or using comparisons: value V = max, chroma C = max - min and the
    hexagonal hue H (in sixths of a turn) are computed with min/max/floor arithmetic, then each channel
    is rebuilt as V - C + C * trapezoid(H + 6 * factor - 2n), the piecewise-linear HSV -> RGB curve.
    """
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor must be in [-0.5, 0.5], got {factor}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    r, g, b = image.unbind(0)
    g_minus_b = g - b
    gb_max = torch.maximum(g, b)
    gb_min = torch.minimum(g, b)
    value = torch.maximum(r, gb_max)
    chroma = value - torch.minimum(r, gb_min)
    # Grey pixels have chroma 0 and hue numerators 0, so any finite inverse works for them.
    inv_chroma = chroma.clamp_min(1e-12).reciprocal_()
    blue_beats_green = _negative_step(g_minus_b)  # -1 where g < b, else 0
    red_is_max = _negative_step(r - gb_max).add_(1.0)  # 1 where r >= g, b (red wins ties, as in torchvision)
    # Red max: H = (g - b) / C (in [-1, 1], wrapped later). Otherwise |(r - min(g, b)) / C - 2 - 6 f|
    # equals 2 + (b - r) / C when green is the max (green wins ties with blue) and 4 + (r - g) / C
    # when blue is, with f = blue_beats_green.
    other = (r - gb_min).mul_(inv_chroma).sub_(blue_beats_green, alpha=6.0).sub_(2.0).abs_()
    hue6 = torch.lerp(other, g_minus_b.mul_(inv_chroma), red_is_max)  # in [-1, 5]
    shift = 6.0 * factor
    if abs(shift) > 1.0:
        # Bring H + shift back to [0, 6) so the trapezoid below stays within its valid range.
        hue6.add_(shift)
        hue6.sub_(torch.floor(hue6 * (1.0 / 6.0)).mul_(6.0))
        shift = 0.0
    offsets = torch.tensor([shift, shift - 2.0, shift - 4.0], dtype=image.dtype, device=image.device)
    # (1 - HSV ramp) for channel n: clamp(||z| - 3| - 1, 0, 1) with z = H' - 2n, which is the 6-periodic
    # trapezoid for z in [-6, 6]; H' in [-2, 6] keeps z there.
    ramp = torch.add(hue6, offsets.view(3, 1, 1)).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma).add_(value.sub_(chroma))


def _gaussian_taps(sigma: float, kernel_size: int) -> list[float]:
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    half = kernel_size // 2
    weights = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(kernel_size)]
    total = sum(weights)
    return [w / total for w in weights]


def gaussian_kernel1d(sigma: float, kernel_size: int = 9, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps at integer offsets -(k-1)/2..(k-1)/2 (torchvision's kernel)."""
    return torch.tensor(_gaussian_taps(sigma, kernel_size), dtype=dtype)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Gaussian blur of a float [C, H, W] image with reflect padding (torchvision's semantics).

    Separable: 2 * kernel_size shifted multiply-adds instead of a kernel_size**2 2-D convolution
    (torch's depthwise convolutions are several times slower than this on CPU for 9 taps).
    """
    channels, height, width = image.shape
    half = kernel_size // 2
    if height <= half or width <= half:
        raise ValueError(f"image {height}x{width} too small for a {kernel_size}-tap reflect-padded blur")
    taps = _gaussian_taps(sigma, kernel_size)
    padded = F.pad(image[None], (half, half, half, half), mode="reflect")[0]
    rows = padded[:, :, 0:width] * taps[0]
    for t in range(1, kernel_size):
        rows.add_(padded[:, :, t : t + width], alpha=taps[t])
    out = rows[:, 0:height] * taps[0]
    for t in range(1, kernel_size):
        out.add_(rows[:, t : t + height], alpha=taps[t])
    return out


def solarize_(image: torch.Tensor, threshold: float = 128.0 / 255.0) -> torch.Tensor:
    """In place `x if x < threshold else 1 - x` (Pillow's solarize at 128 for uint8 images)."""
    inverted = _negative_step(image - threshold).add_(1.0)  # 1 where x >= threshold, else 0
    # lerp returns its start exactly at weight 0 and its end exactly at weight 1.
    return image.lerp_(torch.sub(1.0, image), inverted)


class ChannelNormalize:
    """`(x - mean) / std` per channel as one multiply-add with constants built once.

    A [1, H, W] grey image becomes [3, H, W] (the grey plane normalised with each channel's statistics).
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
    ):
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need the same length and std > 0, got mean={mean}, std={std}")
        self.scale = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(-1, 1, 1)
        self.bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, image, self.scale)


def normalize(
    image: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """`(x - mean) / std` per channel; a [1, H, W] grey image becomes [3, H, W]."""
    return ChannelNormalize(mean, std)(image)


def stain_matrices(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb_from_stain, stain_from_rgb): row-normalised stain vectors and their inverse, 3x3 each."""
    rgb_from_stain = torch.tensor(HED_FROM_RGB_STAINS, dtype=torch.float64)
    rgb_from_stain = rgb_from_stain / rgb_from_stain.norm(dim=1, keepdim=True)
    return rgb_from_stain.to(dtype), torch.linalg.inv(rgb_from_stain).to(dtype)


def stain_jitter(image: torch.Tensor, alpha: Sequence[float], beta: Sequence[float]) -> torch.Tensor:
    """Perturb the stain concentrations of a float RGB image [3, H, W] in [0, 1].

    Colour deconvolution (Ruifrok & Johnston): optical density OD = -ln(I) per channel, stain
    concentrations S = OD @ inv(M) for the stain matrix M (rows: stains). Each stain i is scaled by
    `alpha[i]` and shifted by `beta[i] * w`, where w = OD_sum^2 / (OD_sum^2 + 0.2^2) in [0, 1) is a
    "stained pixel" weight (dye binds to cells, not to bare glass), so a white background stays
    white while cells change hue and intensity. Then OD' = S' @ M and I' = exp(-OD').
    Returns a new tensor clamped to [0, 1].
    With alpha = 1 and beta = 0 it returns the input (up to rounding, for intensities >= 1/512).
    """
    channels, height, width = image.shape
    if channels != 3:
        raise ValueError(f"stain jitter needs an RGB image [3, H, W], got shape {tuple(image.shape)}")
    if len(alpha) != 3 or len(beta) != 3:
        raise ValueError(f"alpha and beta need one value per stain (3), got {len(alpha)} and {len(beta)}")
    rgb_from_stain, stain_from_rgb = stain_matrices(torch.float64)
    scale = torch.tensor(alpha, dtype=torch.float64)
    shift = torch.tensor(beta, dtype=torch.float64)
    # S' = S diag(alpha) + w beta, so OD' = OD (inv(M) diag(alpha) M) + w (beta M): one 3x3 map and one
    # rank-1 term, composed in float64 then applied in the image dtype.
    mix = (stain_from_rgb * scale) @ rgb_from_stain
    # Work with log2(I) = -OD / ln 2: exp2 is several times faster than exp on CPU, and the map is
    # linear, so only the constant terms change units.
    offset = (shift @ rgb_from_stain) / math.log(2.0)
    log_intensity = image.reshape(3, -1).clamp_min(_MIN_INTENSITY).log2_()
    od_sum_sq = log_intensity.sum(dim=0, keepdim=True).square_()  # (OD_sum / ln 2)^2
    weight = od_sum_sq.div_(od_sum_sq + (_STAIN_OD_HALF / math.log(2.0)) ** 2)
    new_log = torch.addmm(weight * -offset.to(image.dtype).view(3, 1), mix.T.to(image.dtype), log_intensity)
    return new_log.exp2_().clamp_(max=1.0).view(3, height, width)


def sample_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    uniforms: Sequence[float],
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) from pre-drawn U(0, 1) numbers.

    Same distribution as torchvision's `RandomResizedCrop.get_params`: up to 10 trials of
    area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first box that fits is placed
    uniformly; if none fits, a centre crop clamped to the ratio range (or the whole image).
    `uniforms` holds 22 numbers: 10 (area, ratio) pairs then 2 for the position.
    """
    if len(uniforms) < 22:
        raise ValueError(f"sample_resized_crop_box needs 22 uniforms, got {len(uniforms)}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for trial in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[2 * trial])
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniforms[2 * trial + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # floor(u * n) is uniform on {0..n-1} like torch.randint(0, n); min() guards u -> 1.
            top = min(int(uniforms[20] * (height - h + 1)), height - h)
            left = min(int(uniforms[21] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
