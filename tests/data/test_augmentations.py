"""DataAugmentationDINO: output contract, validation, determinism, equivalence with torchvision."""

import itertools
import math

import numpy as np
import PIL.Image
import pytest
import torch
from scipy import stats
from torchvision import transforms as tv
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from dinov2.data import transforms as T
from dinov2.data.augmentations import (
    UNIFORMS_PER_CROP,
    ColorAugmentation,
    CropParams,
    CropRecipe,
    DataAugmentationDINO,
    apply_crop,
    sample_crop_params,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """Crops are made in single-threaded DataLoader workers; 2 threads on tiny tensors add sync cost."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


MEAN = torch.tensor(T.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(T.IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _cell_image(height: int = 120, width: int = 120, seed: int = 0) -> PIL.Image.Image:
    """White background, a purple nucleus in a pink cell, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3))
    img[:] = (250, 248, 250)
    r = np.hypot(yy - height / 2, xx - width / 2)
    img[r < min(height, width) / 3] = (215, 150, 180)
    img[r < min(height, width) / 6] = (90, 40, 130)
    img += rng.normal(0, 3, img.shape)
    return PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.mark.parametrize(
    "n_local, global_size, local_size, stain",
    [(8, 224, 98, 0.0), (0, 56, 28, 0.0), (3, 42, 14, 0.1)],
)
def test_output_contract(n_local, global_size, local_size, stain):
    aug = DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), n_local, global_size, local_size, stain_jitter=stain
    )
    out = aug(_cell_image(90, 130))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == n_local
    assert out["offsets"] == ()
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.is_contiguous()
    for crop in out["global_crops"]:
        assert crop.shape == (3, global_size, global_size) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, local_size, local_size) and crop.dtype == torch.float32
    # The teacher sees the very same global crops (DINOv2 passes the same tensors).
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    # Normalised pixels come from [0, 1] images.
    for crop in out["global_crops"] + out["local_crops"]:
        pixels = _denormalize(crop)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_uint8_tensor_input_gives_same_result_as_pil():
    img = _cell_image()
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    torch.manual_seed(7)
    from_pil = aug(img)
    torch.manual_seed(7)
    from_tensor = aug(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())
    for a, b in zip(
        from_pil["global_crops"] + from_pil["local_crops"],
        from_tensor["global_crops"] + from_tensor["local_crops"],
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_crops_scale=(0.9, 0.3)), "global_crops_scale"),
        (dict(local_crops_scale=(0.0, 0.3)), "local_crops_scale"),
        (dict(local_crops_scale=(0.1,)), "local_crops_scale"),
        (dict(global_crops_size=0), "crop size"),
        (dict(local_crops_size=-14), "crop size"),
        (dict(local_crops_number=-1), "local_crops_number"),
        (dict(stain_jitter=-0.1), "stain_jitter"),
        (dict(local_crops_size=4), "too small for the 9-tap blur"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DataAugmentationDINO(**args)


def test_invalid_inputs():
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1, 16, 8)
    with pytest.raises(ValueError, match="mode"):
        aug(PIL.Image.new("CMYK", (20, 20)))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="PIL image"):
        aug(np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        aug(torch.zeros(3, 0, 5, dtype=torch.uint8))


def test_omegaconf_style_lists_are_accepted():
    aug = DataAugmentationDINO([0.32, 1.0], [0.05, 0.32], 1, 16, 8)
    assert aug.global_crops_scale == (0.32, 1.0) and aug.local_recipe.scale == (0.05, 0.32)


def test_determinism_under_a_seed():
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 4, 48, 24, stain_jitter=0.05)
    img = _cell_image()
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        out = aug(img)
        outputs.append(torch.cat([c.flatten() for c in out["global_crops"] + out["local_crops"]]))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def _plain_recipe(size: int, **kwargs) -> CropRecipe:
    """A recipe with every random op off unless switched on."""
    base = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    base.update(kwargs)
    return CropRecipe(size, (1.0, 1.0), **base)


def test_full_scale_crop_equals_resized_image():
    # 120 x 200 cannot hold a full-area crop with ratio <= 4/3: every trial fails and the fallback is the
    # centre 120 x 160 box, as in torchvision.
    img = _cell_image(120, 200)
    recipe = _plain_recipe(64)
    gen = torch.Generator().manual_seed(0)
    uniforms = torch.rand(UNIFORMS_PER_CROP, generator=gen, dtype=torch.float64).tolist()
    params = sample_crop_params(recipe, 120, 200, uniforms)
    assert params.box == (0, 20, 120, 160)
    out = _denormalize(apply_crop(T.pil_to_uint8_chw(img), recipe, params))

    torch.manual_seed(0)
    reference_pil = tv.RandomResizedCrop(64, scale=(1.0, 1.0), interpolation=InterpolationMode.BICUBIC)(img)
    reference = tv.functional.to_tensor(reference_pil)
    assert (out - reference).abs().max() <= 1.5 / 255  # torch vs Pillow bicubic rounding
    # Flip with probability 1 mirrors it.
    flipped = _plain_recipe(64, flip_p=1.0)
    params = sample_crop_params(flipped, 120, 200, [0.5] * UNIFORMS_PER_CROP)
    assert params.flip
    out_flipped = _denormalize(apply_crop(T.pil_to_uint8_chw(img), flipped, params))
    torch.testing.assert_close(out_flipped, out.flip(-1))


def test_colour_pipeline_equals_torchvision_ops_in_the_sampled_order():
    img = T.pil_to_uint8_chw(_cell_image(80, 80))
    recipe = _plain_recipe(40, color_jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, solarize_p=1.0)
    jitter = (("hue", -0.07), ("saturation", 1.15), ("brightness", 1.3), ("contrast", 0.7))
    params = CropParams(
        box=(5, 10, 60, 50),
        flip=True,
        stain=None,
        jitter=jitter,
        grayscale=True,
        blur_sigma=1.1,
        solarize=True,
    )
    out = apply_crop(img, recipe, params)

    x = F2.resized_crop(img, 5, 10, 60, 50, [40, 40], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = F2.to_dtype(F2.horizontal_flip(x), torch.float32, scale=True)
    x = F2.adjust_hue(x, -0.07)
    x = F2.adjust_saturation(x, 1.15)
    x = F2.adjust_brightness(x, 1.3)
    x = F2.adjust_contrast(x, 0.7)
    x = F2.rgb_to_grayscale(x, num_output_channels=3)
    x = F2.gaussian_blur(x, [9, 9], [1.1, 1.1])
    x = F2.solarize(x, 128 / 255)
    expected = F2.normalize(x, list(T.IMAGENET_DEFAULT_MEAN), list(T.IMAGENET_DEFAULT_STD))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def _draw_params(recipe: CropRecipe, n: int, height: int = 360, width: int = 360) -> list[CropParams]:
    torch.manual_seed(11)
    uniforms = torch.rand(n, UNIFORMS_PER_CROP, dtype=torch.float64).tolist()
    return [sample_crop_params(recipe, height, width, u) for u in uniforms]


def _binomial_ok(count: int, n: int, p: float) -> bool:
    """Count within 5 standard deviations of n * p (false alarm odds ~ 1e-6 per check)."""
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def test_random_op_frequencies_follow_the_recipe():
    n = 4000
    for recipe in DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1).recipes:
        params = _draw_params(recipe, n)
        assert _binomial_ok(sum(p.flip for p in params), n, 0.5)
        assert _binomial_ok(sum(p.jitter is not None for p in params), n, 0.8)
        assert _binomial_ok(sum(p.grayscale for p in params), n, 0.2)
        assert _binomial_ok(sum(p.blur_sigma is not None for p in params), n, recipe.blur_p)
        assert _binomial_ok(sum(p.solarize for p in params), n, recipe.solarize_p)
    assert DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1).recipes[1].solarize_p == 0.2


def test_colour_jitter_order_and_factors_match_torchvision_distributions():
    params = [p for p in _draw_params(CropRecipe(224, (0.32, 1.0)), 6000) if p.jitter is not None]
    orders = [tuple(name for name, _ in p.jitter) for p in params]
    counts = [
        orders.count(perm) for perm in itertools.permutations(("brightness", "contrast", "saturation", "hue"))
    ]
    # Uniform over the 24 orders, like torch.randperm(4).
    assert stats.chisquare(counts).pvalue > 1e-4
    factors = {
        name: [f for p in params for n, f in p.jitter if n == name]
        for name in ("brightness", "contrast", "saturation", "hue")
    }
    torch.manual_seed(5)
    reference = [
        tv.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)) for _ in range(3000)
    ]
    for index, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        ref = [r[index + 1] for r in reference]
        assert stats.ks_2samp(factors[name], ref).pvalue > 1e-4, name


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_boxes_match_torchvision_distribution(scale):
    height, width = 150, 200
    ours = [p.box for p in _draw_params(CropRecipe(32, scale), 3000, height, width)]
    torch.manual_seed(6)
    ref_img = torch.zeros(1, height, width)
    theirs = [tv.RandomResizedCrop.get_params(ref_img, list(scale), [3 / 4, 4 / 3]) for _ in range(3000)]
    for name, index in (("top", 0), ("left", 1), ("height", 2), ("width", 3)):
        a = [b[index] for b in ours]
        b = [b[index] for b in theirs]
        assert stats.ks_2samp(a, b).pvalue > 1e-4, name
    for top, left, h, w in ours:
        assert 0 <= top <= height - h and 0 <= left <= width - w


def test_stain_jitter_in_the_pipeline():
    img = T.pil_to_uint8_chw(_cell_image(64, 64))
    box = (0, 0, 64, 64)
    off = _plain_recipe(64)
    base = _denormalize(apply_crop(img, off, sample_crop_params(off, 64, 64, [0.5] * UNIFORMS_PER_CROP)))
    # Strength 0 draws no stain parameters and leaves the crop as it was.
    assert sample_crop_params(off, 64, 64, [0.5] * UNIFORMS_PER_CROP).stain is None
    torch.testing.assert_close(base, T.uint8_to_float(img), atol=1e-6, rtol=0)

    on = _plain_recipe(64, stain_jitter=0.1)
    params = CropParams(
        box=box,
        flip=False,
        stain=((1.1, 0.9, 1.0), (0.1, -0.1, 0.0)),
        jitter=None,
        grayscale=False,
        blur_sigma=None,
        solarize=False,
    )
    out = _denormalize(apply_crop(img, on, params))
    background = base.min(dim=0).values > 0.97
    nucleus = base.sum(dim=0) < 1.5
    assert background.sum() > 500 and nucleus.sum() > 100
    assert (out - base).abs()[:, background].max() < 0.015  # white stays (near) white
    assert (out - base).abs()[:, nucleus].amax(dim=0).mean() > 0.03  # stained pixels change
    sampled = sample_crop_params(on, 64, 64, [0.0] * UNIFORMS_PER_CROP).stain
    assert sampled[0] == pytest.approx((0.9, 0.9, 0.9)) and sampled[1] == pytest.approx((-0.1, -0.1, -0.1))


def test_real_cell_images(pbc_root):
    from dinov2.data.transforms import pil_to_uint8_chw

    files = sorted(p for p in (pbc_root / "lymphocyte").glob("*.jpg"))[:3]
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98, stain_jitter=0.05)
    for path in files:
        with PIL.Image.open(path) as im:
            img = im.convert("RGB")
        assert pil_to_uint8_chw(img).shape[0] == 3
        out = aug(img)
        crops = out["global_crops"] + out["local_crops"]
        assert all(torch.isfinite(c).all() for c in crops)
        assert [c.shape[-1] for c in crops] == [224, 224] + [98] * 8


def _torchvision_recipe(recipe: CropRecipe):
    """Meta-style torchvision v1 pipeline on PIL images for one crop kind (the reference)."""
    steps = [
        tv.RandomResizedCrop(recipe.size, scale=recipe.scale, interpolation=InterpolationMode.BICUBIC),
        tv.RandomHorizontalFlip(p=recipe.flip_p),
        tv.RandomApply([tv.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=recipe.color_jitter_p),
        tv.RandomGrayscale(p=recipe.grayscale_p),
        tv.RandomApply([tv.GaussianBlur(9, sigma=recipe.blur_sigma)], p=recipe.blur_p),
        tv.RandomSolarize(128, p=recipe.solarize_p),
        tv.ToTensor(),
    ]
    return tv.Compose(steps)


def _crop_features(crops: list[torch.Tensor]) -> dict[str, np.ndarray]:
    stacked = torch.stack(crops).double()
    return {
        "mean": stacked.mean(dim=(1, 2, 3)).numpy(),
        "spatial std": stacked.std(dim=(2, 3)).mean(dim=1).numpy(),  # blur lowers it
        "red - blue": (stacked[:, 0] - stacked[:, 2]).mean(dim=(1, 2)).numpy(),  # grey makes it 0
        "sharpness": (stacked[..., 1:] - stacked[..., :-1]).abs().mean(dim=(1, 2, 3)).numpy(),
    }


def test_whole_recipe_matches_torchvision_pil_pipeline_statistically():
    # Crop statistics of ours and of Meta's torchvision-on-PIL recipe follow the same distributions
    # (two-sample KS tests on 300 crops each, fixed seeds, for each kind of crop).
    img = _cell_image(72, 72, seed=2)
    pixels = T.pil_to_uint8_chw(img)
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1, 40, 20)
    identity = T.ChannelNormalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    n = 300
    for recipe in aug.recipes:
        torch.manual_seed(21)
        uniforms = torch.rand(n, UNIFORMS_PER_CROP, dtype=torch.float64).tolist()
        ours = [apply_crop(pixels, recipe, sample_crop_params(recipe, 72, 72, u), identity) for u in uniforms]
        torch.manual_seed(22)
        reference = _torchvision_recipe(recipe)
        theirs = [reference(img) for _ in range(n)]
        ours_f, theirs_f = _crop_features(ours), _crop_features(theirs)
        for name in ours_f:
            pvalue = stats.ks_2samp(ours_f[name], theirs_f[name]).pvalue
            assert pvalue > 1e-3, (recipe.blur_p, recipe.solarize_p, name, pvalue)


def test_colour_preserving_recipe_keeps_stain_colour():
    """With hue, saturation and grayscale off, every crop of a flat-coloured image keeps its hue:
    brightness and contrast only scale (and shift towards grey) the RGB values, so the ratios of the
    channel deviations from the crop's grey level stay those of the source colour."""
    colour = torch.tensor([150.0, 90.0, 45.0])  # an eosinophil-granule orange, dark enough not to clip
    image = colour.to(torch.uint8).view(3, 1, 1).expand(3, 96, 96).contiguous()
    keep = ColorAugmentation(prob=1.0, brightness=0.3, contrast=0.3, saturation=0.0, hue=0.0,
                             grayscale_prob=0.0, solarize_prob=0.0)  # fmt: skip
    aug = DataAugmentationDINO(
        (0.3, 1.0), (0.1, 0.3), 2, 48, 24, color_augmentation=keep, blur_prob=(0, 0, 0)
    )
    torch.manual_seed(3)
    for _ in range(20):
        for crop in (c for k in ("global_crops", "local_crops") for c in aug(image)[k]):
            rgb = _denormalize(crop).mean(dim=(1, 2)) * 255
            # saturation(0.0 factor range [1, 1]) and hue 0 are identities; the gap R-G : G-B holds.
            gaps = rgb[:2] - rgb[1:]
            expected = colour[:2] - colour[1:]
            assert gaps[0] / gaps[1] == pytest.approx(float(expected[0] / expected[1]), rel=2e-3)

    # DINOv2's default recipe does change hue (and sometimes drops colour altogether).
    default = DataAugmentationDINO((0.3, 1.0), (0.1, 0.3), 2, 48, 24, blur_prob=(0, 0, 0))
    torch.manual_seed(3)
    ratios = []
    for _ in range(20):
        rgb = _denormalize(default(image)["global_crops"][0]).mean(dim=(1, 2)) * 255
        gaps = rgb[:2] - rgb[1:]
        ratios.append(float(gaps[0] / gaps[1]) if abs(gaps[1]) > 1e-3 else float("nan"))
    assert any(math.isnan(r) or abs(r - 60 / 45) > 0.05 for r in ratios)


def test_colour_and_blur_probabilities_reach_every_recipe():
    colour = ColorAugmentation(prob=0.3, brightness=0.1, contrast=0.2, saturation=0.0, hue=0.0,
                               grayscale_prob=0.05, solarize_prob=0.0)  # fmt: skip
    aug = DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), 2, color_augmentation=colour, blur_prob=(0.5, 0.2, 0.0)
    )
    g1, g2, local = aug.recipes[:3]
    assert [r.blur_p for r in (g1, g2, local)] == [0.5, 0.2, 0.0]
    assert [r.solarize_p for r in (g1, g2, local)] == [0.0, 0.0, 0.0]
    for r in (g1, g2, local):
        assert (r.color_jitter_p, r.brightness, r.contrast, r.saturation, r.hue, r.grayscale_p) == (
            0.3, 0.1, 0.2, 0.0, 0.0, 0.05)  # fmt: skip
    n = 4000
    params = _draw_params(g1, n)
    assert _binomial_ok(sum(p.jitter is not None for p in params), n, 0.3)
    assert _binomial_ok(sum(p.grayscale for p in params), n, 0.05)
    # The defaults are DINOv2's.
    plain = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1)
    assert [r.blur_p for r in plain.recipes] == [1.0, 0.1, 0.5]
    assert (plain.recipes[0].saturation, plain.recipes[0].hue, plain.recipes[0].grayscale_p) == (
        0.2,
        0.1,
        0.2,
    )
    with pytest.raises(ValueError, match="blur_prob"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1, blur_prob=(1.0, 0.5))
    with pytest.raises(ValueError, match="grayscale_prob"):
        ColorAugmentation(grayscale_prob=1.5)


def test_from_config_builds_the_crops_sections_recipe():
    from dinov2.utils.config import build_config

    overrides = [
        "crops.local_crops_number=3",
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        "crops.color_augmentation.hue=0.0",
        "crops.stain_jitter=0.05",
        "crops.blur_prob=[0.5,0.2,0.1]",
    ]
    cfg = build_config(None, overrides, check_paths=False)
    aug = DataAugmentationDINO.from_config(cfg.crops)
    by_hand = DataAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), 3, 32, 16, stain_jitter=0.05,
        color_augmentation=ColorAugmentation(hue=0.0), blur_prob=(0.5, 0.2, 0.1),
    )  # fmt: skip
    assert tuple(cfg.crops.global_crops_scale) == (0.32, 1.0) and tuple(cfg.crops.local_crops_scale) == (
        0.05,
        0.32,
    )
    assert aug.recipes == by_hand.recipes and repr(aug) == repr(by_hand)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    torch.manual_seed(3)
    a = aug(image)
    torch.manual_seed(3)
    b = by_hand(image)
    assert len(a["local_crops"]) == 3 and all(
        torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"])
    )
