"""``plot_features()``: one image's input beside each level's mean activation, and each level's histogram, as a PNG.

Drawn with Pillow (already a dependency): the figure is a grid of simple panels (an image, colour maps and bar
histograms), so a plotting library would add a large dependency for little. The layout is returned as data
(:class:`PlotResult`), so callers and tests know where each panel is.

Layout: the first row holds the input image and, per level, the mean over channels of the stored map as a
viridis colour map (scaled to that map's own min..max, shown under it) titled with its H x W; the second row
holds, per level, a histogram of all that image's values at the level (64 bins over min..max, bar height on a
log scale), and a text panel with the source, sizes and weights under the input.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import FpnxError, ImageError, UsageError, display_path, os_error_reason
from ..sources import decode_source, locate_image
from ..store import open_features
from .inspection import select_image

PANEL_WIDTH = 240
MIN_PANEL_HEIGHT = 96
MAX_PANEL_HEIGHT = 320
HISTOGRAM_HEIGHT = 150
HISTOGRAM_BINS = 64
TITLE_HEIGHT = 22
SCALE_HEIGHT = 30  # colour bar and its min/max under each map
MARGIN = 12
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MISSING = (225, 225, 225)
BAR = (49, 104, 142)

# viridis at 0, 1/8, ..., 1; interpolated to 256 entries
_VIRIDIS_ANCHORS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37),
], dtype=np.float64)
_positions = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
VIRIDIS = np.stack([np.interp(np.linspace(0.0, 1.0, 256), _positions, _VIRIDIS_ANCHORS[:, c]) for c in range(3)],
                   axis=1).round().astype(np.uint8)


@dataclass
class Panel:
    name: str  # "input", "info", "<level>" (colour map) or "<level> histogram"
    kind: str  # image, info, map, histogram
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive) in the PNG
    title: str


@dataclass
class PlotResult:
    out: str
    width: int
    height: int
    index: int
    source: str
    image_path: str | None  # the input image file drawn, None when it was not found
    panels: list[Panel] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def colormap(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(H, W) floats -> (H, W, 3) uint8 viridis scaled to the finite min..max; returns (rgb, min, max)."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.full((*values.shape, 3), MISSING, np.uint8), float("nan"), float("nan")
    low, high = float(values[finite].min()), float(values[finite].max())
    scaled = np.where(finite, values, low)
    scaled = (scaled - low) / (high - low) if high > low else np.full(values.shape, 0.5)
    return VIRIDIS[np.clip((scaled * 255).round(), 0, 255).astype(np.int64)], low, high


def find_image(source: str, feature_path: Path, metadata: dict[str, Any], image_root: str | os.PathLike | None = None) -> Path | None:
    """The image file ``source`` was extracted from (or ``ARCHIVE/MEMBER`` for an archive member), or None.

    With ``image_root``: ``image_root/source`` only. Otherwise, for files that record their run's inputs
    (absolute) and working folder: ``source`` inside each folder input, beside each ``@list``, and relative to the
    run's working folder; then, for any file, ``source`` relative to the feature file's folder and to the current
    folder. Files written before inputs were recorded fall back on the words of the recorded command line.
    """
    if image_root is not None:
        candidates = [Path(image_root) / source]
    else:
        here = feature_path.resolve().parent  # a .parts folder sits beside its output, like the file
        candidates = [folder / source for folder in _input_folders(metadata, here)] + [here / source, Path(source)]
    for candidate in candidates:
        try:
            if locate_image(str(candidate)) is not None:
                return candidate
        except OSError:
            continue
    return None


def _input_folders(metadata: dict[str, Any], here: Path) -> list[Path]:
    """Folders a source may be relative to, from what the run recorded."""
    inputs, working = metadata.get("inputs"), metadata.get("working_dir")
    if isinstance(inputs, list) and isinstance(working, str):
        folders = [Path(str(item)[1:]).parent if str(item).startswith("@") else Path(str(item)) for item in inputs]
        return folders + [Path(working)]
    # older files: every word after "extract" (option values too: a value is no folder, so it finds nothing)
    try:
        words = shlex.split(metadata.get("command") or "")
    except ValueError:
        return []
    words = words[words.index("extract") + 1 :] if "extract" in words else words
    return [base / word for word in words if not word.startswith(("-", "@")) for base in (Path.cwd(), here)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _number(value: float) -> str:
    return "nan" if value != value else f"{value:.3g}"


def plot_features(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    image: int | str | None = None,
    image_root: str | os.PathLike | None = None,
) -> PlotResult:
    """Draw image ``image`` (position or source; default the first) of the feature file at ``path`` into ``out``.

    The input image is looked up with :func:`find_image`; when it cannot be found (or decoded) its panel
    says so instead of failing.
    """
    path, out = Path(path), Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG: give a file name ending in .png, not {out.name!r}")
    if not out.parent.is_dir():  # as extract's --out: a mistyped folder is not created
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    if image_root is not None and not Path(image_root).is_dir():  # else every image would be "not found"
        raise UsageError(f"--image-root {image_root}: not a folder")
    with open_features(path) as reader:
        if len(reader) == 0:
            raise UsageError(f"{path} holds no images to plot")
        index = select_image(reader, image if image is not None else 0)
        info, arrays, metadata, dtype = reader.info(index), reader[index], reader.metadata, reader.dtype
    image_path = find_image(info["source"], path, metadata, image_root)
    picture, missing_reason = None, "image not found"
    if image_path is not None:
        try:
            located = locate_image(os.fspath(image_path))
            if located is None:
                raise ImageError("it vanished")
            picture = Image.fromarray(decode_source(located).rgb)
        except FpnxError as error:
            picture, missing_reason, image_path = None, f"cannot decode: {error}", None

    figure = _Figure(info["input_height"] / info["input_width"], len(arrays))
    figure.input_panel(picture, missing_reason, info)
    weights = metadata.get("weights", {}) or {}
    figure.info_panel([
        f"image {index}: {display_path(info['source'])}",
        f"original {info['height']}x{info['width']}, input {info['input_height']}x{info['input_width']}",
        f"weights {weights.get('name', '?')}{'' if weights.get('trained', True) else ' (untrained)'}",
        f"stored {dtype}",
        "maps: mean over channels,",
        "viridis from min to max",
        "histograms: all values, log count",
    ])
    for column, (level, array) in enumerate(arrays.items(), start=1):
        figure.level_panels(column, level, np.asarray(array, dtype=np.float64))
    try:
        figure.canvas.save(out, format="PNG")
    except OSError as error:
        raise UsageError(f"cannot write {out}: {os_error_reason(error)}") from None
    return PlotResult(
        out=str(out), width=figure.canvas.width, height=figure.canvas.height, index=index, source=info["source"],
        image_path=str(image_path) if image_path is not None else None, panels=figure.panels,
    )


class _Figure:
    """The canvas: a first row of the input and one colour map per level, a second of info and histograms."""

    def __init__(self, aspect: float, levels: int) -> None:
        self.map_height = int(min(MAX_PANEL_HEIGHT, max(MIN_PANEL_HEIGHT, round(PANEL_WIDTH * aspect))))
        self.row1_top = MARGIN + TITLE_HEIGHT
        self.row2_top = self.row1_top + self.map_height + SCALE_HEIGHT + MARGIN + TITLE_HEIGHT
        width = MARGIN + (1 + levels) * (PANEL_WIDTH + MARGIN)
        self.canvas = Image.new("RGB", (width, self.row2_top + HISTOGRAM_HEIGHT + 2 * TITLE_HEIGHT), BACKGROUND)
        self.draw = ImageDraw.Draw(self.canvas)
        self.font, self.small = _font(14), _font(11)
        self.panels: list[Panel] = []

    def title(self, left: int, top: int, text: str) -> None:
        fitted = _fit_text(self.draw, text, self.font, PANEL_WIDTH)
        self.draw.text((left, top - TITLE_HEIGHT + 3), fitted, fill=INK, font=self.font)

    def text(self, left: int, top: int, text: str, font, width: int = PANEL_WIDTH) -> None:
        self.draw.text((left, top), _fit_text(self.draw, text, font, width), fill=INK, font=font)

    def input_panel(self, picture: Image.Image | None, missing_reason: str, info: dict[str, Any]) -> None:
        left, top, height = MARGIN, self.row1_top, self.map_height
        box = (left, top, left + PANEL_WIDTH, top + height)
        title = f"input {info['height']}x{info['width']} -> {info['input_height']}x{info['input_width']}"
        self.title(left, top, title)
        if picture is not None:
            fit = min(PANEL_WIDTH / picture.width, height / picture.height)
            fitted = picture.resize((max(1, round(picture.width * fit)), max(1, round(picture.height * fit))),
                                    Image.Resampling.BILINEAR, reducing_gap=3.0)
            self.draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=MISSING)
            self.canvas.paste(fitted, (left + (PANEL_WIDTH - fitted.width) // 2, top + (height - fitted.height) // 2))
        else:
            self.draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=MISSING, outline=INK)
            self.text(left + 8, top + height // 2 - 16, missing_reason, self.font, PANEL_WIDTH - 16)
            self.text(left + 8, top + height // 2 + 4, display_path(info["source"]), self.small, PANEL_WIDTH - 16)
        self.panels.append(Panel("input", "image", box, title))

    def info_panel(self, lines: list[str]) -> None:
        """Under the input: what is plotted."""
        for k, line in enumerate(lines):
            self.text(MARGIN, self.row2_top + k * 17, line, self.small)
        box = (MARGIN, self.row2_top, MARGIN + PANEL_WIDTH, self.row2_top + HISTOGRAM_HEIGHT)
        self.panels.append(Panel("info", "info", box, "info"))

    def level_panels(self, column: int, level: str, array: np.ndarray) -> None:
        """The level's mean map with a colour bar of its range, and below it the histogram of all its values."""
        left = MARGIN + column * (PANEL_WIDTH + MARGIN)
        channels, map_h, map_w = array.shape
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(array)
            counts = finite.sum(axis=0)
            mean_map = np.where(finite, array, 0.0).sum(axis=0) / np.maximum(counts, 1)
            mean_map[counts == 0] = np.nan
        rgb, low, high = colormap(mean_map)
        text = f"{level}  {map_h}x{map_w}  (mean of {channels})"
        self.title(left, self.row1_top, text)
        box = (left, self.row1_top, left + PANEL_WIDTH, self.row1_top + self.map_height)
        self.canvas.paste(Image.fromarray(rgb).resize((PANEL_WIDTH, self.map_height), Image.Resampling.NEAREST),
                          box[:2])
        self.panels.append(Panel(level, "map", box, text))
        bar_top = box[3] + 4
        strip = np.broadcast_to(VIRIDIS[np.linspace(0, 255, PANEL_WIDTH).astype(np.int64)], (8, PANEL_WIDTH, 3))
        self.canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (left, bar_top))
        self.draw.text((left, bar_top + 10), _number(low), fill=INK, font=self.small)
        high_text = _number(high)
        self.draw.text((left + PANEL_WIDTH - self.draw.textlength(high_text, font=self.small), bar_top + 10),
                       high_text, fill=INK, font=self.small)

        box = (left, self.row2_top, left + PANEL_WIDTH, self.row2_top + HISTOGRAM_HEIGHT)
        values = array[finite]
        text = f"{level} values ({values.size} finite)"
        self.title(left, self.row2_top, text)
        _histogram(self.draw, box, values, self.small)
        self.panels.append(Panel(f"{level} histogram", "histogram", box, text))


def _histogram(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], values: np.ndarray, font) -> None:
    left, top, right, bottom = box
    plot_bottom = bottom - 16  # room for the range labels
    draw.line([(left, plot_bottom), (right - 1, plot_bottom)], fill=INK)
    draw.line([(left, top), (left, plot_bottom)], fill=INK)
    if values.size == 0:
        draw.text((left + 8, top + 8), "no finite values", fill=INK, font=font)
        return
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(low, high))
    scale = np.log1p(counts) / np.log1p(counts.max())
    bar_width = (right - left - 2) / HISTOGRAM_BINS
    for k, fraction in enumerate(scale):
        if counts[k] == 0:
            continue
        x0 = left + 1 + k * bar_width
        height = max(1, round(fraction * (plot_bottom - top - 2)))
        draw.rectangle([round(x0), plot_bottom - height, max(round(x0), round(x0 + bar_width) - 1), plot_bottom - 1],
                       fill=BAR)
    if low < 0 < high:  # mark zero
        x = left + 1 + (0 - low) / (high - low) * (right - left - 2)
        draw.line([(round(x), top), (round(x), plot_bottom)], fill=(200, 60, 60))
    draw.text((left, plot_bottom + 2), _number(low), fill=INK, font=font)
    text = _number(float(values.max()))
    draw.text((right - draw.textlength(text, font=font), plot_bottom + 2), text, fill=INK, font=font)
