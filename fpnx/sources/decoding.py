"""Decoding: one image file into ``(H, W, 3)`` uint8 RGB with Pillow, the same way every time.

:func:`decode_image` is restricted to :data:`ALLOWED_FORMATS`, refuses what is unsafe or broken with a one-line
:class:`~fpnx.errors.ImageError`, applies EXIF orientation and converts every Pillow mode to RGB by the
documented rules. :func:`decode_source` does the same for an :class:`~fpnx.sources.discovery.ImageSource`,
a file or one member of an archive. Both are plain module-level functions with picklable arguments and
results, so they can run in worker processes.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import struct
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from ..errors import ImageError, os_error_reason
from .archives import member_byte_limit, read_member
from .discovery import ImageSource

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "AVIF", "JPEG2000", "HEIF")
"""Pillow format names decoding is restricted to. The content decides the format, the extension does not,
so a ``.jpg`` that is really a PNG decodes, while a ``.jpg`` that is really EPS, PSD, ICO... is refused.
Multi-picture JPEGs from cameras are opened by the JPEG plugin but report ``format == "MPO"``. ``HEIF``
(HEIC photos) is read only where the optional ``pillow-heif`` is installed (``pip install 'fpnx[heif]'``)."""

HEIF_EXTRA = "pip install 'fpnx[heif]'"

# ISO base media file brands of HEVC-coded HEIF ("heic" for iPhone photos); mif1/msf1 are generic HEIF brands
# that AVIF files use too, so they count as HEIC only with an HEVC brand among the compatible ones.
_HEVC_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")

# 2 x Pillow's default Image.MAX_IMAGE_PIXELS (89,478,485): the size at which Pillow itself refuses to open.
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image: ``rgb`` is ``(height, width, 3)`` uint8, C-contiguous and writable.

    ``height``/``width`` are after EXIF orientation; ``mode`` is the Pillow mode of the decoded first frame
    before conversion (e.g. ``"I;16"``, ``"P"``), ``format`` the Pillow format name (e.g. ``"JPEG"``).
    """

    rgb: np.ndarray
    height: int
    width: int
    mode: str
    format: str


# Exception types Pillow's parsers and decoders raise on hostile or broken data (its own open() swallows the
# same kinds while probing formats). Caught around Pillow calls only, so our own bugs are not disguised.
_PILLOW_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
    OverflowError, MemoryError, struct.error,
)  # fmt: skip

# EXIF Orientation -> the transposition that displays the image upright (the table ImageOps.exif_transpose
# uses; tests check both agree).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# round(v * 255 / 65535) for every 16-bit v, in exact integer arithmetic (v / 257 is never a tie).
_SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.uint32) * 510 + 65535) // 131070).astype(np.uint8)

# Pillow reduces 16-bit-per-channel colour (PNG, TIFF) to 8 bits while decoding, keeping the high byte of
# each sample. Decoding once more with the opposite byte order yields the low bytes, so the full 16-bit
# value can be scaled like 16-bit grey. These are the raw modes where Pillow has both unpackers.
_SIXTEEN_BIT_COLOUR_BASES = ("RGB", "RGBA", "RGBX")
_LOW_BYTE_SUFFIX = {";16B": ";16L", ";16L": ";16B", ";16N": ";16B" if sys.byteorder == "little" else ";16L"}


def decode_source(
    image: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, allow_truncated: bool = False
) -> DecodedImage:
    """:func:`decode_image` for what discovery found: a file, or one member of a ``.tar``/``.zip`` archive.

    A member's bytes are read from the archive (opened read-only, never more than the member declares, and
    refused unread when it declares more than :func:`~fpnx.sources.archives.member_byte_limit` of
    ``max_pixels``), then decoded by the same rules as a file. A member discovery already found unreadable
    (a damaged archive, a sparse or encrypted member...) fails with that reason.
    """
    member = image.member
    if member is None:
        return decode_image(image.path, max_pixels=max_pixels, allow_truncated=allow_truncated)
    if member.problem is not None:
        raise ImageError(member.problem)
    with _open_regular_file(image.path) as archive:
        data = read_member(archive, member, member_byte_limit(max_pixels))
    return decode_image(io.BytesIO(data), max_pixels=max_pixels, allow_truncated=allow_truncated)


def decode_image(
    path: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_truncated: bool = False,
) -> DecodedImage:
    """Decode the first frame of an image file (a path, or an open binary file) into ``(H, W, 3)`` uint8 RGB.

    Only :data:`ALLOWED_FORMATS` are tried. ``max_pixels`` is checked on the header's size before any
    pixel is decoded; it replaces Pillow's own decompression-bomb limit for this call (no
    ``DecompressionBombWarning``/``Error`` escapes). Truncated data is an error unless ``allow_truncated``,
    which decodes what is there (Pillow fills the rest).

    Conversion rules, the same for every file:

    - EXIF orientation is applied (the same transposition as ``ImageOps.exif_transpose``); unreadable or
      nonsensical EXIF means no rotation, never a failure. ``height``/``width`` are after orientation.
      Colour profiles (ICC) are ignored, as torchvision and detectron2 loaders do.
    - Animated or multi-page files (GIF, APNG, WebP, TIFF, MPO, AVIF sequences) use their first frame;
      HEIF files their primary image. HEIF orientation (``irot``/``imir``) is applied by libheif while
      decoding (its EXIF orientation then reads 1); AVIF's is given as EXIF orientation and applied here.
    - ``RGB`` is used as is. ``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` go through Pillow's
      ``convert("RGB")``.
    - Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``P``/``L``/``RGB`` with a transparency key) is dropped
      exactly as ``convert("RGB")`` does: colour values are kept, nothing is blended with a background.
      This is what torchvision users get from ``Image.open(p).convert("RGB")``.
    - 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, and ``I`` as Pillow gives 16-bit PNG/PGM) is scaled,
      not clipped or shifted: ``round(v * 255 / 65535)``, then copied to the 3 channels. ``I`` is always
      read as 16-bit data: 32-bit values outside 0..65535 are first clipped to that range.
    - 16-bit-per-channel RGB/RGBA PNG and TIFF are scaled the same way per channel (Pillow would keep
      only the high byte, ``v >> 8``). Rarer 16-bit layouts (grey+alpha PNG, CMYK, premultiplied
      alpha, planar TIFF) keep Pillow's high-byte reduction.
    - ``F`` (32-bit float) is taken as 0..255 data: clipped to 0..255, rounded half to even, NaN as 0.

    Raises :class:`ImageError` with a one-line reason (no path: the caller prefixes the source) for an
    unreadable, empty or non-regular file, a format that is not allowed, an image over ``max_pixels`` or
    without pixels, truncated data and anything else Pillow cannot decode.

    Pillow's ``MAX_IMAGE_PIXELS`` and ``LOAD_TRUNCATED_IMAGES`` and the warning filters are process-wide;
    they are set for the duration of the call and restored, so run concurrent decodes in processes (as
    fpnx does), not threads.
    """
    if hasattr(path, "read"):
        opened, path = _nonempty(path), ""  # type: ignore[arg-type]
    else:
        path = os.fsdecode(path)  # a Path or bytes works too
        opened = _open_regular_file(path)
    with opened as file, _pillow_settings(allow_truncated) as caught:
        try:
            frame = _load_first_frame(file, max_pixels)
        except UnidentifiedImageError:
            raise ImageError(_unidentified_reason(caught, path, file)) from None
        except Image.DecompressionBombError as error:  # only if Pillow's limit is changed mid-call
            raise ImageError(_one_line(str(error), path)) from error
        except _PILLOW_DECODE_ERRORS as error:
            raise ImageError(_decode_reason(error, path)) from error
    if frame.low_bytes is not None:
        rgb = _scale_16_bit_colour(frame.image, frame.low_bytes)
    else:
        rgb = _rgb_array(frame.image)
    return DecodedImage(rgb=rgb, height=rgb.shape[0], width=rgb.shape[1], mode=frame.mode, format=frame.format)


class _Frame(NamedTuple):
    image: Image.Image  # loaded and upright
    low_bytes: Image.Image | None  # for 16-bit colour: the low byte of each sample, upright too
    mode: str
    format: str


def _load_first_frame(file: BinaryIO, max_pixels: int) -> _Frame:
    """Open, check the size, decode the pixels and orient them. Only Pillow work happens here."""
    image = Image.open(file, formats=_usable_formats())
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}"
        )
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    tiles = list(image.tile)  # the decoding plan; load() empties it
    image.load()
    image_format = image.format or "unknown"
    orientation = _exif_orientation(image)  # before the file is read again below
    low_bytes = _low_bytes_image(file, image_format, tiles) if _is_16_bit_colour(tiles) else None
    return _Frame(
        image=_oriented(image, orientation),
        low_bytes=None if low_bytes is None else _oriented(low_bytes, orientation),
        mode=image.mode,
        format=image_format,
    )


def _open_regular_file(path: str) -> BinaryIO:
    """Open ``path`` for reading, refusing what is not a non-empty regular file."""
    # O_NONBLOCK: opening a named pipe must not hang waiting for a writer (no effect on regular files).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise ImageError(f"cannot open file: {os_error_reason(error)}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file")
        if info.st_size == 0:
            raise ImageError("empty file")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _nonempty(file: BinaryIO) -> nullcontext[BinaryIO]:
    """An open file, checked to hold data; the caller keeps it open."""
    file.seek(0, os.SEEK_END)
    if file.tell() == 0:
        raise ImageError("empty file")
    file.seek(0)
    return nullcontext(file)


@functools.cache
def heif_available() -> bool:
    """Whether HEIF can be read: the optional ``pillow-heif`` is installed (its Pillow plugin is registered here)."""
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except (ImportError, OSError):  # not installed, or its libheif cannot load: HEIC files fail with a reason
        return False
    return True


def _usable_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format name no plugin registered, so HEIF is left out without its plugin
    return ALLOWED_FORMATS if heif_available() else tuple(name for name in ALLOWED_FORMATS if name != "HEIF")


def _looks_like_heic(file: BinaryIO) -> bool:
    file.seek(0)
    head = file.read(64)
    if head[4:8] != b"ftyp":
        return False
    box_end = int.from_bytes(head[:4], "big")
    return head[8:12] in _HEVC_BRANDS or (
        head[8:12] in (b"mif1", b"msf1") and any(brand in head[16:box_end] for brand in _HEVC_BRANDS)
    )


@contextmanager
def _pillow_settings(allow_truncated: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Set Pillow's process-wide decoding switches for one call, and put them back; yields its warnings."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, Image.WARN_POSSIBLE_FORMATS
    with warnings.catch_warnings(record=True) as caught:
        # Broken files make Pillow warn (corrupt EXIF, odd chunks); here they become an ImageError or decode
        # fine, and thousands of warnings from workers would only bury the report. They are kept, not shown.
        warnings.simplefilter("always")
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
        Image.MAX_IMAGE_PIXELS = None  # decode_image checks max_pixels itself, right after the header
        Image.WARN_POSSIBLE_FORMATS = True  # say why a file that looks like TIFF (say) cannot be opened as one
        try:
            yield caught
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, Image.WARN_POSSIBLE_FORMATS = saved


def _unidentified_reason(caught: list[warnings.WarningMessage], path: str, file: BinaryIO) -> str:
    """Why no allowed format opened the file: for a file with an allowed format's header, that format's complaint."""
    if not heif_available() and _looks_like_heic(file):
        return f"a HEIC/HEIF image: reading it needs the optional extra, {HEIF_EXTRA}"
    reason = f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
    for warning in caught:
        name, opening_failed, why = str(warning.message).partition(" opening failed. ")
        if opening_failed and name in ALLOWED_FORMATS:
            return f"not an image in an allowed format: a damaged or unsupported {name} ({_one_line(why, path)})"
    return reason


def _one_line(text: str, path: str) -> str:
    if path:
        text = text.replace(path, "<file>")
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _decode_reason(error: BaseException, path: str) -> str:
    text = _one_line(str(error), path)
    lowered = text.lower()
    if "truncated" in lowered or "not enough image data" in lowered or "end of file" in lowered:
        return f"truncated image data ({text})"
    if isinstance(error, MemoryError):
        return "not enough memory to decode the image"
    return f"cannot decode image: {text or type(error).__name__}"


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation (2..8) that needs a transposition, or 1 when absent, invalid or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow's EXIF parser fails in many ways on hostile data; rotation is not worth a failure
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _oriented(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _rgb_array(image: Image.Image) -> np.ndarray:
    """Apply the mode rules of :func:`decode_image` to a loaded image."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image)  # a writable copy; np.asarray would be read-only
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)
        if values.dtype != np.uint16:
            values = np.clip(values, 0, 65535).astype(np.uint16)
        return _grey_to_rgb(_SIXTEEN_TO_EIGHT_BITS[values])
    if mode == "F":
        values = np.nan_to_num(np.asarray(image), nan=0.0, posinf=255.0, neginf=0.0)
        return _grey_to_rgb(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))
    # The transparency key only feeds the converted image's metadata, never its pixels; without it
    # convert() also skips its "transparency expressed in bytes" warning.
    image.info.pop("transparency", None)
    try:
        converted = image.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported image mode {mode}") from None
    return np.array(converted)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, np.newaxis], 3, axis=2)


def _tile_rawmode(tile: Any) -> str | None:
    args = tile[3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _low_byte_rawmode(rawmode: str | None) -> str | None:
    if rawmode is None:
        return None
    base, suffix = rawmode[:-4], rawmode[-4:]
    if base not in _SIXTEEN_BIT_COLOUR_BASES or suffix not in _LOW_BYTE_SUFFIX:
        return None
    return base + _LOW_BYTE_SUFFIX[suffix]


def _is_16_bit_colour(tiles: list[Any]) -> bool:
    return bool(tiles) and all(_low_byte_rawmode(_tile_rawmode(tile)) for tile in tiles)


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    args = tile[3]
    new_args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    if hasattr(tile, "_replace"):  # Pillow >= 11 tiles are named tuples
        return tile._replace(args=new_args)
    return (*tile[:3], new_args)


def _low_bytes_image(file: BinaryIO, image_format: str, tiles: list[Any]) -> Image.Image | None:
    """Decode ``file`` again keeping the low byte of each 16-bit sample; None if the plan does not match."""
    low = Image.open(file, formats=(image_format,))
    if [tuple(tile[:3]) for tile in low.tile] != [tuple(tile[:3]) for tile in tiles]:
        return None
    low.tile = [_with_rawmode(tile, _low_byte_rawmode(_tile_rawmode(tile)) or "") for tile in tiles]
    low.load()
    return low


def _scale_16_bit_colour(high: Image.Image, low: Image.Image) -> np.ndarray:
    high_bytes = np.asarray(high)[:, :, :3].astype(np.uint16)
    values = (high_bytes << 8) | np.asarray(low)[:, :, :3]
    return _SIXTEEN_TO_EIGHT_BITS[values]
