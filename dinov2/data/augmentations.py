"""DINOv2 multi-crop augmentation: 2 global + N local crops of one image, on uint8/float tensors.

The recipe is DINOv2's (BYOL's colour recipe on top of multi-crop):

* every crop: RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) and a horizontal flip (p 0.5),
  then ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8 (the four ops in
  a random order) and RandomGrayscale(p 0.2);
* global crop 1: Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0)) with p 1.0;
* global crop 2: Gaussian blur with p 0.1, then solarisation at 128 with p 0.2;
* local crops: Gaussian blur with p 0.5;
* then ToTensor and ImageNet normalisation.

Blur probabilities follow the paper. Meta's code inverts them by accident (its GaussianBlur passes
`1 - p` to RandomApply, so there global crop 1 is never blurred and global crop 2 is blurred with p 0.9);
see dinov2.data.transforms.GaussianBlur.

Differences from Meta's torchvision-on-PIL pipeline, all on purpose and none in the distribution of
random parameters:
* the image is decoded to a uint8 tensor once; each crop is cut and resized in one antialiased bicubic
  call (uint8 in, uint8 out, like PIL), flipped, then converted to float once;
* colour ops run on float32 without rounding to uint8 between ops (Meta's PIL ops round after each);
  they equal torchvision.transforms.v2.functional's float kernels;
* all random numbers of one image come from a single `torch.rand` call on torch's global generator
  (so `torch.manual_seed` and DataLoader worker seeding work as with torchvision) and are mapped to
  parameters with the same distributions as torchvision's samplers.

Optional Giemsa stain jitter (`stain_jitter > 0`) perturbs stain concentrations in optical-density
space before colour jitter; see `dinov2.data.transforms.stain_jitter`.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import PIL.Image
import torch

from dinov2.data import transforms as T

# Layout of the uniform numbers drawn for one crop (indices into one row of the per-image draw).
_BOX = slice(0, 22)  # 10 (area, log-ratio) trials + 2 position numbers
_FLIP = 22
_JITTER_APPLY = 23
_JITTER_ORDER = slice(24, 28)
_JITTER_FACTORS = slice(28, 32)
_GRAY = 32
_BLUR_APPLY = 33
_BLUR_SIGMA = 34
_SOLARIZE = 35
_STAIN = slice(36, 42)  # 3 scales then 3 shifts
UNIFORMS_PER_CROP = 42

# Gaussian blur taps (DINOv2 uses torchvision's GaussianBlur(kernel_size=9)).
BLUR_KERNEL_SIZE = 9

# ColorJitter op names in torchvision's indexing order (its randperm(4) permutes these).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _as_range(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {value!r}") from e
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got ({low}, {high})")
    return low, high


def _check_probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class CropRecipe:
    """Augmentations of one kind of crop (DINOv2's values are the defaults)."""

    size: int
    """Output side in pixels (crops are square)."""
    scale: tuple[float, float]
    """Range of the crop's area as a fraction of the image area."""
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """Range of the crop's aspect ratio (width / height), sampled log-uniformly."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter_p: float = 0.8
    """Probability of applying ColorJitter (the four ops below in a random order)."""
    brightness: float = 0.4
    """Brightness factor ~ U(max(0, 1 - b), 1 + b)."""
    contrast: float = 0.4
    """Contrast factor ~ U(max(0, 1 - c), 1 + c)."""
    saturation: float = 0.2
    """Saturation factor ~ U(max(0, 1 - s), 1 + s)."""
    hue: float = 0.1
    """Hue shift ~ U(-h, h) in turns (h <= 0.5)."""
    grayscale_p: float = 0.2
    """Probability of converting to grey (3 equal channels)."""
    blur_p: float = 0.5
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's sigma in pixels (kernel 9 taps, reflect padding)."""
    solarize_p: float = 0.0
    """Probability of solarising (invert values >= 128/255)."""
    stain_jitter: float = 0.0
    """Stain concentration jitter strength: scale ~ U(1 - s, 1 + s), shift ~ U(-s, s); 0 disables."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise ValueError(f"crop size must be a positive int (pixels), got {self.size!r}")
        object.__setattr__(self, "scale", _as_range(self.scale, "crop scale"))
        ratio = tuple(float(r) for r in self.ratio)
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must be (min, max) with 0 < min <= max, got {self.ratio!r}")
        object.__setattr__(self, "ratio", ratio)
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_probability(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} jitter must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {self.hue}")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma!r}")
        if self.blur_p > 0 and self.size <= BLUR_KERNEL_SIZE // 2:
            raise ValueError(
                f"crop size {self.size} is too small for the {BLUR_KERNEL_SIZE}-tap blur "
                f"(needs > {BLUR_KERNEL_SIZE // 2} pixels); use a larger crop or blur_p=0"
            )
        if not 0.0 <= self.stain_jitter < 1.0:
            raise ValueError(f"stain_jitter must be in [0, 1), got {self.stain_jitter}")


@dataclass(frozen=True)
class CropParams:
    """Random parameters drawn for one crop."""

    box: tuple[int, int, int, int]
    """(top, left, height, width) in input pixels."""
    flip: bool
    stain: tuple[tuple[float, float, float], tuple[float, float, float]] | None
    """(scales, shifts) of the three stain concentrations, or None."""
    jitter: tuple[tuple[str, float], ...] | None
    """ColorJitter ops in application order with their factors, or None when not applied."""
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def _uniform(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def sample_crop_params(recipe: CropRecipe, height: int, width: int, uniforms: Sequence[float]) -> CropParams:
    """Map `UNIFORMS_PER_CROP` U(0, 1) numbers to a crop's parameters (torchvision's distributions)."""
    if len(uniforms) != UNIFORMS_PER_CROP:
        raise ValueError(f"expected {UNIFORMS_PER_CROP} uniforms per crop, got {len(uniforms)}")
    box = T.sample_resized_crop_box(height, width, recipe.scale, recipe.ratio, uniforms[_BOX])

    stain = None
    if recipe.stain_jitter > 0:
        s = recipe.stain_jitter
        u = uniforms[_STAIN]
        stain = (
            tuple(_uniform(v, 1.0 - s, 1.0 + s) for v in u[:3]),
            tuple(_uniform(v, -s, s) for v in u[3:]),
        )

    jitter = None
    if uniforms[_JITTER_APPLY] < recipe.color_jitter_p:
        # Sorting i.i.d. uniforms gives a uniformly random permutation, like torch.randperm(4).
        order_keys = uniforms[_JITTER_ORDER]
        order = sorted(range(4), key=order_keys.__getitem__)
        u = uniforms[_JITTER_FACTORS]
        factors = (
            _uniform(u[0], max(0.0, 1.0 - recipe.brightness), 1.0 + recipe.brightness),
            _uniform(u[1], max(0.0, 1.0 - recipe.contrast), 1.0 + recipe.contrast),
            _uniform(u[2], max(0.0, 1.0 - recipe.saturation), 1.0 + recipe.saturation),
            _uniform(u[3], -recipe.hue, recipe.hue),
        )
        jitter = tuple((JITTER_OPS[i], factors[i]) for i in order)

    blur_sigma = None
    if uniforms[_BLUR_APPLY] < recipe.blur_p:
        blur_sigma = _uniform(uniforms[_BLUR_SIGMA], *recipe.blur_sigma)

    return CropParams(
        box=box,
        flip=uniforms[_FLIP] < recipe.flip_p,
        stain=stain,
        jitter=jitter,
        grayscale=uniforms[_GRAY] < recipe.grayscale_p,
        blur_sigma=blur_sigma,
        solarize=uniforms[_SOLARIZE] < recipe.solarize_p,
    )


def _apply_jitter_op(image: torch.Tensor, name: str, factor: float) -> torch.Tensor:
    if name == "brightness":
        return T.adjust_brightness_(image, factor)
    if name == "contrast":
        return T.adjust_contrast_(image, factor)
    if name == "saturation":
        return T.adjust_saturation_(image, factor)
    return T.adjust_hue(image, factor)


def apply_crop(
    image: torch.Tensor, recipe: CropRecipe, params: CropParams, normalize: T.ChannelNormalize | None = None
) -> torch.Tensor:
    """Cut, resize and augment one crop of a uint8 [3, H, W] image -> normalised float32 [3, S, S].

    `normalize` defaults to ImageNet statistics.
    """
    top, left, height, width = params.box
    crop = T.resized_crop_uint8(image, top, left, height, width, recipe.size)
    if params.flip:
        # Every later op is mirror-symmetric, so flipping the uint8 crop (1 byte/pixel) is cheapest.
        crop = crop.flip(-1)
    x = T.uint8_to_float(crop)
    if params.stain is not None:
        x = T.stain_jitter(x, *params.stain)
    if params.jitter is not None:
        for name, factor in params.jitter:
            x = _apply_jitter_op(x, name, factor)
    if params.grayscale:
        # Keep one plane: blur and solarise then touch a third of the data; normalise expands it.
        x = T.rgb_to_gray(x)
    if params.blur_sigma is not None:
        x = T.gaussian_blur(x, params.blur_sigma, BLUR_KERNEL_SIZE)
    if params.solarize:
        x = T.solarize_(x)
    return (normalize or T.ChannelNormalize())(x)


def image_to_uint8_chw(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """Accept a PIL RGB/L image or a uint8 tensor [3, H, W]; return a uint8 [3, H, W] tensor."""
    if isinstance(image, PIL.Image.Image):
        tensor = T.pil_to_uint8_chw(image)
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected a uint8 tensor [3, H, W], got dtype {image.dtype} and shape {tuple(image.shape)}"
            )
        tensor = image
    else:
        raise ValueError(f"expected a PIL image or a uint8 tensor [3, H, W], got {type(image).__name__}")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"cannot crop an empty image of size {tuple(tensor.shape[1:])}")
    return tensor


@dataclass(frozen=True)
class ColorAugmentation:
    """The photometric augmentations of the multi-crop recipe (defaults: DINOv2's).

    In stained blood smears colour is evidence (eosinophil granules are orange, basophil granules
    purple, a lymphocyte's cytoplasm pale blue), so a cell recipe may weaken or disable the ops that
    erase it (hue, saturation, grayscale); `crops.color_augmentation` in the training config sets these.
    """

    prob: float = 0.8
    """Probability of applying ColorJitter to a crop."""
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    """Probability of converting a crop to grey."""
    solarize_prob: float = 0.2
    """Probability of solarising the second global crop (the only one DINOv2 solarises)."""

    def __post_init__(self) -> None:
        for name in ("prob", "grayscale_prob", "solarize_prob"):
            _check_probability(getattr(self, name), f"color_augmentation.{name}")

    def crop_fields(self) -> dict:
        """The CropRecipe fields shared by every crop (solarisation is global crop 2's alone)."""
        return dict(
            color_jitter_p=self.prob,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            grayscale_p=self.grayscale_prob,
        )


class DataAugmentationDINO:
    """DINOv2's multi-crop augmentation (see the module docstring for the recipe).

    Args:
        global_crops_scale: (min, max) area fraction of the 2 global crops, e.g. (0.32, 1.0).
        local_crops_scale: (min, max) area fraction of the local crops, e.g. (0.05, 0.32).
        local_crops_number: number of local crops (>= 0).
        global_crops_size: global crop side in pixels.
        local_crops_size: local crop side in pixels.
        stain_jitter: strength of the Giemsa stain jitter applied to every crop; 0 disables.
        color_augmentation: colour jitter, grayscale and solarisation (default: DINOv2's values).
        blur_prob: probability of a Gaussian blur on global crop 1, global crop 2 and each local crop
            (DINOv2's paper: 1.0, 0.1, 0.5).

    Calling it on a PIL RGB image (or a uint8 tensor [3, H, W]) returns a dict with
    `global_crops` (2 float tensors [3, G, G]), `global_crops_teacher` (the same 2 tensors),
    `local_crops` (N float tensors [3, L, L]) and `offsets` (an empty tuple).

    Example:
        >>> aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98)
        >>> out = aug(PIL.Image.new("RGB", (360, 360)))
        >>> out["global_crops"][0].shape, len(out["local_crops"])
        (torch.Size([3, 224, 224]), 8)
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        stain_jitter: float = 0.0,
        color_augmentation: ColorAugmentation | None = None,
        blur_prob: Sequence[float] = (1.0, 0.1, 0.5),
    ):
        if not isinstance(local_crops_number, int) or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an int >= 0, got {local_crops_number!r}")
        self.global_crops_scale = _as_range(global_crops_scale, "global_crops_scale")
        self.local_crops_scale = _as_range(local_crops_scale, "local_crops_scale")
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.stain_jitter = float(stain_jitter)
        self.color = color_augmentation if color_augmentation is not None else ColorAugmentation()
        self.blur_prob = tuple(float(p) for p in blur_prob)
        if len(self.blur_prob) != 3:
            raise ValueError(
                f"blur_prob must be 3 probabilities (global 1, global 2, local), got {blur_prob!r}"
            )
        blur_global_1, blur_global_2, blur_local = self.blur_prob
        common = dict(stain_jitter=self.stain_jitter, **self.color.crop_fields())
        self.global_recipe_1 = CropRecipe(
            global_crops_size, self.global_crops_scale, blur_p=blur_global_1, **common
        )
        self.global_recipe_2 = CropRecipe(
            global_crops_size,
            self.global_crops_scale,
            blur_p=blur_global_2,
            solarize_p=self.color.solarize_prob,
            **common,
        )
        self.normalize = T.ChannelNormalize(T.IMAGENET_DEFAULT_MEAN, T.IMAGENET_DEFAULT_STD)
        self.local_recipe = CropRecipe(local_crops_size, self.local_crops_scale, blur_p=blur_local, **common)

    @classmethod
    def from_config(cls, crops_cfg) -> "DataAugmentationDINO":
        """The multi-crop recipe of the training config's `crops` section."""
        return cls(
            crops_cfg.global_crops_scale,
            crops_cfg.local_crops_scale,
            crops_cfg.local_crops_number,
            global_crops_size=crops_cfg.global_crops_size,
            local_crops_size=crops_cfg.local_crops_size,
            stain_jitter=crops_cfg.stain_jitter,
            color_augmentation=ColorAugmentation(**crops_cfg.color_augmentation),
            blur_prob=tuple(crops_cfg.blur_prob),
        )

    @property
    def recipes(self) -> list[CropRecipe]:
        """The recipe of every crop in output order: global 1, global 2, then the locals."""
        return [self.global_recipe_1, self.global_recipe_2] + [self.local_recipe] * self.local_crops_number

    def sample_params(self, height: int, width: int) -> list[CropParams]:
        """Draw every crop's parameters for an image of the given size with one `torch.rand` call."""
        recipes = self.recipes
        uniforms = torch.rand(len(recipes), UNIFORMS_PER_CROP, dtype=torch.float64).tolist()
        return [sample_crop_params(r, height, width, u) for r, u in zip(recipes, uniforms)]

    def __call__(self, image: PIL.Image.Image | torch.Tensor) -> dict:
        pixels = image_to_uint8_chw(image)
        params = self.sample_params(pixels.shape[1], pixels.shape[2])
        crops = [apply_crop(pixels, r, p, self.normalize) for r, p in zip(self.recipes, params)]
        global_crops = crops[:2]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": list(global_crops),
            "local_crops": crops[2:],
            "offsets": (),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size}, "
            f"stain_jitter={self.stain_jitter}, color_augmentation={self.color}, blur_prob={self.blur_prob})"
        )
