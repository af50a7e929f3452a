"""``inspect_features()``: what an fpnx feature file (or ``.parts`` folder) holds, returned as data.

Summary (images, failures, weights, preprocessing, dtype, levels, size on disk), a table per level, optional
rows per image and optional per-level statistics computed by streaming one image at a time in float64. Links
inside the file (soft, external, virtual or external-storage datasets) are listed, never followed: the reader
refuses them, and :func:`find_links` only looks at link records.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import StoreError, UsageError
from .images import display_path
from .store import open_features
from .report import LevelReport, level_reports
from .store.inputs import describe_input
from .store.reader import FeatureReader
from .store.storefile import open_store_file

# Elements converted to float64 at a time while streaming statistics (8 MiB of float64).
STATS_CHUNK = 1 << 20
# At most this many links are listed (a count of the rest follows).
MAX_LINKS = 50


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
class LevelStats:
    """Statistics of every stored value of a level; mean/std/min/max over the finite ones."""

    name: str
    count: int  # values, finite or not
    mean: float | None
    std: float | None  # population standard deviation (numpy's default, ddof=0)
    min: float | None
    max: float | None
    zero_fraction: float | None  # values exactly 0, over count
    nan_count: int
    inf_count: int


@dataclass
class LinkInfo:
    """A link record or dataset in the file that points outside its own data; listed, never followed."""

    path: str  # where in the file, e.g. /images/source
    kind: str  # soft link, external link, user-defined link, virtual dataset, external storage
    target: str


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
    levels: list[LevelReport]
    size_on_disk: int
    files: int  # HDF5 files holding the images: 1 for a finished file, the committed segments of a .parts folder
    created: str | None
    fpnx_version: str | None
    command: str | None
    device: str | None
    links: list[LinkInfo]
    selected: list[ImageInfo] | None = None  # --images (all) or --image (one)
    stats: list[LevelStats] | None = None  # --stats: over the selected images, or all

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
    ``stats``. ``stats`` streams the selected images (all by default) to compute :class:`LevelStats`.
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
        level_stats = level_statistics(reader, indices) if stats else None
        metadata = reader.metadata
        settings = reader.attrs.get("settings", {})
        weights = metadata.get("weights") or settings.get("weights") or {}
        is_parts = path.is_dir()
        files = describe_input(path).files
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
            levels=_levels(reader, infos, files),
            size_on_disk=_size_on_disk(path),
            files=len(files),
            created=metadata.get("created"),
            fpnx_version=metadata.get("fpnx_version"),
            command=metadata.get("command"),
            device=metadata.get("device"),
            links=_links_of(path),
            selected=selected_rows,
            stats=level_stats,
        )


def _open(path: Path) -> FeatureReader:
    """open_features, with the links of an untrusted file named in the error."""
    try:
        return open_features(path)
    except StoreError as error:
        links = _links_of(path) if path.exists() else []
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
    sizes = [(info["input_height"], info["input_width"]) for info in infos]
    reports = level_reports(sizes, reader.strides, reader.channels, np.dtype(reader.dtype).itemsize)
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
    total = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            total += os.path.getsize(entry.path)
    return total


# -- statistics -------------------------------------------------------------------------------------------------


class _Accumulator:
    """Count, mean and sum of squared deviations (Chan et al.'s pairwise update, float64), min, max, zeros."""

    def __init__(self) -> None:
        self.count = 0
        self.finite = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.zeros = 0
        self.nans = 0
        self.infs = 0

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        for start in range(0, flat.size, STATS_CHUNK):
            self._add_chunk(flat[start : start + STATS_CHUNK].astype(np.float64))

    def _add_chunk(self, chunk: np.ndarray) -> None:
        self.count += chunk.size
        self.zeros += int(np.count_nonzero(chunk == 0))
        finite_mask = np.isfinite(chunk)
        finite = chunk if finite_mask.all() else chunk[finite_mask]
        if finite.size != chunk.size:
            self.nans += int(np.count_nonzero(np.isnan(chunk)))
            self.infs += int(np.count_nonzero(np.isinf(chunk)))
        n = finite.size
        if n == 0:
            return
        mean = float(finite.mean())
        m2 = float(np.square(finite - mean).sum())
        total = self.finite + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.finite * n / total
        self.finite = total
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))

    def result(self, name: str) -> LevelStats:
        has_values = self.finite > 0
        return LevelStats(
            name=name,
            count=self.count,
            mean=self.mean if has_values else None,
            std=math.sqrt(self.m2 / self.finite) if has_values else None,
            min=self.min if has_values else None,
            max=self.max if has_values else None,
            zero_fraction=self.zeros / self.count if self.count else None,
            nan_count=self.nans,
            inf_count=self.infs,
        )


def level_statistics(reader: FeatureReader, indices: Iterable[int] | None = None) -> list[LevelStats]:
    """Per-level :class:`LevelStats` over the images at ``indices`` (all by default), one image in memory at a time."""
    accumulators = {name: _Accumulator() for name in reader.levels}
    for i in range(len(reader)) if indices is None else indices:
        for name, array in reader[i].items():
            accumulators[name].add(array)
    return [accumulators[name].result(name) for name in reader.levels]


# -- links ------------------------------------------------------------------------------------------------------


def _links_of(path: Path) -> list[LinkInfo]:
    """The links of the file, or of every committed segment of a .parts folder."""
    if path.is_dir():
        files = sorted(path.glob("seg-*.h5"))
    else:
        files = [path]
    found: list[LinkInfo] = []
    for file in files:
        for link in find_links(file):
            if path.is_dir():
                link = dataclasses.replace(link, path=f"{file.name}:{link.path}")
            found.append(link)
    if len(found) > MAX_LINKS:
        extra = len(found) - MAX_LINKS
        found = found[:MAX_LINKS] + [LinkInfo("...", "more", f"{extra} more not listed")]
    return found


def find_links(path: str | os.PathLike[str]) -> list[LinkInfo]:
    """Every soft, external or user-defined link and every virtual or external-storage dataset in an HDF5 file.

    Only link records are read: no link is followed, no external file is opened. Hard links are walked
    (each group once). A file that HDF5 cannot open gives an empty list (the reader reports why).
    """
    try:
        h5 = h5py.File(path, "r", locking=False)
    except (OSError, ValueError):
        return []
    found: list[LinkInfo] = []
    seen: set[int] = set()

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            where = f"{prefix}/{name}"
            try:
                link = group.get(name, getlink=True)
            except (KeyError, OSError, ValueError):
                continue
            if isinstance(link, h5py.SoftLink):
                found.append(LinkInfo(where, "soft link", link.path))
            elif isinstance(link, h5py.ExternalLink):
                found.append(LinkInfo(where, "external link", f"{link.filename}:{link.path}"))
            elif isinstance(link, h5py.HardLink):
                try:
                    obj = group[name]
                except (KeyError, OSError, ValueError):
                    continue
                if isinstance(obj, h5py.Group):
                    address = h5py.h5o.get_info(obj.id).addr
                    if address not in seen:
                        seen.add(address)
                        walk(obj, where)
                elif isinstance(obj, h5py.Dataset):
                    if obj.is_virtual:
                        targets = sorted({source.file_name for source in obj.virtual_sources()})
                        found.append(LinkInfo(where, "virtual dataset", ", ".join(targets)))
                    elif obj.external:
                        targets = [os.fsdecode(entry[0]) for entry in obj.external]
                        found.append(LinkInfo(where, "external storage", ", ".join(targets)))
            else:
                found.append(LinkInfo(where, "user-defined link", type(link).__name__))

    try:
        seen.add(h5py.h5o.get_info(h5.id).addr)
        walk(h5, "")
    except (OSError, KeyError, ValueError, RuntimeError):
        pass  # a damaged file: the reader names the damage
    finally:
        h5.close()
    return found
