"""Hostile and odd image files for tests/test_robustness.py, made from nothing, and decoders that crash.

Every writer takes the path to create and returns it. The crashing decoders are module-level functions, so
``ImageLoader`` can send them to spawned worker processes (which import this module through ``sys.path``).
"""

from __future__ import annotations

import functools
import io
import os
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fpnx.sources import ImageSource, heif_available
from fpnx.loader import LoadedImage, LoadOptions, load_image


def photo(path: Path, height: int = 48, width: int = 64, seed: int = 0, orientation: int = 1) -> Path:
    """A random RGB picture; the suffix picks the format (lossless PNG unless it says .jpg, .avif, .jp2 or .heic),
    with an EXIF orientation when given (JPEG 2000 keeps none)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    options: dict[str, object] = {"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg", ".avif", ".heic") else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    assert _format_of(path) != "HEIF" or heif_available(), "pillow-heif is needed: pip install -e '.[test]'"
    Image.fromarray(pixels).save(path, format=_format_of(path), **options)
    return path


def _format_of(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".tif": "TIFF", ".avif": "AVIF",
            ".jp2": "JPEG2000", ".heic": "HEIF"}[path.suffix.lower()]


def zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_file(path: Path) -> Path:
    """Not an image at all, whatever its extension says."""
    path.write_text("name,size\ncat.jpg,12\n" * 20)
    return path


def icon_file(path: Path) -> Path:
    """A real image in a format Pillow reads but fpnx does not allow (Windows ICO), under an image extension."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="ICO")
    path.write_bytes(buffer.getvalue())
    return path


def truncated(path: Path, seed: int = 1) -> Path:
    """An image (format by suffix, as for :func:`photo`) cut after two thirds of its bytes."""
    whole = photo(path, 96, 128, seed).read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A decompression bomb's header: a grey PNG claiming width x height, with one row of data (a few bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj()
    data = compressor.compress(b"\x00" + b"\x80" * width) + compressor.flush(zlib.Z_SYNC_FLUSH)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    )
    return path


def one_colour_png(path: Path, height: int, width: int) -> Path:
    """Many pixels in a small file (a flat colour compresses to almost nothing): a real image, not a bomb."""
    Image.new("RGB", (width, height), (30, 120, 200)).save(path, format="PNG")
    return path


def tiff(path: Path, *, compression: int = 1, bits: int = 8, samples: int = 3, photometric: int = 2,
         ifd_offset: int | None = None) -> Path:
    """A 4x4 one-strip little-endian TIFF with the given tags (defaults: uncompressed 8-bit RGB, which decodes).

    ``ifd_offset`` points the first image directory elsewhere (past the end: a damaged file).
    """
    width = height = 4
    data = bytes(range(width * height * samples))

    def short(value: int) -> bytes:
        return struct.pack("<HH", value, 0)

    def long(value: int) -> bytes:
        return struct.pack("<I", value)

    entries = [
        (256, 4, 1, long(width)), (257, 4, 1, long(height)), (258, 3, 1, short(bits)), (259, 3, 1, short(compression)),
        (262, 3, 1, short(photometric)), (273, 4, 1, long(8)), (277, 3, 1, short(samples)), (278, 4, 1, long(height)),
        (279, 4, 1, long(len(data))),
    ]  # fmt: skip
    directory = struct.pack("<H", len(entries))
    directory += b"".join(struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    offset = 8 + len(data) if ifd_offset is None else ifd_offset
    path.write_bytes(b"II*\x00" + long(offset) + data + directory + long(0))
    return path


def animated_gif(path: Path, frames: list[np.ndarray]) -> Path:
    """An animated GIF of palette frames ((H, W) uint8 indices into a fixed 4-colour palette)."""
    images = [palette_image(frame) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 20, 40, 250]


def palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
    return image


# -- decoders for ImageLoader(load=...) ---------------------------------------------------------------------------


def load_or_get_killed(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """load_image, except that a file named ``*crash*`` kills its worker process the way the OOM killer does."""
    if "crash" in os.path.basename(image.path):
        os.kill(os.getpid(), signal.SIGKILL)
    return load_image(image, options)


def load_or_exit(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """load_image, except that a file named ``*crash*`` ends its process at once (a decoder calling abort())."""
    if "crash" in os.path.basename(image.path):
        os._exit(134)
    return load_image(image, options)


def load_or_hang(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """load_image, except that a file named ``*hang*`` never comes back (a decoder stuck in a loop)."""
    if "hang" in os.path.basename(image.path):
        while True:
            time.sleep(1)
    return load_image(image, options)


def load_unless_torch_is_imported(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """load_image, except that the image fails where this process has imported torch."""
    if "torch" in sys.modules:
        return LoadedImage(image, error="torch is imported in this worker")
    return load_image(image, options)


class _MarksTeardown:
    """Creates ``path`` when collected: at the latest, when the interpreter tears its modules down."""

    def __init__(self, path: str) -> None:
        # kept here: late in a teardown, module globals (os among them) may already be gone
        self._create = functools.partial(os.open, path, os.O_CREAT | os.O_WRONLY, 0o644)

    def __del__(self) -> None:
        self._create()


_KEPT: list[_MarksTeardown] = []


def load_and_keep_a_teardown_marker(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """load_image, leaving in this process an object that writes ``teardown-ran`` beside the image if the
    interpreter's teardown collects it."""
    _KEPT.append(_MarksTeardown(os.path.join(os.path.dirname(image.path), "teardown-ran")))
    return load_image(image, options)


def start_slowly_unless_first(marker: str) -> None:
    """A worker initializer: the first worker to create ``marker`` starts at once, any other 1.5 s later (a worker
    still importing torch on a busy machine)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(1.5)
