"""Files the web-app tests upload: good cells, broken files and a decompression bomb."""

import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def decompression_bomb_png(side: int = 10_000) -> bytes:
    """A valid 8-bit grayscale PNG of ``side`` x ``side`` black pixels: ~100 KB on disk for the
    default 100 megapixels (over Pillow's 89.5 MP limit), 100 MB once decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte 0, then the pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def truncated(data: bytes, keep: int = 60) -> bytes:
    """The first ``keep`` bytes of an image file: a header without its pixel data."""
    return data[:keep]
