"""Decode one image file fully into an 8-bit RGB PIL image, or say precisely why it cannot be.

Microscopy folders hold more than plain RGB JPEGs: grayscale and 16-bit TIFFs, palette PNGs,
RGBA exports, CMYK scans, photos with EXIF rotation. Those are valid and are converted here.
Files that are empty, cut short, not images at all or absurdly large are *problems*: they raise
`ImageDecodeError` whose `problem` is one of `PROBLEMS`, so the scanner can group them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PROBLEMS = ("zero_bytes", "truncated", "not_an_image", "unreadable_mode", "too_large", "unreadable")
# Far above any cell image; guards against decompression bombs. PIL's own threshold
# (Image.MAX_IMAGE_PIXELS, 89.5 MP unless a program changes it) also yields "too_large", so the
# effective limit is the lower of the two: `max_pixels` can only tighten PIL's.
DEFAULT_MAX_PIXELS = 20_000 * 20_000
WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An image file that cannot be used; `problem` is one of `PROBLEMS`."""

    def __init__(self, path: str | os.PathLike, problem: str, detail: str = ""):
        if problem not in PROBLEMS:
            raise ValueError(f"unknown problem {problem!r}; expected one of {PROBLEMS}")
        self.path = str(path)
        self.problem = problem
        self.detail = detail
        super().__init__(f"{self.path}: {problem}" + (f" ({detail})" if detail else ""))


def _sixteen_bit_to_uint8(array: np.ndarray, known_16_bit: bool, path: str | os.PathLike) -> np.ndarray:
    """Map a 16-bit (or 32-bit integer) array to 0..255: 65535 -> 255, 257 -> 1, 128 -> 0.

    `known_16_bit` is set for the 'I;16*' modes: their range is 0..65535 however dark the image,
    so a dim 16-bit frame (all values <= 255) must not be read as 8-bit values. Mode 'I' (32-bit)
    says nothing about its range: values within 0..255 are taken as 8-bit, within 0..65535 as
    16-bit, and anything else is refused ("unreadable_mode") rather than silently clipped.
    """
    array = array.astype(np.float64)
    low, high = array.min(initial=0), array.max(initial=0)
    if not known_16_bit:
        if low < 0 or high > 65535:
            raise ImageDecodeError(
                path,
                "unreadable_mode",
                f"32-bit integer image with values in [{low:g}, {high:g}]: scale unknown",
            )
        if high <= 255:  # 32-bit 'I' images that only hold 8-bit values
            return np.rint(array).astype(np.uint8)
    return np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite an image with transparency over white (stained slides have a white background)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """Convert a decoded PIL image of any common mode to 8-bit RGB, honouring EXIF orientation."""
    try:
        image = ImageOps.exif_transpose(image)
    except (ValueError, OSError, SyntaxError, KeyError, TypeError):
        pass  # a damaged EXIF block does not make the pixels unusable; keep them as stored
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode == "P":
        if "transparency" in image.info:
            return _flatten_alpha(image)
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(image)
    if mode.startswith("I;16") or mode == "I":
        gray = _sixteen_bit_to_uint8(np.asarray(image), mode.startswith("I;16"), path)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        # Float images carry no scale either: [0, 1] (the usual convention) or [0, 255] are
        # unambiguous; anything else (negative, NaN, HDR values) is refused, never clipped.
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(initial=0), array.max(initial=0)
        if not np.isfinite(array).all() or low < 0 or high > 255:
            raise ImageDecodeError(
                path,
                "unreadable_mode",
                f"float image with values in [{low:g}, {high:g}]: expected [0, 1] or [0, 255]",
            )
        if high <= 1.0:
            array = array * 255.0
        return Image.fromarray(np.rint(array).astype(np.uint8), mode="L").convert("RGB")
    raise ImageDecodeError(path, "unreadable_mode", f"PIL mode {mode!r} has no RGB conversion")


def decode_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode `path` (every byte, not only the header) into an RGB image.

    Raises:
        ImageDecodeError: with `problem` in `PROBLEMS`.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "zero_bytes", "file is empty")
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "unreadable", "file not found") from exc
    except PermissionError as exc:
        raise ImageDecodeError(path, "unreadable", "permission denied") from exc
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want a clear problem.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                n_pixels = image.width * image.height
                if n_pixels > max_pixels:
                    raise ImageDecodeError(
                        path, "too_large", f"{image.width}x{image.height} exceeds {max_pixels} pixels"
                    )
                image.load()
                decoded = image
                # Converting is a separate step: its failures are about the mode, not the bytes.
                try:
                    return to_rgb(decoded, path)
                except ImageDecodeError:
                    raise
                except (ValueError, OSError) as exc:
                    raise ImageDecodeError(
                        path, "unreadable_mode", f"mode {decoded.mode!r}: {type(exc).__name__}: {exc}"
                    ) from exc
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, "too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "not_an_image", "not a recognised image format") from exc
    except PermissionError as exc:
        raise ImageDecodeError(path, "unreadable", "permission denied") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports cut-off JPEG/PNG/TIFF data as OSError ("truncated", "broken data stream")
        # or SyntaxError (bad PNG chunk); either way the pixel data is incomplete.
        raise ImageDecodeError(path, "truncated", f"{type(exc).__name__}: {exc}") from exc


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB (see `decode_rgb`); the function every loader uses."""
    return decode_rgb(path)
