"""``inspect_features()``: what an fpnx feature file (or ``.parts`` folder) holds, returned as data.

Summary (images, failures, weights, preprocessing, dtype, levels, size on disk), a table per level, optional
rows per image and optional per-level statistics computed by streaming one image at a time in float64. Links
inside the file (soft, external, virtual or external-storage datasets) are listed, never followed: the reader
refuses them, and :func:`~fpnx.report.links.find_links` only looks at link records.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError, UsageError, display_path
from ..store import FeatureReader, open_features
from ..store.location import locate_store
from ..store.parts import early_merge_path, output_for_parts
from ..store.storefile import open_store_file
from .levels import LevelReport, level_reports
from .links import LinkInfo, links_of
from .statistics import LevelStats, level_statistics, pooled_statistics


@dataclass
class ImageInfo:
    index: int
    source: str
    height: int  # original, after EXIF orientation
    width: int
    input_height: int  # resized network input, before padding
    input_width: int
    scale: float


@dataclass
class Inspection:
    """What ``fpnx inspect --json`` prints (see docs/inspect-bench.md)."""

    path: str
    kind: str  # "file" or "parts" (the committed part of an unfinished or running run)
    format_version: int | None
    images: int
    failures: list[tuple[str, str]]
    weights: dict[str, Any]
    trained: bool | None
    preprocessing: dict[str, Any]
    precision: str | None
    dtype: str
    compression: str
    pool: str | None  # "avg" or "max" where pooled vectors are stored (--pool)
    maps: bool  # False for a file written with --no-maps: pooled vectors only
    levels: list[LevelReport]
    size_on_disk: int
    files: int  # HDF5 files holding the images: 1 for a finished file, the committed segments of a .parts folder
    created: str | None
    fpnx_version: str | None
    command: str | None
    device: str | None
    links: list[LinkInfo]
    selected: list[ImageInfo] | None = None  # --images (all) or --image (one)
    stats: list[LevelStats] | None = None  # --stats: over the selected images, or all (pooled vectors without maps)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["failures"] = [{"source": source, "reason": reason} for source, reason in self.failures]
        for level in data["levels"]:
            for key in ("min_hw", "median_hw", "max_hw"):
                level[key] = list(level[key])
        return data


def inspect_features(
    path: str | os.PathLike[str],
    *,
    images: bool = False,
    image: int | str | None = None,
    stats: bool = False,
) -> Inspection:
    """Describe the fpnx file or ``.parts`` folder at ``path``.

    ``images`` lists every image; ``image`` (a position or a source) selects one, for the listing and for
    ``stats``. ``stats`` streams the selected images (all by default) to compute :class:`LevelStats`: of the maps,
    or of the pooled vectors in a file of vectors only (``maps`` False).
    A missing, non-HDF5, damaged or untrusted file raises :class:`StoreError` with one line.
    """
    path = Path(path)
    reader = _open(path)
    with reader:
        selected_rows = None
        indices: list[int] | None = None
        if image is not None:
            indices = [select_image(reader, image)]
        if images or image is not None:
            targets = indices if indices is not None else range(len(reader))
            selected_rows = [_image_info(reader, i) for i in targets]
        infos = [reader.info(i) for i in range(len(reader))]
        level_stats = None
        if stats:  # of the maps, or in a file of vectors only (--no-maps), of the pooled vectors
            level_stats = (level_statistics if reader.has_maps else pooled_statistics)(reader, indices)
        metadata = reader.metadata
        settings = reader.attrs.get("settings", {})
        weights = metadata.get("weights") or settings.get("weights") or {}
        is_parts = path.is_dir()
        files = locate_store(path).files
        return Inspection(
            path=str(path),
            kind="parts" if is_parts else "file",
            format_version=reader.attrs.get("format_version"),
            images=len(reader),
            failures=reader.failures,
            weights={key: weights.get(key) for key in
                     ("name", "framework", "depth", "trained", "body_trained", "fpn_trained", "sha256", "bn_eps",
                      "stride_in_1x1", "url")},
            trained=weights.get("trained"),
            preprocessing=metadata.get("preprocessing") or settings.get("preprocessing") or {},
            precision=metadata.get("precision"),
            dtype=reader.dtype,
            compression=reader.layout.compression,
            pool=reader.pool,
            maps=reader.has_maps,
            levels=_levels(reader, infos, files),
            size_on_disk=_size_on_disk(path),
            files=len(files),
            created=metadata.get("created"),
            fpnx_version=metadata.get("fpnx_version"),
            command=metadata.get("command"),
            device=metadata.get("device"),
            links=links_of(path),
            selected=selected_rows,
            stats=level_stats,
        )


def _open(path: Path) -> FeatureReader:
    """open_features, with the links of an untrusted file named in the error."""
    try:
        return open_features(path)
    except StoreError as error:
        links = links_of(path) if path.exists() else []
        if not links:
            raise
        raise StoreError(f"{error}; links in it (listed, not followed): {_describe_links(links)}") from None


def _describe_links(links: Sequence[LinkInfo]) -> str:
    return ", ".join(f"{display_path(link.path)} -> {display_path(link.target)} ({link.kind})" for link in links)


def select_image(reader: FeatureReader, key: int | str) -> int:
    """The position of ``key``: a stored source, else a position (negative counts from the end)."""
    if isinstance(key, str):
        if key in reader:
            return reader.index_of(key)
        try:
            position = int(key)
        except ValueError:
            raise UsageError(f"no image {key!r} in {reader.path} (give a position 0..{len(reader) - 1} or a stored source)") from None
    else:
        position = int(key)
    if not -len(reader) <= position < len(reader):
        raise UsageError(f"image {position} is out of range: {reader.path} holds {len(reader)} images")
    return position % len(reader)


def _image_info(reader: FeatureReader, i: int) -> ImageInfo:
    info = reader.info(i)
    return ImageInfo(i, info["source"], info["height"], info["width"], info["input_height"], info["input_width"],
                     info["scale"])


def _levels(reader: FeatureReader, infos: list[dict[str, Any]], files: list[Path]) -> list[LevelReport]:
    sizes = collections.Counter((info["input_height"], info["input_width"]) for info in infos)
    itemsize = np.dtype(reader.dtype).itemsize if reader.has_maps else 0
    reports = level_reports(sizes, reader.strides, reader.channels, itemsize)
    stored = _stored_bytes(files, reader.levels)
    for report in reports:
        report.stored_bytes = stored.get(report.name)
    return reports


def _stored_bytes(files: list[Path], levels: list[str]) -> dict[str, int]:
    """Bytes each level's block datasets take in the files (0 for a level without any), through checked opens."""
    totals = dict.fromkeys(levels, 0)
    for file in files:
        store = open_store_file(file)
        try:
            for block in store.block_names():
                for level in levels:
                    totals[level] += store.block_dataset(int(block), level).id.get_storage_size()
        finally:
            store.close()
    return totals


def _size_on_disk(path: Path) -> int:
    if not path.is_dir():
        return os.path.getsize(path)
    data_file = early_merge_path(output_for_parts(path) or path)
    total = os.path.getsize(data_file) if data_file.is_file() else 0  # where segments may keep their blocks
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            total += os.path.getsize(entry.path)
    return total
