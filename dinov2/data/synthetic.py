"""Synthetic stained blood-smear cells: the embedded dataset of the demo and the tests.

Nothing may be downloaded, so the demo and the test-suite draw their own cells. The tree has the
PBC dataset's shape (one folder per class, JPEG files) and each image looks like a May-Grünwald-
Giemsa smear seen through a CellaVision-like camera: a pale background with red blood cells and
one centred white cell (or a platelet clump) whose nucleus shape, chromatin texture, cytoplasm
colour, granules and size follow its class. Position, rotation, scale, stain colour and intensity,
focus and noise vary per image, and the stain variation is shared by all classes so that the
classes differ by shape and texture, not only by their mean colour.

Rendering follows Beer-Lambert: each stained structure adds optical density (OD) per RGB channel
and the pixel is `255 * exp(-OD)`, so overlapping structures darken the way dyes do.

CLI: `dinov2-synth --out DIR --per-class N --size S --seed K`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from dinov2.data.files import find_images
from dinov2.utils.files import atomic_path

logger = logging.getLogger("dinov2")

PBC_CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)


def od(rgb: Sequence[float]) -> np.ndarray:
    """Optical density per channel of a dye whose full-strength colour is `rgb` (0..1)."""
    return -np.log(np.clip(np.asarray(rgb, dtype=np.float64), 1e-3, 1.0))


# Dye colours at unit density. Giemsa: azure/methylene blue stains nuclei and basophilic
# cytoplasm purple-blue, eosin stains red cells and eosinophil granules orange-red.
NUCLEUS = od((0.42, 0.24, 0.55))
DENSE_NUCLEUS = od((0.30, 0.14, 0.42))
PALE_NUCLEUS = od((0.58, 0.44, 0.70))
RBC = od((0.86, 0.56, 0.58))
BACKGROUND = od((0.95, 0.90, 0.86))
BLUE_CYTO = od((0.70, 0.78, 0.92))
GREY_BLUE_CYTO = od((0.80, 0.80, 0.88))
PINK_CYTO = od((0.93, 0.83, 0.86))
LILAC_GRANULE = od((0.74, 0.58, 0.78))
EOSIN_GRANULE = od((0.93, 0.50, 0.34))
BASO_GRANULE = od((0.25, 0.12, 0.36))
PLATELET = od((0.55, 0.38, 0.68))


@dataclass(frozen=True)
class CellLook:
    """How one class is drawn; radii are fractions of the image side."""

    cell_radius: tuple[float, float]  # range of the cytoplasm radius
    nucleus: str  # round | dense_round | kidney | bilobed | segmented | band | platelet
    nucleus_fraction: tuple[float, float]  # nucleus size relative to the cell radius
    nucleus_od: np.ndarray
    cytoplasm_od: np.ndarray
    cytoplasm_density: float
    granule_od: np.ndarray | None = None
    granules: tuple[int, int] = (0, 0)  # range of granule count
    granule_sigma: float = 0.6  # granule size in pixels at 128 px
    vacuoles: tuple[int, int] = (0, 0)


LOOKS = {
    "basophil": CellLook(
        (0.20, 0.25), "bilobed", (0.55, 0.65), NUCLEUS, PINK_CYTO, 0.8, BASO_GRANULE, (60, 110), 1.1
    ),
    "eosinophil": CellLook(
        (0.23, 0.28), "bilobed", (0.55, 0.65), NUCLEUS, PINK_CYTO, 0.8, EOSIN_GRANULE, (110, 170), 0.9
    ),
    "erythroblast": CellLook((0.13, 0.18), "dense_round", (0.55, 0.70), DENSE_NUCLEUS, BLUE_CYTO, 1.0),
    "ig": CellLook(
        (0.24, 0.30), "kidney", (0.62, 0.75), PALE_NUCLEUS, PINK_CYTO, 1.0, LILAC_GRANULE, (30, 60), 0.7
    ),
    "lymphocyte": CellLook((0.15, 0.20), "round", (0.78, 0.88), NUCLEUS, BLUE_CYTO, 1.2),
    "monocyte": CellLook(
        (0.25, 0.32), "kidney", (0.58, 0.70), PALE_NUCLEUS, GREY_BLUE_CYTO, 1.1, vacuoles=(2, 7)
    ),
    "neutrophil": CellLook(
        (0.21, 0.26), "segmented", (0.55, 0.68), NUCLEUS, PINK_CYTO, 0.9, LILAC_GRANULE, (80, 140), 0.5
    ),
    "platelet": CellLook((0.05, 0.08), "platelet", (1.0, 1.0), PLATELET, PLATELET, 0.0),
}


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased inside-mask of a signed distance field (negative inside), edge width in px."""
    return 1.0 / (1.0 + np.exp(np.clip(distance * (1.0 / edge), -30, 30)))


def _circle(u: np.ndarray, v: np.ndarray, cu: float, cv: float, r: float) -> np.ndarray:
    return np.hypot(u - cu, v - cv) - r


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (texture of chromatin, wobble of outlines)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
    return field / (field.std() + 1e-8)


def _window(centre_y: float, centre_x: float, radius: float, size: int) -> tuple[slice, slice]:
    """Rows and columns of the image that a disc of `radius` around the centre can touch."""
    y0, y1 = max(0, int(centre_y - radius)), min(size, int(centre_y + radius) + 2)
    x0, x1 = max(0, int(centre_x - radius)), min(size, int(centre_x + radius) + 2)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _nucleus_distance(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator):
    """Signed distance (px) of a nucleus of radius ~r in the cell's rotated frame (u, v)."""
    if kind in ("round", "dense_round"):
        return _circle(u, v, rng.normal(0, 0.08) * r, rng.normal(0, 0.08) * r, r)
    if kind == "kidney":  # a disc with a bite taken out: monocytes and immature granulocytes
        body = _circle(u, v, 0.0, 0.0, r)
        bite = _circle(u, v, r * rng.uniform(0.85, 1.15), 0.0, r * rng.uniform(0.45, 0.65))
        return np.maximum(body, -bite)
    if kind == "bilobed":  # two lobes joined by a thin bridge (eosinophil "spectacles")
        gap = r * rng.uniform(0.55, 0.75)
        lobe = r * rng.uniform(0.52, 0.62)
        lobes = np.minimum(_circle(u, v, -gap, 0.0, lobe), _circle(u, v, gap, 0.0, lobe))
        bridge = np.maximum(np.abs(v) - r * 0.12, np.abs(u) - gap)
        return np.minimum(lobes, bridge)
    if kind == "segmented":  # 3-5 lobes strung along a curved chromatin thread
        n_lobes = int(rng.integers(3, 6))
        angles = np.linspace(-2.2, 2.2, n_lobes) + rng.normal(0, 0.25, n_lobes)
        arc_r = r * rng.uniform(0.6, 0.8)
        lobe_r = r * rng.uniform(0.30, 0.38, n_lobes)
        centres = [(arc_r * np.cos(a), arc_r * np.sin(a)) for a in angles]
        d = np.min([_circle(u, v, cu, cv, lr) for (cu, cv), lr in zip(centres, lobe_r)], axis=0)
        thread = np.abs(np.hypot(u, v) - arc_r) - r * 0.07
        thread = np.maximum(thread, np.cos(np.arctan2(v, u) - angles.mean()) * -1 - 0.2)
        return np.minimum(d, thread)
    raise ValueError(f"unknown nucleus kind {kind!r}")


def _scatter(
    rng: np.random.Generator,
    shape,
    n: int,
    centre,
    radius: float,
    sigma: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Density map of `n` round dots of size `sigma` px scattered uniformly in a disc."""
    field = np.zeros(shape, dtype=np.float32)
    if n <= 0:
        return field
    rho = radius * np.sqrt(rng.uniform(0, 1, n))
    theta = rng.uniform(0, 2 * np.pi, n)
    ys = np.clip(np.rint(centre[0] + rho * np.sin(theta)).astype(int), 0, shape[0] - 1)
    xs = np.clip(np.rint(centre[1] + rho * np.cos(theta)).astype(int), 0, shape[1] - 1)
    np.add.at(field, (ys, xs), rng.uniform(0.6, 1.4, n).astype(np.float32))
    # Blur only the window the dots can reach (the cell), not the whole image.
    rows, cols = _window(centre[0], centre[1], radius + 4 * sigma + 1, shape[0])
    field[rows, cols] = ndimage.gaussian_filter(field[rows, cols], sigma, truncate=3.0) * (
        2 * np.pi * sigma**2
    )
    if mask is not None:
        field *= mask
    return np.minimum(field, 1.5)


def render_cell(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One `size` x `size` RGB uint8 image of a cell of `class_name`.

    Each structure is drawn as a 2-D density map inside the window it can reach (red cells, the
    white cell, platelets), and the maps are turned into RGB optical density in one product with
    their dye colours, which keeps a 128 px image at a few milliseconds.
    """
    look = LOOKS[class_name]
    px = size / 128.0  # features are designed at 128 px and scale with the image
    f32 = np.float32
    # Stain variation shared by every class: dye strength, hue balance, background tint.
    stain_gain = rng.uniform(0.75, 1.3)
    channel_tint = np.exp(rng.normal(0, 0.12, 3))
    background = BACKGROUND * rng.uniform(0.5, 1.6) * np.exp(rng.normal(0, 0.15, 3))
    rbc_map = np.zeros((size, size), f32)
    cyto_map = np.zeros((size, size), f32)
    nucleus_map = np.zeros((size, size), f32)
    granule_map = np.zeros((size, size), f32)

    cy, cx = (size - 1) / 2 + rng.normal(0, 0.04 * size, 2)
    theta = rng.uniform(0, 2 * np.pi)
    scale = rng.uniform(0.9, 1.1)
    cell_r = rng.uniform(*look.cell_radius) * size * scale

    # Red blood cells: discs with a pale centre, placed around (and partly under) the white cell.
    for _ in range(int(rng.integers(4, 13))):
        rr = size * rng.uniform(0.09, 0.12)
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(cell_r + 0.6 * rr, 0.8 * size)
        ry, rx = cy + dist * np.sin(ang), cx + dist * np.cos(ang)
        rows, cols = _window(ry, rx, rr + 6 * px, size)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue  # entirely outside the field of view
        yy, xx = np.ogrid[rows, cols]
        d2 = (xx.astype(f32) - f32(rx)) ** 2 + (yy.astype(f32) - f32(ry)) ** 2
        disc = _soft(np.sqrt(d2) - f32(rr), 0.8 * px)
        pale_centre = 1.0 - 0.7 * np.exp(d2 * f32(-1.0 / (2 * (0.42 * rr) ** 2)))
        rbc_map[rows, cols] += disc * pale_centre * f32(rng.uniform(0.7, 1.1))

    wobble = _smooth_noise(rng, (size, size), 4 * px) * f32(0.6 * px)
    maps = [rbc_map, cyto_map, nucleus_map, granule_map]
    dyes = [RBC, look.cytoplasm_od * look.cytoplasm_density, look.nucleus_od, look.granule_od]
    if look.nucleus == "platelet":
        for _ in range(int(rng.integers(1, 5))):
            pr = cell_r * rng.uniform(0.6, 1.2)
            off = rng.normal(0, 0.07 * size, 2)
            py, pxx = cy + off[0], cx + off[1]
            rows, cols = _window(py, pxx, pr + 6 * px, size)
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            yy, xx = np.ogrid[rows, cols]
            d = _circle(xx.astype(f32), yy.astype(f32), pxx, py, pr) + 1.5 * wobble[rows, cols]
            body = _soft(d, 0.7 * px)
            granular = _scatter(rng, (size, size), int(rng.integers(6, 14)), (py, pxx), pr, 0.7 * px)
            nucleus_map[rows, cols] += body * 0.35 + body * granular[rows, cols] * 0.9
        dyes[2] = PLATELET
    else:
        # Everything of the white cell happens inside its window (wobble and off-centre margins included).
        rows, cols = _window(cy, cx, 1.15 * cell_r + 6 * px, size)
        yy, xx = np.ogrid[rows, cols]
        du, dv = xx.astype(f32) - f32(cx), yy.astype(f32) - f32(cy)
        c, s_ = f32(np.cos(theta)), f32(np.sin(theta))
        u, v = c * du + s_ * dv, -s_ * du + c * dv
        w = wobble[rows, cols]
        cell = _soft(np.hypot(u * f32(1 / rng.uniform(0.9, 1.1)), v) - f32(cell_r) + 2 * w, 0.8 * px)
        cyto = cell * f32(rng.uniform(0.8, 1.2))
        nucleus_r = cell_r * rng.uniform(*look.nucleus_fraction)
        shift = cell_r - nucleus_r  # nuclei sit off-centre when there is room
        nu = u - f32(rng.uniform(-0.5, 0.5) * shift)
        nv = v - f32(rng.uniform(-0.3, 0.3) * shift)
        nucleus = _soft(_nucleus_distance(look.nucleus, nu, nv, nucleus_r, rng) + 2.5 * w, 0.7 * px)
        nucleus *= cell
        chromatin_contrast = 0.15 if look.nucleus == "dense_round" else 0.35
        chromatin = np.maximum(
            1.0 + f32(chromatin_contrast) * _smooth_noise(rng, nucleus.shape, 1.2 * px), 0.3
        )
        nucleus_strength = 1.6 if look.nucleus == "dense_round" else 1.15
        nucleus_map[rows, cols] = nucleus * chromatin * f32(nucleus_strength)
        if look.granule_od is not None:
            n = int(rng.integers(*look.granules))
            granules = _scatter(rng, (size, size), n, (cy, cx), cell_r * 0.95, look.granule_sigma * px)
            granule_map[rows, cols] = granules[rows, cols] * cell * f32(1.2)
        if look.vacuoles[1] > 0:
            holes = _scatter(
                rng, (size, size), int(rng.integers(*look.vacuoles)), (cy, cx), cell_r * 0.85, 1.6 * px
            )
            cyto -= np.minimum(holes[rows, cols] * cell * (1 - nucleus), 0.8)
        cyto_map[rows, cols] = cyto
    if dyes[3] is None:  # no granules in this class
        maps.pop(3), dyes.pop(3)

    # (H, W, K) maps times (K, 3) dye densities: optical density of every pixel and channel.
    dye_matrix = np.stack(dyes).astype(f32)
    density = np.stack(maps, axis=-1) @ dye_matrix + background.astype(f32)
    density = np.maximum(density, 0) * f32(stain_gain) * channel_tint.astype(f32)
    sigma = rng.uniform(0.0, 1.0) * px  # focus varies from sharp to slightly soft
    if sigma > 0.2:
        density = ndimage.gaussian_filter(density, (sigma, sigma, 0), truncate=3.0)
    image = f32(255.0 * rng.uniform(0.92, 1.04)) * np.exp(-density)
    image += rng.standard_normal(image.shape, dtype=f32) * f32(2.5)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def image_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """The generator of one file: depends only on (seed, class, index), not on the set's size."""
    return np.random.default_rng([int(seed), zlib.crc32(class_name.encode()), int(index)])


def generate_synthetic_cells(
    out_dir: str | os.PathLike,
    per_class: int,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = PBC_CLASSES,
    progress: bool = True,
) -> Path:
    """Write `per_class` JPEGs of each class to `out_dir/<class>/<class>_<i:05d>.jpg`.

    Deterministic: the same arguments give byte-identical files. Returns `out_dir`.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    unknown = [c for c in classes if c not in LOOKS]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {', '.join(LOOKS)}")
    out = Path(out_dir)
    jobs = [(c, i) for c in classes for i in range(per_class)]
    for class_name in classes:
        (out / class_name).mkdir(parents=True, exist_ok=True)
    for class_name, i in tqdm(jobs, desc="synthetic cells", unit="img", disable=not progress):
        pixels = render_cell(class_name, size, image_rng(seed, class_name, i))
        path = out / class_name / f"{class_name}_{i:05d}.jpg"
        with atomic_path(path) as tmp:  # an interrupted run never leaves a half-written JPEG
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=90)
    # Files are only ever (re)written, never deleted: images left by an earlier, larger run or put
    # there by hand would silently unbalance the set, so say so.
    extra = len(find_images(out)) - len(jobs)
    if extra > 0:
        logger.warning(
            "%s holds %d image(s) besides the %d just generated; a dataset over it includes them "
            "(generate into an empty folder for exactly %d per class)",
            out,
            extra,
            len(jobs),
            per_class,
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dinov2-synth", description="Write a PBC-shaped folder of synthetic stained blood cells."
    )
    parser.add_argument("--out", required=True, help="output folder (class sub-folders are created)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--classes", nargs="+", default=list(PBC_CLASSES), help="subset of the 8 classes")
    args = parser.parse_args(argv)
    try:
        out = generate_synthetic_cells(args.out, args.per_class, args.size, args.seed, args.classes)
    except (ValueError, OSError) as exc:
        print(f"dinov2-synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.per_class * len(args.classes)} images ({args.per_class} per class) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
