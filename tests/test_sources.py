"""fpnx.sources: discovering image files and decoding them by fixed rules."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import struct
import sys
import tarfile
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fpnx.errors import ImageError, UsageError, display_path
from fpnx.sources import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DecodedImage,
    ImageSource,
    decode_image,
    decode_source,
    discover,
    heif_available,
)
from fpnx.sources import decoding
from fpnx.sources.decoding import _rgb_array

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX file names, links or pipes")


# ---------------------------------------------------------------------------------------------------------
# helpers: files Pillow cannot write (16-bit colour, broken or gigantic headers) are built by hand


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, extra: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + extra
        + _png_chunk(b"IEND", b"")
    )  # fmt: skip


def write_png16(path: Path, samples: np.ndarray, color_type: int) -> str:
    """A 16-bit PNG of (H, W, C) samples (C=3: RGB, type 2; C=4: RGBA, type 6), filter 0 on every row."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    path.write_bytes(_png(width, height, 16, color_type, zlib.compress(rows)))
    return str(path)


def write_unfinished_png(path: Path, width: int, height: int) -> str:
    """A grey PNG whose header claims width x height but whose data stops after one row."""
    compressor = zlib.compressobj()
    data = compressor.compress(b"\x00" + b"\x80" * width) + compressor.flush(zlib.Z_SYNC_FLUSH)
    path.write_bytes(_png(width, height, 8, 0, data))
    return str(path)


def write_tiff16(path: Path, samples: np.ndarray, byteorder: str, deflate: bool) -> str:
    """A one-strip 16-bit RGB(A) TIFF; deflate makes Pillow go through libtiff, raw through its own decoder."""
    height, width, channels = samples.shape
    data = samples.astype(byteorder + "u2").tobytes()
    if deflate:
        data = zlib.compress(data)
    bits = struct.pack(byteorder + "H" * channels, *[16] * channels)
    bits_offset = 8 + len(data)
    ifd_offset = bits_offset + len(bits)

    def short(value: int) -> bytes:
        return struct.pack(byteorder + "HH", value, 0)

    def long(value: int) -> bytes:
        return struct.pack(byteorder + "I", value)

    entries = [
        (256, 4, 1, long(width)), (257, 4, 1, long(height)), (258, 3, channels, long(bits_offset)),
        (259, 3, 1, short(8 if deflate else 1)), (262, 3, 1, short(2)), (273, 4, 1, long(8)),
        (277, 3, 1, short(channels)), (278, 4, 1, long(height)), (279, 4, 1, long(len(data))),
        (284, 3, 1, short(1)),
    ]  # fmt: skip
    if channels == 4:
        entries.append((338, 3, 1, short(2)))  # the fourth sample is unassociated alpha
    ifd = struct.pack(byteorder + "H", len(entries))
    ifd += b"".join(struct.pack(byteorder + "HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    magic = b"II*\x00" if byteorder == "<" else b"MM\x00*"
    path.write_bytes(magic + long(ifd_offset) + data + bits + ifd + long(0))
    return str(path)


def save(image: Image.Image, path: Path, **options: object) -> str:
    image.save(path, **options)
    return str(path)


def from_rows(mode: str, rows: list[list[object]]) -> Image.Image:
    image = Image.new(mode, (len(rows[0]), len(rows)))
    image.putdata([value for row in rows for value in row])
    return image


def rounded_16_to_8(values: np.ndarray) -> np.ndarray:
    """The documented rule, computed independently in float64."""
    return np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def decode_quietly(path: str, **options: object) -> DecodedImage:
    """decode_image, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return decode_image(path, **options)


# ---------------------------------------------------------------------------------------------------------
# decoding: formats and modes


def test_rgb_png_is_exact_and_the_result_well_formed(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    decoded = decode_quietly(save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert np.array_equal(decoded.rgb, pixels)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.flags.c_contiguous and decoded.rgb.flags.writeable
    assert (decoded.height, decoded.width, decoded.mode, decoded.format) == (64, 80, "RGB", "PNG")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("a.webp", {"lossless": True}),
        ("a.bmp", {}),
        ("a.ppm", {}),
        ("a.tif", {}),
        ("a.tiff", {"compression": "tiff_lzw"}),
    ],
)
def test_lossless_formats_are_exact(tmp_path: Path, name: str, options: dict[str, object]) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 72, 3), dtype=np.uint8)
    decoded = decode_quietly(save(Image.fromarray(pixels), tmp_path / name, **options))
    assert np.array_equal(decoded.rgb, pixels)


def test_jpeg_decodes_like_pillow(tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    path = save(Image.fromarray(pixels), tmp_path / "a.JPG", quality=90)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    decoded = decode_quietly(path)
    assert np.array_equal(decoded.rgb, expected)
    assert decoded.format == "JPEG"


def test_content_decides_the_format_not_the_extension(tmp_path: Path) -> None:
    pixels = np.full((64, 64, 3), (1, 2, 3), dtype=np.uint8)
    decoded = decode_quietly(save(Image.fromarray(pixels), tmp_path / "really_a_png.jpg", format="PNG"))
    assert decoded.format == "PNG" and np.array_equal(decoded.rgb, pixels)


def test_grey_is_copied_to_three_channels(tmp_path: Path) -> None:
    decoded = decode_quietly(save(from_rows("L", [[0, 7, 128, 255]]), tmp_path / "l.png"))
    assert decoded.mode == "L"
    assert decoded.rgb.tolist() == [[[0, 0, 0], [7, 7, 7], [128, 128, 128], [255, 255, 255]]]


def test_bilevel_becomes_black_and_white(tmp_path: Path) -> None:
    decoded = decode_quietly(save(from_rows("1", [[0, 255], [255, 0]]), tmp_path / "b.png"))
    assert decoded.mode == "1"
    assert decoded.rgb[:, :, 0].tolist() == [[0, 255], [255, 0]]
    assert np.array_equal(decoded.rgb[:, :, 0], decoded.rgb[:, :, 2])


def test_palette_image_uses_palette_colours(tmp_path: Path) -> None:
    image = from_rows("P", [[0, 1, 2]])
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    decoded = decode_quietly(save(image, tmp_path / "p.png"))
    assert decoded.mode == "P"
    assert decoded.rgb.tolist() == [[[10, 20, 30], [200, 100, 50], [0, 255, 0]]]


def test_palette_transparency_is_dropped_without_warning(tmp_path: Path) -> None:
    image = from_rows("P", [[0, 1, 2]])
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    path = save(image, tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    with Image.open(path) as reopened:
        assert isinstance(reopened.info["transparency"], bytes)  # the case where convert() would warn
    decoded = decode_quietly(path)
    assert decoded.rgb.tolist() == [[[10, 20, 30], [200, 100, 50], [0, 255, 0]]]


def test_gif_palette_with_transparent_index(tmp_path: Path) -> None:
    image = from_rows("P", [[0, 1], [1, 0]])
    image.putpalette([255, 0, 0, 0, 0, 255])
    decoded = decode_quietly(save(image, tmp_path / "t.gif", transparency=0))
    assert decoded.rgb[0, 0].tolist() == [255, 0, 0] and decoded.rgb[0, 1].tolist() == [0, 0, 255]


def test_alpha_is_dropped_without_blending(tmp_path: Path) -> None:
    rgba = from_rows("RGBA", [[(10, 20, 30, 0), (200, 100, 50, 128), (1, 2, 3, 255)]])
    decoded = decode_quietly(save(rgba, tmp_path / "rgba.png"))
    assert decoded.mode == "RGBA"
    assert decoded.rgb.tolist() == [[[10, 20, 30], [200, 100, 50], [1, 2, 3]]]

    grey_alpha = from_rows("LA", [[(77, 0), (200, 255)]])
    decoded = decode_quietly(save(grey_alpha, tmp_path / "la.png"))
    assert decoded.mode == "LA"
    assert decoded.rgb.tolist() == [[[77, 77, 77], [200, 200, 200]]]

    palette_alpha = from_rows("PA", [[(1, 0), (2, 255)]])
    palette_alpha.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50])
    decoded = decode_quietly(save(palette_alpha, tmp_path / "pa.tif"))
    assert decoded.mode == "PA"
    assert decoded.rgb.tolist() == [[[10, 20, 30], [200, 100, 50]]]


def test_cmyk_and_ycbcr_use_pillow_conversion(tmp_path: Path) -> None:
    cmyk = from_rows("CMYK", [[(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]])
    decoded = decode_quietly(save(cmyk, tmp_path / "cmyk.tif"))
    assert decoded.mode == "CMYK"
    assert decoded.rgb.tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]]]

    ycbcr = from_rows("YCbCr", [[(0, 128, 128), (100, 128, 128), (255, 128, 128)]])
    decoded = decode_quietly(save(ycbcr, tmp_path / "ycc.tif"))
    assert decoded.mode == "YCbCr"
    assert decoded.rgb.tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_lab_uses_pillow_conversion(tmp_path: Path) -> None:
    lab = from_rows("LAB", [[(0, 128, 128), (255, 128, 128), (128, 200, 60)]])
    decoded = decode_quietly(save(lab, tmp_path / "lab.tif"))
    assert decoded.mode == "LAB"
    assert np.array_equal(decoded.rgb, np.asarray(lab.convert("RGB")))
    assert decoded.rgb[0, 0].max() <= 2 and decoded.rgb[0, 1].min() >= 253  # black and white


def test_modes_no_allowed_file_stores_follow_the_same_rules() -> None:
    # HSV, premultiplied RGBa and I;16L only exist in memory; the rules still hold for them.
    hsv = from_rows("HSV", [[(0, 255, 255), (85, 255, 128)]])
    assert _rgb_array(hsv).tolist() == [[[255, 0, 0], [0, 128, 0]]]
    premultiplied = from_rows("RGBa", [[(100, 50, 20, 128)]])
    assert np.array_equal(_rgb_array(premultiplied), np.asarray(premultiplied.convert("RGB")))
    little_endian = Image.frombytes("I;16L", (2, 1), struct.pack("<HH", 255, 65535))
    assert _rgb_array(little_endian).tolist() == [[[1, 1, 1], [255, 255, 255]]]
    with pytest.raises(ImageError, match="unsupported image mode La"):
        _rgb_array(Image.new("La", (1, 1)))


SIXTEEN_BIT = [0, 1, 128, 129, 255, 256, 257, 32767, 32768, 65534, 65535]
# round(v * 255 / 65535) by hand; note 255 -> 1 (a shift would give 0) and 65535 -> 255 (no clipping at 255)
SIXTEEN_BIT_AS_8 = [0, 0, 0, 1, 1, 1, 1, 127, 128, 255, 255]


@pytest.mark.parametrize(
    ("mode", "name"), [("I;16", "g.png"), ("I;16", "g.tif"), ("I;16B", "g.tif"), ("I;16", "g.pgm")]
)
def test_16_bit_grey_is_scaled(tmp_path: Path, mode: str, name: str) -> None:
    samples = np.array(SIXTEEN_BIT, dtype="<u2" if mode == "I;16" else ">u2")
    image = Image.frombytes(mode, (len(SIXTEEN_BIT), 1), samples.tobytes())
    decoded = decode_quietly(save(image, tmp_path / name))
    assert decoded.mode in ("I;16", "I;16B", "I")  # PGM comes back as I
    assert decoded.rgb[0, :, 0].tolist() == SIXTEEN_BIT_AS_8
    assert np.array_equal(decoded.rgb[:, :, 0], decoded.rgb[:, :, 1])
    assert np.array_equal(decoded.rgb[:, :, 0], decoded.rgb[:, :, 2])


def test_32_bit_integers_are_clipped_to_16_bits_then_scaled(tmp_path: Path) -> None:
    values = [-(2**31), -5, 0, 255, 257, 65535, 70000, 2**31 - 1]
    image = Image.frombytes("I", (len(values), 1), np.array(values, dtype=np.int32).tobytes())
    decoded = decode_quietly(save(image, tmp_path / "i.tif"))
    assert decoded.mode == "I"
    assert decoded.rgb[0, :, 1].tolist() == [0, 0, 0, 1, 1, 255, 255, 255]


def test_float_is_clipped_to_0_255_and_rounded(tmp_path: Path) -> None:
    values = [-1.0, 0.4, 0.5, 1.5, 2.5, 127.5, 254.6, 300.0, np.nan, np.inf, -np.inf]
    image = Image.frombytes("F", (len(values), 1), np.array(values, dtype=np.float32).tobytes())
    decoded = decode_quietly(save(image, tmp_path / "f.tif"))
    assert decoded.mode == "F"
    # round half to even; NaN -> 0
    assert decoded.rgb[0, :, 2].tolist() == [0, 0, 0, 2, 2, 128, 255, 255, 0, 255, 0]


def _sixteen_bit_colour(channels: int) -> np.ndarray:
    samples = np.random.default_rng(3).integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    samples[0, 0, :3] = (255, 32768, 65535)  # -> 1, 128, 255 (v >> 8 would give 0, 128, 255)
    return samples


@pytest.mark.parametrize(("channels", "color_type"), [(3, 2), (4, 6)])
def test_16_bit_colour_png_is_scaled(tmp_path: Path, channels: int, color_type: int) -> None:
    samples = _sixteen_bit_colour(channels)
    decoded = decode_quietly(write_png16(tmp_path / "c.png", samples, color_type))
    assert decoded.rgb[0, 0].tolist() == [1, 128, 255]
    assert np.array_equal(decoded.rgb, rounded_16_to_8(samples[:, :, :3]))
    assert not np.array_equal(decoded.rgb, samples[:, :, :3] >> 8)  # what Pillow alone gives


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("deflate", [False, True])
def test_16_bit_colour_tiff_is_scaled(tmp_path: Path, channels: int, byteorder: str, deflate: bool) -> None:
    samples = _sixteen_bit_colour(channels)
    decoded = decode_quietly(write_tiff16(tmp_path / "c.tif", samples, byteorder, deflate))
    assert decoded.rgb[0, 0].tolist() == [1, 128, 255]
    assert np.array_equal(decoded.rgb, rounded_16_to_8(samples[:, :, :3]))


def test_16_bit_colour_is_oriented_like_its_high_bytes(tmp_path: Path) -> None:
    samples = _sixteen_bit_colour(3)
    path = write_png16(tmp_path / "c.png", samples, 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = Path(path).read_bytes()
    end = raw.rindex(b"IEND") - 4
    Path(path).write_bytes(raw[:end] + _png_chunk(b"eXIf", exif.tobytes()) + raw[end:])
    decoded = decode_quietly(path)
    assert np.array_equal(decoded.rgb, np.rot90(rounded_16_to_8(samples), k=-1))


def test_animated_images_use_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    png = save(frames[0], tmp_path / "a.png", save_all=True, append_images=frames[1:], duration=50)
    webp = save(frames[0], tmp_path / "a.webp", save_all=True, append_images=frames[1:], lossless=True)
    for path in (gif, png, webp):
        with Image.open(path) as image:
            assert image.n_frames == 3
        decoded = decode_quietly(path)
        assert decoded.rgb.reshape(-1, 3).tolist() == [[255, 0, 0]] * 64 * 64, path


# ---------------------------------------------------------------------------------------------------------
# decoding: EXIF orientation


def _marked_jpeg(path: Path, orientation: int) -> str:
    """A 96 wide x 64 high grey JPEG with a red 16x16 block in its stored top-left corner."""
    pixels = np.full((64, 96, 3), 128, dtype=np.uint8)
    pixels[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(pixels), path, quality=95, exif=exif)


def _is_red(pixel: np.ndarray) -> bool:
    return pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def test_orientation_6_turns_the_image_clockwise(tmp_path: Path) -> None:
    decoded = decode_quietly(_marked_jpeg(tmp_path / "six.jpg", 6))
    assert decoded.rgb.shape == (96, 64, 3) and (decoded.height, decoded.width) == (96, 64)
    assert _is_red(decoded.rgb[4, 64 - 5])  # stored top-left shows at the top right
    assert not _is_red(decoded.rgb[4, 4]) and not _is_red(decoded.rgb[96 - 5, 4])


def test_orientation_8_turns_the_image_anticlockwise(tmp_path: Path) -> None:
    decoded = decode_quietly(_marked_jpeg(tmp_path / "eight.jpg", 8))
    assert decoded.rgb.shape == (96, 64, 3)
    assert _is_red(decoded.rgb[96 - 5, 4])  # stored top-left shows at the bottom left
    assert not _is_red(decoded.rgb[4, 4]) and not _is_red(decoded.rgb[4, 64 - 5])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(tmp_path: Path, orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(pixels), tmp_path / "o.png", exif=exif)
    with Image.open(path) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(decode_quietly(path).rgb, expected)


def _exif_with_orientation_entry(kind: int, count: int, value: bytes) -> bytes:
    """Raw little-endian EXIF holding one Orientation entry, written by hand to allow odd types."""
    entry = struct.pack("<HHI", 0x0112, kind, count) + value.ljust(4, b"\x00")
    return b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + struct.pack("<H", 1) + entry + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "raw_exif",
    [
        _exif_with_orientation_entry(3, 1, struct.pack("<H", 99)),  # out of range
        _exif_with_orientation_entry(3, 1, struct.pack("<H", 0)),
        _exif_with_orientation_entry(2, 2, b"6\x00"),  # the text "6"
    ],
)
def test_nonsensical_orientation_means_no_rotation(tmp_path: Path, raw_exif: bytes) -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    path = save(Image.fromarray(pixels), tmp_path / "o.jpg", quality=95, exif=raw_exif)
    with Image.open(path) as image:
        assert image.getexif().get(0x0112) in (99, 0, "6")  # the odd value is really there
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(decode_quietly(path).rgb, expected)


def test_broken_exif_means_no_rotation_not_a_failure(tmp_path: Path) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    raw = Path(save(Image.fromarray(pixels), tmp_path / "x.png")).read_bytes()
    end = raw.rindex(b"IEND") - 4
    path = tmp_path / "broken_exif.png"
    path.write_bytes(raw[:end] + _png_chunk(b"eXIf", b"not a TIFF header at all") + raw[end:])
    with Image.open(path) as image, pytest.raises(SyntaxError):
        ImageOps.exif_transpose(image)  # plain Pillow fails on this file
    assert np.array_equal(decode_quietly(str(path)).rgb, pixels)


# ---------------------------------------------------------------------------------------------------------
# decoding: AVIF, JPEG 2000 and HEIC (HEIC with the optional pillow-heif, which the test extra installs)


def save_modern(pixels: np.ndarray, path: Path, orientation: int = 1) -> str:
    """AVIF, JPEG 2000 (lossless) or HEIC by the suffix, with an EXIF orientation where the format keeps one."""
    image = Image.fromarray(pixels)
    assert path.suffix != ".heic" or heif_available(), "pillow-heif is needed: pip install -e '.[test]'"
    options: dict[str, object] = {"quality": 95} if path.suffix in (".avif", ".heic") else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    return save(image, path, **options)


@pytest.mark.parametrize(("name", "image_format"), [("a.avif", "AVIF"), ("a.jp2", "JPEG2000"), ("a.heic", "HEIF")])
def test_avif_jpeg2000_and_heic_decode_like_pillow(tmp_path: Path, name: str, image_format: str) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = save_modern(pixels, tmp_path / name)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    decoded = decode_quietly(path)
    assert (decoded.height, decoded.width, decoded.format) == (40, 56, image_format)
    assert np.array_equal(decoded.rgb, expected)
    if image_format == "JPEG2000":
        assert np.array_equal(decoded.rgb, pixels)  # Pillow writes lossless JPEG 2000 by default


@pytest.mark.parametrize("name", ["six.avif", "six.heic"])
def test_avif_and_heic_orientation_is_applied_once(tmp_path: Path, name: str) -> None:
    pixels = np.full((64, 96, 3), 128, dtype=np.uint8)
    pixels[:16, :16] = (255, 0, 0)
    decoded = decode_quietly(save_modern(pixels, tmp_path / name, orientation=6))
    assert decoded.rgb.shape == (96, 64, 3) and (decoded.height, decoded.width) == (96, 64)
    assert _is_red(decoded.rgb[4, 64 - 5])  # stored top-left shows at the top right, as for JPEG
    assert not _is_red(decoded.rgb[4, 4]) and not _is_red(decoded.rgb[96 - 5, 4])


@pytest.mark.parametrize("name", ["a.avif", "a.jp2", "a.heic"])
def test_avif_jpeg2000_and_heic_alpha_is_dropped(tmp_path: Path, name: str) -> None:
    rgba = np.random.default_rng(8).integers(0, 256, (32, 40, 4), dtype=np.uint8)
    assert heif_available()  # registers the HEIF plugin, also for saving
    path = save(Image.fromarray(rgba), tmp_path / name, **({"lossless": True} if name == "a.avif" else {}))
    with Image.open(path) as reference:
        assert reference.mode == "RGBA"
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(decode_quietly(path).rgb, expected)


def test_16_bit_jpeg2000_grey_is_scaled(tmp_path: Path) -> None:
    image = Image.frombytes("I;16", (len(SIXTEEN_BIT), 1), np.array(SIXTEEN_BIT, dtype="<u2").tobytes())
    decoded = decode_quietly(save(image, tmp_path / "g.jp2"))
    assert decoded.mode == "I;16" and decoded.rgb[0, :, 1].tolist() == SIXTEEN_BIT_AS_8


@pytest.mark.parametrize("name", ["a.avif", "a.jp2", "a.heic"])
def test_avif_jpeg2000_and_heic_pixel_limit_is_checked_from_the_header(tmp_path: Path, name: str) -> None:
    pixels = np.random.default_rng(9).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = save_modern(pixels, tmp_path / name)
    assert decode_quietly(path, max_pixels=40 * 56).height == 40
    assert _decode_error(path, max_pixels=40 * 56 - 1) == "image is 56x40 = 2,240 pixels, more than the limit of 2,239"


@pytest.mark.parametrize(
    ("name", "lenient"),
    [("cut.avif", False), ("cut.jp2", True), ("cut.heic", True)],
    ids=["avif-refused-even-when-lenient", "jpeg2000", "heic"],
)
def test_cut_avif_jpeg2000_and_heic_are_refused(tmp_path: Path, name: str, lenient: bool) -> None:
    pixels = np.random.default_rng(10).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    whole = Path(save_modern(pixels, tmp_path / f"whole{Path(name).suffix}")).read_bytes()
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) * 2 // 3])
    assert _decode_error(path)
    if lenient:  # decoded as far as the decoder gets (Pillow fills the rest)
        assert decode_quietly(str(path), allow_truncated=True).rgb.shape == (64, 80, 3)
    else:  # libavif reads no partial file
        assert _decode_error(path, allow_truncated=True).startswith("not an image in an allowed format: a damaged")


def test_heic_without_pillow_heif_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.random.default_rng(11).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = save_modern(pixels, tmp_path / "photo.heic")
    avif = save_modern(pixels, tmp_path / "photo.avif")
    monkeypatch.setattr(decoding, "heif_available", lambda: False)
    assert _decode_error(path) == "a HEIC/HEIF image: reading it needs the optional extra, pip install 'fpnx[heif]'"
    assert decode_quietly(avif).format == "AVIF"  # other formats in the same ISO box family are unaffected
    monkeypatch.undo()
    assert decode_quietly(path).format == "HEIF"


# ---------------------------------------------------------------------------------------------------------
# decoding: refusing bad files


def _decode_error(path: str | Path, **options: object) -> str:
    with pytest.raises(ImageError) as caught:
        decode_quietly(str(path), **options)
    message = str(caught.value)
    assert "\n" not in message and str(path) not in message and os.path.basename(path) not in message
    return message


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _decode_error(tmp_path / "empty.jpg") == "empty file"


def test_text_with_an_image_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image\n" * 20)
    assert "not an image in an allowed format" in _decode_error(tmp_path / "notes.png")


@pytest.mark.parametrize(("name", "pillow_format"), [("icon.png", "ICO"), ("targa.jpg", "TGA"), ("sgi.bmp", "SGI")])
def test_formats_outside_the_allowed_list_are_refused(tmp_path: Path, name: str, pillow_format: str) -> None:
    path = save(Image.new("RGB", (64, 64), (9, 9, 9)), tmp_path / name, format=pillow_format)
    with Image.open(path) as image:
        assert image.format == pillow_format  # Pillow alone would happily decode it
    assert pillow_format not in ALLOWED_FORMATS
    assert "not an image in an allowed format" in _decode_error(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert _decode_error(tmp_path / "gone.jpg").startswith("cannot open file")
    (tmp_path / "folder.jpg").mkdir()
    message = _decode_error(tmp_path / "folder.jpg")
    assert message == "not a regular file" or message.startswith("cannot open file")  # platforms differ


@posix_only
def test_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    outcome: list[str] = []

    def decode() -> None:
        try:
            decode_image(str(tmp_path / "pipe.jpg"))
        except ImageError as error:
            outcome.append(str(error))

    worker = threading.Thread(target=decode, daemon=True)  # a daemon: a blocked open() must not hang pytest
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "opening a named pipe blocked"
    assert outcome == ["not a regular file"]


def test_broken_files_make_no_warnings(tmp_path: Path) -> None:
    # Pillow warns about the corrupt tag directory of this cut TIFF before refusing it
    whole = Path(save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path / "x.tif")).read_bytes()
    (tmp_path / "cut.tif").write_bytes(whole[:40])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(UnidentifiedImageError):
        warnings.simplefilter("always")
        Image.open(tmp_path / "cut.tif")
    assert any("Corrupt EXIF" in str(warning.message) for warning in seen)
    assert "not an image in an allowed format" in _decode_error(tmp_path / "cut.tif")


def test_corrupt_data_is_one_line(tmp_path: Path) -> None:
    raw = Path(save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path / "x.png")).read_bytes()
    start = raw.index(b"IDAT") + 4
    corrupt = raw[:start] + b"\xff" * 40 + raw[start + 40 :]
    (tmp_path / "corrupt.png").write_bytes(corrupt)
    assert _decode_error(tmp_path / "corrupt.png")


def test_too_many_pixels_is_refused(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (64, 64)), tmp_path / "a.png")
    assert decode_quietly(path, max_pixels=64 * 64).height == 64
    assert "more than the limit of 4,095" in _decode_error(path, max_pixels=64 * 64 - 1)


def test_size_is_checked_before_decoding(tmp_path: Path) -> None:
    # 20000 x 20000 is past Pillow's own hard limit; the header is refused by our check, before any data is
    # read (decoding first would report the unfinished data instead) and without Pillow's error
    path = write_unfinished_png(tmp_path / "bomb.png", 20000, 20000)
    message = _decode_error(path)
    assert message.startswith("image is 20000x20000") and "more than the limit of 178,956,970" in message
    assert Image.MAX_IMAGE_PIXELS == 89478485 and DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS


def test_pillow_bomb_warning_and_error_never_escape(tmp_path: Path) -> None:
    # 10000 x 10000 is past Pillow's warning threshold but within ours: no warning, then a data error
    assert "truncated" in _decode_error(write_unfinished_png(tmp_path / "big.png", 10000, 10000))
    # 14000 x 14000 is past Pillow's hard limit; a larger max_pixels must win over Pillow's error
    path = write_unfinished_png(tmp_path / "huge.png", 14000, 14000)
    assert "truncated" in _decode_error(path, max_pixels=14000 * 14000)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # restored


@pytest.mark.parametrize(("name", "options"), [("t.jpg", {"quality": 90}), ("t.png", {})])
def test_truncated_data(tmp_path: Path, name: str, options: dict[str, object]) -> None:
    pixels = np.random.default_rng(6).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    whole = Path(save(Image.fromarray(pixels), tmp_path / name, **options)).read_bytes()
    path = tmp_path / f"cut_{name}"
    path.write_bytes(whole[: len(whole) * 2 // 3])

    assert "truncated" in _decode_error(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    decoded = decode_quietly(str(path), allow_truncated=True)
    assert decoded.rgb.shape == (96, 128, 3)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # only set for the call

    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a caller's own setting must neither leak in nor be lost
    try:
        assert "truncated" in _decode_error(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_a_zero_pixel_image_is_refused(tmp_path: Path) -> None:
    header = b"P5 0 4 255\n"
    (tmp_path / "flat.pgm").write_bytes(header)
    assert _decode_error(tmp_path / "flat.pgm")


# ---------------------------------------------------------------------------------------------------------
# decoding: worker friendliness


def test_decode_image_and_its_result_pickle(tmp_path: Path) -> None:
    assert pickle.loads(pickle.dumps(decode_image)) is decode_image
    decoded = decode_quietly(save(Image.new("RGB", (64, 64), (5, 6, 7)), tmp_path / "a.png"))
    copy = pickle.loads(pickle.dumps(decoded))
    assert np.array_equal(copy.rgb, decoded.rgb) and (copy.mode, copy.format) == ("RGB", "PNG")
    error = pickle.loads(pickle.dumps(ImageError("empty file")))
    assert isinstance(error, ImageError) and str(error) == "empty file"


def test_decode_image_runs_in_a_spawned_worker(tmp_path: Path) -> None:
    good = save(Image.new("RGB", (64, 64), (5, 6, 7)), tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"")
    heic = save_modern(np.full((16, 24, 3), 200, dtype=np.uint8), tmp_path / "a.heic")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(heic, "inside/a.heic")
    (member,) = discover([tmp_path / "a.tar"]).images
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        decoded = pool.submit(decode_image, good).result(timeout=60)
        failure = pool.submit(decode_image, str(tmp_path / "bad.png")).exception(timeout=60)
        from_tar = pool.submit(decode_source, member).result(timeout=60)  # the worker registers HEIF itself
    assert decoded.rgb[0, 0].tolist() == [5, 6, 7]
    assert isinstance(failure, ImageError) and str(failure) == "empty file"
    assert (from_tar.format, from_tar.height, from_tar.width) == ("HEIF", 16, 24)


# ---------------------------------------------------------------------------------------------------------
# discovery


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by discover")
    return path


def sources(found: object) -> list[str]:
    return [image.source for image in found.images]  # type: ignore[attr-defined]


def skipped_reasons(found: object) -> dict[str, str]:
    return {os.path.basename(path): reason for path, reason in found.skipped}  # type: ignore[attr-defined]


def test_extensions_and_formats_are_as_documented() -> None:
    assert IMAGE_EXTENSIONS == (
        ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm",
        ".avif", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".heic", ".heif", ".hif",
    )  # fmt: skip
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "AVIF", "JPEG2000", "HEIF")
    Image.init()
    assert all(name in Image.OPEN for name in ALLOWED_FORMATS if name != "HEIF")
    assert ("HEIF" in Image.OPEN) == heif_available()


def test_folder_is_walked_recursively_in_byte_order(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ["b.jpg", "a.jpg", "B.png", "a/x.JPG", "a-b.jpeg", "a/z/deep.TIFF", "c.Webp", "d.jpe", "e.pbm"]:
        touch_image(root / name)
    found = discover([root])
    # '-' (0x2d) < '.' (0x2e) < '/' (0x2f); capitals before lower case
    expected = ["B.png", "a-b.jpeg", "a.jpg", "a/x.JPG", "a/z/deep.TIFF", "b.jpg", "c.Webp", "d.jpe", "e.pbm"]
    assert sources(found) == expected
    assert found.images[3] == ImageSource(path=os.path.join(str(root), "a", "x.JPG"), source="a/x.JPG")
    assert found.skipped == []


def test_hidden_appledouble_and_other_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ["keep.png", ".hidden.png", "._keep.png", ".cache/inside.png", "notes.txt", "sub/.DS_Store"]:
        touch_image(root / name)
    found = discover([str(root)])
    assert sources(found) == ["keep.png"]
    reasons = skipped_reasons(found)
    assert reasons[".hidden.png"] == "hidden" and reasons[".cache"] == "hidden" and reasons[".DS_Store"] == "hidden"
    assert "AppleDouble" in reasons["._keep.png"]
    assert reasons["notes.txt"] == "not an image file extension"
    assert "inside.png" not in reasons  # a hidden folder is not entered


def test_empty_folder_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    found = discover([tmp_path / "empty"])
    assert found.images == [] and found.skipped == []


def test_files_lists_and_folders_mix_in_input_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_image(tmp_path / "one.png")
    touch_image(tmp_path / "folder" / "two.png")
    touch_image(tmp_path / "lists" / "three.jpg")
    touch_image(tmp_path / "lists" / "sub" / "four.jpg")
    (tmp_path / "lists" / "list.txt").write_text(
        "# comment\n\n  three.jpg  \nsub\r\n" + str(tmp_path / "one.png") + "\n"
    )
    monkeypatch.chdir(tmp_path)
    found = discover(["one.png", f"@{tmp_path / 'lists' / 'list.txt'}", Path("folder")])
    assert sources(found) == ["one.png", "three.jpg", "four.jpg", "two.png"]
    assert found.images[1].path == os.path.join(str(tmp_path / "lists"), "three.jpg")
    # the absolute entry names one.png again: listed once, the second path reported
    assert [reason for _, reason in found.skipped] == ["same file as one.png"]


def test_list_relative_to_its_own_folder_and_missing_entries(tmp_path: Path) -> None:
    touch_image(tmp_path / "lists" / "a.png")
    (tmp_path / "lists" / "list.txt").write_bytes(b"\xef\xbb\xbfa.png\n")
    assert sources(discover([f"@{tmp_path / 'lists' / 'list.txt'}"])) == ["a.png"]

    (tmp_path / "lists" / "bad.txt").write_text("a.png\nmissing.png\n")
    with pytest.raises(UsageError) as caught:
        discover([f"@{tmp_path / 'lists' / 'bad.txt'}"])
    assert str(caught.value) == (
        f"{tmp_path / 'lists' / 'missing.png'}: no such file or directory (line 2 of {tmp_path / 'lists' / 'bad.txt'})"
    )


def test_missing_inputs_are_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(UsageError) as caught:
        discover(["images/missing"])
    assert str(caught.value) == "images/missing: no such file or directory"
    with pytest.raises(UsageError) as caught:
        discover(["@lists/none.txt"])
    assert str(caught.value) == "lists/none.txt: no such file or directory"


def test_a_file_given_directly_needs_an_image_extension(tmp_path: Path) -> None:
    touch_image(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match=r"notes\.txt: not an image file"):
        discover([tmp_path / "notes.txt"])
    touch_image(tmp_path / ".hidden.PNG")  # explicit beats hidden
    assert sources(discover([str(tmp_path / ".hidden.PNG")])) == [str(tmp_path / ".hidden.PNG")]


def test_the_same_file_is_listed_once(tmp_path: Path) -> None:
    touch_image(tmp_path / "a.png")
    found = discover([tmp_path / "a.png", str(tmp_path / "a.png")])
    assert len(found.images) == 1 and len(found.skipped) == 1


def test_two_files_with_one_source_are_refused(tmp_path: Path) -> None:
    touch_image(tmp_path / "first" / "x.jpg")
    touch_image(tmp_path / "second" / "x.jpg")
    with pytest.raises(UsageError) as caught:
        discover([tmp_path / "first", tmp_path / "second"])
    message = str(caught.value)
    assert "x.jpg" in message and str(tmp_path / "first" / "x.jpg") in message
    assert str(tmp_path / "second" / "x.jpg") in message and "\n" not in message


@posix_only
def test_symlinked_folders_are_followed_without_loops_or_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch_image(root / "real" / "a.png")
    touch_image(tmp_path / "outside" / "b.png")
    os.symlink(root, root / "real" / "loop")  # back to an ancestor
    os.symlink(root / "real", root / "second_link")  # another way into real/
    os.symlink(tmp_path / "outside", root / "outside_link")  # a folder only reachable by link
    os.symlink(tmp_path / "nowhere", root / "broken.png")
    found = discover([root])
    assert sources(found) == ["outside_link/b.png", "real/a.png"]
    reasons = skipped_reasons(found)
    assert reasons["loop"].startswith("folder already walked")
    assert reasons["second_link"].startswith("folder already walked")
    assert reasons["broken.png"] == "broken symbolic link"


@posix_only
def test_pipes_in_folders_are_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    found = discover([tmp_path])
    assert found.images == [] and skipped_reasons(found) == {"pipe.png": "not a regular file"}


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that stores raw bytes as names")
def test_non_utf8_names_survive(tmp_path: Path) -> None:
    name = b"caf\xe9.png"
    raw_path = os.path.join(os.fsencode(tmp_path), name)
    with open(raw_path, "wb") as file:
        Image.new("RGB", (64, 64), (3, 2, 1)).save(file, format="PNG")
    found = discover([os.fsencode(tmp_path)])
    (image,) = found.images
    assert os.fsencode(image.source) == name and os.fsencode(image.path) == raw_path
    assert decode_quietly(image.path).rgb[0, 0].tolist() == [3, 2, 1]
    assert display_path(image.source) == "caf\\xe9.png"


def test_display_path_keeps_messages_on_one_line() -> None:
    assert display_path("images/a.jpg") == "images/a.jpg"
    assert display_path("bad\nname.jpg") == "bad\\nname.jpg"
