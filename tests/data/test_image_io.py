"""dinov2.data.image_io: broken files raise the right problem, odd-but-valid files give the right pixels.

Every expected pixel value is computed by hand in the test (formula written out), never read back
from PIL's own conversion of the same image.
"""

import numpy as np
import pytest
from PIL import Image

from dinov2.data.image_io import PROBLEMS, ImageDecodeError, decode_rgb, load_rgb


def pixels(path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def over_white(value: int, alpha: int) -> float:
    """Alpha compositing of one 8-bit channel over a white background: c*a + 255*(1-a)."""
    return value * alpha / 255 + 255 * (1 - alpha / 255)


@pytest.fixture
def valid_rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------ broken files


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.problem == "zero_bytes"
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_jpeg_cut_in_half_is_truncated(tmp_path, valid_rgb):
    full = tmp_path / "full.jpg"
    Image.fromarray(valid_rgb).save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    load_rgb(full)  # the uncut file is fine
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(cut)
    assert info.value.problem == "truncated"
    assert info.value.path == str(cut)


def test_png_cut_in_half_is_truncated(tmp_path, valid_rgb):
    full = tmp_path / "full.png"
    Image.fromarray(valid_rgb).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    np.testing.assert_array_equal(pixels(full), valid_rgb)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(cut)
    assert info.value.problem == "truncated"


def test_text_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("patient 17, smear 3: re-stain tomorrow\n")
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.problem == "not_an_image"


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(tmp_path / "gone.png")
    assert info.value.problem == "unreadable"


def test_more_pixels_than_allowed_is_too_large(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    assert decode_rgb(path, max_pixels=1200).size == (40, 30)  # exactly at the limit is fine
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(path, max_pixels=1199)
    assert info.value.problem == "too_large"
    assert "40x30" in info.value.detail


def test_unknown_problem_name_is_rejected():
    with pytest.raises(ValueError, match="unknown problem"):
        ImageDecodeError("x.png", "smudged")
    assert len(set(PROBLEMS)) == len(PROBLEMS)


# ------------------------------------------------------------------------------ odd-but-valid files


def test_rgb_png_is_unchanged(tmp_path, valid_rgb):
    path = tmp_path / "rgb.png"
    Image.fromarray(valid_rgb).save(path)
    np.testing.assert_array_equal(pixels(path), valid_rgb)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    expected = np.stack([gray, gray, gray], axis=-1)  # v -> (v, v, v)
    np.testing.assert_array_equal(pixels(path), expected)


def test_palette_maps_indices_to_palette_colours(tmp_path):
    palette = [(10, 20, 30), (200, 100, 50), (0, 255, 0)]
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([c for colour in palette for c in colour])
    path = tmp_path / "palette.png"
    image.save(path)
    expected = np.array([[palette[i] for i in row] for row in indices])
    np.testing.assert_array_equal(pixels(path), expected)


def test_palette_transparent_index_becomes_white(tmp_path):
    palette = [(10, 20, 30), (200, 100, 50)]
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([c for colour in palette for c in colour])
    path = tmp_path / "palette_t.png"
    image.save(path, transparency=1)  # index 1 fully transparent
    expected = np.array([[palette[0], (255, 255, 255)], [(255, 255, 255), palette[0]]])
    np.testing.assert_array_equal(pixels(path), expected)


def test_palette_partial_alpha_is_blended_over_white(tmp_path):
    palette = [(10, 20, 30), (200, 100, 50)]
    indices = np.array([[0, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([c for colour in palette for c in colour])
    path = tmp_path / "palette_a.png"
    image.save(path, transparency=bytes([255, 100]))  # per-index alpha: opaque, 100/255
    got = pixels(path)
    np.testing.assert_array_equal(got[0, 0], palette[0])
    expected = [over_white(c, 100) for c in palette[1]]
    np.testing.assert_allclose(got[0, 1], expected, atol=1)


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 64]]], np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    expected = np.array([[[over_white(int(c), int(px[3])) for c in px[:3]] for px in rgba[0]]])
    got = pixels(path)
    np.testing.assert_array_equal(got[0, 0], [200, 100, 50])  # opaque: the colour itself
    np.testing.assert_array_equal(got[0, 1], [255, 255, 255])  # transparent: the white background
    np.testing.assert_allclose(got, expected, atol=1)  # 128/255 of 200 + 127/255 of 255 = 227.4, ...


def test_gray_with_alpha_is_composited_over_white(tmp_path):
    la = np.array([[[40, 255], [40, 0], [40, 51]]], np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    got = pixels(path)
    for x, (gray, alpha) in enumerate(la[0]):
        np.testing.assert_allclose(got[0, x], [over_white(int(gray), int(alpha))] * 3, atol=1)
    np.testing.assert_array_equal(got[0, 0], [40, 40, 40])
    np.testing.assert_array_equal(got[0, 1], [255, 255, 255])


def test_cmyk(tmp_path):
    # Subtractive ink: each ink removes its complement and black scales everything, so
    # r = (255 - c)(255 - k)/255 (and likewise g with m, b with y). Pure cyan C=255 -> (0, 255, 255).
    inks = [(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0), (100, 20, 0, 50)]
    image = Image.new("CMYK", (len(inks), 1))
    for x, ink in enumerate(inks):
        image.putpixel((x, 0), ink)
    path = tmp_path / "cmyk.tif"
    image.save(path)
    got = pixels(path)[0]
    np.testing.assert_array_equal(got[0], [0, 255, 255])
    np.testing.assert_array_equal(got[1], [0, 0, 0])
    np.testing.assert_array_equal(got[2], [255, 255, 255])
    c, m, y, k = inks[3]
    expected = [(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255]
    np.testing.assert_allclose(got[3], expected, atol=1)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_grayscale(tmp_path, suffix):
    k = np.array([[0, 1, 2, 100], [128, 200, 254, 255]])
    values = (257 * k).astype(np.uint16)  # 257 * k is k in 8 bits (65535 = 257 * 255)
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")  # really stored as 16 bits
    got = pixels(path)
    np.testing.assert_array_equal(got, np.stack([k, k, k], axis=-1))
    assert got[1, 3, 0] == 255  # 65535 -> 255


def test_dim_sixteen_bit_image_is_not_read_as_eight_bit(tmp_path):
    # A dark 16-bit frame whose values all fit in 8 bits is still on the 0..65535 scale.
    values = np.array([[0, 128, 129, 200, 255]], dtype=np.uint16)
    path = tmp_path / "dim16.png"
    Image.fromarray(values).save(path)
    expected = np.rint(values / 257).astype(int)  # 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1
    np.testing.assert_array_equal(expected, [[0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(pixels(path)[..., 0], expected)


def test_one_bit_image(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    expected = np.stack([bits * 255] * 3, axis=-1)  # 0 -> black, 1 -> white
    np.testing.assert_array_equal(pixels(path), expected)


@pytest.mark.parametrize(
    "orientation, where",
    [
        # Orientation 6: stored rows are the displayed right side, so the image turns 90 degrees
        # clockwise: (x, y) -> (H - 1 - y, x).
        (6, lambda x, y, w, h: (h - 1 - y, x)),
        # Orientation 8: stored rows are the displayed left side: 90 degrees counter-clockwise,
        # (x, y) -> (y, W - 1 - x).
        (8, lambda x, y, w, h: (y, w - 1 - x)),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, where):
    w, h, mark = 5, 3, (1, 0)
    stored = np.zeros((h, w, 3), np.uint8)
    stored[mark[1], mark[0]] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    path = tmp_path / f"rotated{orientation}.png"
    image.save(path, exif=exif.tobytes())
    got = pixels(path)
    assert got.shape == (w, h, 3)  # width and height swapped
    x, y = where(*mark, w, h)
    np.testing.assert_array_equal(got[y, x], [255, 0, 0])
    assert got[..., 0].sum() == 255  # the mark is the only red pixel


def test_float_image_in_unit_range_is_scaled_to_255(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    expected = np.rint(values * 255).astype(int)  # 0.5 -> 127.5 -> 128 (round half to even: 128)
    np.testing.assert_array_equal(expected, [[0, 128, 255, 64]])
    np.testing.assert_array_equal(pixels(path)[..., 0], expected)


def test_32_bit_integer_image_holding_16_bit_values(tmp_path):
    values = np.array([[0, 257, 65535, 1000]], dtype=np.int32)
    path = tmp_path / "int32.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(pixels(path)[..., 1], [[0, 1, 255, 4]])  # v / 257 rounded: 3.89 -> 4


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0.0, 1000.0]], dtype=np.float32),  # float beyond [0, 255]: scale unknown
        np.array([[-1.0, 0.5]], dtype=np.float32),
        np.array([[0, 70_000]], dtype=np.int32),  # 32-bit integers beyond 16 bits
    ],
)
def test_values_without_a_known_scale_are_unreadable_mode(tmp_path, array):
    path = tmp_path / "odd.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.problem == "unreadable_mode"
    assert str(path) in str(info.value)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb_header_is_too_large_without_decoding(tmp_path):
    # A 69-byte PNG whose header claims 20000 x 20000 pixels (400 MP, over PIL's 2 x 89.5 MP bomb
    # threshold): it must be refused from the header, before any pixel buffer is allocated.
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.problem == "too_large"
    # Between PIL's warning and error thresholds (100 MP here) the warning is a problem too.
    path2 = tmp_path / "bomb2.png"
    path2.write_bytes(
        data.replace(
            _png_chunk(b"IHDR", header),
            _png_chunk(
                b"IHDR",
                header.replace(struct.pack(">II", 20_000, 20_000), struct.pack(">II", 10_000, 10_000)),
            ),
        )
    )
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path2)
    assert info.value.problem == "too_large"
