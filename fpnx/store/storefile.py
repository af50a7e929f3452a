"""Open one fpnx HDF5 file (finished output or segment) safely: checked, read-only, links never followed.

Everything that can go wrong with a file someone hands us (not HDF5, truncated, another format, a newer
version, missing pieces, soft or external links) becomes one ``StoreError`` line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import MissingFileError, StoreError, first_line
from . import schema
from .chunks import external_storage
from .parts import in_parts_folder, refers_to_own_data_file
from .schema import Layout

# Per open block dataset; enough to keep the chunk shared by two neighbouring images while reading in order.
READ_CHUNK_CACHE_BYTES = 2 << 20


@contextmanager
def problems_as_store_errors(path: Path, doing: str = "read") -> Iterator[None]:
    """Turn h5py's and numpy's complaints about a damaged file into one line naming the file."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
        raise StoreError(f"cannot {doing} {path}: damaged fpnx feature file ({first_line(error)})") from None


def open_h5(path: Path) -> h5py.File:
    """An HDF5 file opened read-only, or StoreError saying why it is not one."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not an fpnx feature file")
    try:
        return open_read_only(path, rdcc_nbytes=READ_CHUNK_CACHE_BYTES)
    except OSError as error:
        if "locking flag values" in str(error):
            raise StoreError(f"{path} is open in this process with HDF5 file-locking settings fpnx cannot match; open "
                             f"it there with h5py.File(path, 'r') (the default) to read it with fpnx too") from None
        if not h5py.is_hdf5(path):
            raise StoreError(f"{path} is not an fpnx feature file (not HDF5)") from None
        raise StoreError(f"{path} is a damaged HDF5 file, perhaps truncated ({first_line(error, 'unreadable')})") from None


def open_read_only(path: Path, **options: Any) -> h5py.File:
    """``h5py.File(path, "r")`` with HDF5's default file locking, as a user's own ``h5py.File`` opens it (HDF5
    refuses a second open of a file in one process with other locking settings); else without locks (they fail on
    some network file systems, or the file is open here without them), else with locks forced on (open so here)."""
    try:
        return h5py.File(path, "r", **options)
    except OSError as first:
        for locking in (False, True):  # where locks fail, or as the file is already open here
            try:
                return h5py.File(path, "r", locking=locking, **options)
            except OSError:
                pass
        raise first


def hard_child(group: h5py.Group, name: str, kind: type, path: Path) -> Any:
    """``group[name]`` if it is a hard link to a ``kind`` holding its own data; links elsewhere are refused."""
    link = group.get(name, getlink=True)
    if link is None:
        raise StoreError(f"{path} is a damaged fpnx feature file: {_where(group, name)} is missing")
    if not isinstance(link, h5py.HardLink):
        raise StoreError(f"{path} is not a trusted fpnx feature file: {_where(group, name)} is a {type(link).__name__}")
    obj = group[name]
    if not isinstance(obj, kind):
        raise StoreError(f"{path} is a damaged fpnx feature file: {_where(group, name)} is not a {kind.__name__.lower()}")
    if isinstance(obj, h5py.Dataset) and (obj.is_virtual or (obj.external and not _own_data_file(obj, path))):
        # Virtual datasets and external raw storage read other files: never from a file someone handed us.
        raise StoreError(f"{path} is not a trusted fpnx feature file: {_where(group, name)} reads data from other files")
    return obj


def _own_data_file(dataset: h5py.Dataset, path: Path) -> bool:
    """True for a committed segment's block whose bytes are in its run's data files (and nowhere else)."""
    if not in_parts_folder(path):
        return False
    names = {name for name, _, _ in external_storage(dataset)}
    missing = [name for name in names if not os.path.exists(name)]
    if missing:  # deleted, or the parts folder was moved away from it
        raise StoreError(f"{path} keeps its data in {os.fsdecode(missing[0])}, which is missing (a folder moved "
                         f"since: running the same extract command again finds its data where it is now)")
    return refers_to_own_data_file(path, names)


def _where(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def plain(value: Any) -> Any:
    """An attribute value as plain Python (str, int, float, lists of them)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()]
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Index:
    """The /images and /failures tables of one or more files, in memory."""

    sources: list[str]
    columns: dict[str, np.ndarray]  # height, width, ..., segment, offset_<level>: each of length len(sources)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)

    @classmethod
    def empty(cls, layout: Layout) -> "Index":
        names = layout.index_columns()
        return cls([], {name: np.zeros(0, dtype) for name, dtype in names.items()}, [])


@dataclass
class StoreFile:
    """One checked fpnx file, open read-only."""

    path: Path
    h5: h5py.File
    layout: Layout
    settings: dict[str, Any]
    metadata: dict[str, Any]
    attrs: dict[str, Any]
    _blocks_group: h5py.Group | None = None
    _block_groups: dict[int, h5py.Group] = field(default_factory=dict)  # looked up once: files hold thousands

    def close(self) -> None:
        self._block_groups.clear()
        self._blocks_group = None
        self.h5.close()

    def read_index(self) -> Index:
        """The whole /images table and /failures."""
        with problems_as_store_errors(self.path):
            sources = self._sources()
            return Index(sources, self._columns(len(sources)), self._failures())

    def image_count(self) -> int:
        """Rows of /images, without reading them."""
        with problems_as_store_errors(self.path):
            images = hard_child(self.h5, schema.IMAGES, h5py.Group, self.path)
            return len(hard_child(images, schema.SOURCE, h5py.Dataset, self.path))

    @property
    def parts_id(self) -> str | None:
        """The id of the ``.parts`` folder (or shard) this file absorbed last, if any (see docs/format.md)."""
        value = self.attrs.get(schema.ATTR_PARTS_ID)
        return None if value is None else str(value)

    def read_sources(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Only what a resuming writer needs: the stored sources and the failures."""
        with problems_as_store_errors(self.path):
            return self._sources(), self._failures()

    def read_pooled(self, level: str) -> np.ndarray:
        """``(N, C)`` float32: the pooled vector of each stored image at ``level``, in row order (one read)."""
        with problems_as_store_errors(self.path):
            images = hard_child(self.h5, schema.IMAGES, h5py.Group, self.path)
            dataset = hard_child(images, schema.pooled_column(level), h5py.Dataset, self.path)
            expected = (self.image_count(), self.layout.channels[level])
            if dataset.shape != expected or dataset.dtype != np.float32:
                raise StoreError(f"{self.path} is a damaged fpnx feature file: {dataset.name} is not {expected} float32")
            return dataset[...]

    def _sources(self) -> list[str]:
        images = hard_child(self.h5, schema.IMAGES, h5py.Group, self.path)
        return [_decode_source(raw, self.path) for raw in self._column(images, schema.SOURCE)]

    def _columns(self, count: int) -> dict[str, np.ndarray]:
        images = hard_child(self.h5, schema.IMAGES, h5py.Group, self.path)
        wanted = self.layout.index_columns()
        columns = {}
        for name, dtype in wanted.items():
            values = self._column(images, name)
            if len(values) != count or values.dtype.kind not in "iuf":
                raise StoreError(f"{self.path} is a damaged fpnx feature file: /images/{name} does not fit /images/source")
            columns[name] = values.astype(dtype, copy=False)
        if count and (
            min(columns[schema.INPUT_HEIGHT].min(), columns[schema.INPUT_WIDTH].min()) < 1
            or min((columns[schema.offset_column(level)].min() for level in self.layout.levels if self.layout.maps),
                   default=0) < 0
        ):
            raise StoreError(f"{self.path} is a damaged fpnx feature file: negative sizes or offsets in /images")
        return columns

    def _failures(self) -> list[tuple[str, str]]:
        group = hard_child(self.h5, schema.FAILURES, h5py.Group, self.path)
        failed = self._column(group, schema.SOURCE)
        reasons = self._column(group, schema.REASON)
        if len(failed) != len(reasons):
            raise StoreError(f"{self.path} is a damaged fpnx feature file: /failures columns differ in length")
        return [(_decode_source(raw, self.path), _text(reason)) for raw, reason in zip(failed, reasons)]

    def _column(self, group: h5py.Group, name: str) -> np.ndarray:
        dataset = hard_child(group, name, h5py.Dataset, self.path)
        if dataset.ndim != 1:
            raise StoreError(f"{self.path} is a damaged fpnx feature file: {dataset.name} is not 1-D")
        return dataset[...]

    def block_names(self) -> list[str]:
        with problems_as_store_errors(self.path):
            return list(self._blocks().keys())

    def block_dataset(self, block: int, level: str) -> h5py.Dataset:
        """The flat dataset of ``level`` in block ``block``, checked to be a plain 1-D dataset of the stored dtype."""
        with problems_as_store_errors(self.path):
            group = self._block_groups.get(block)
            if group is None:
                group = hard_child(self._blocks(), schema.block_name(block), h5py.Group, self.path)
                self._block_groups[block] = group
            dataset = hard_child(group, level, h5py.Dataset, self.path)
            if dataset.ndim != 1 or dataset.dtype != np.dtype(self.layout.dtype):
                raise StoreError(
                    f"{self.path} is a damaged fpnx feature file: {dataset.name} is not a 1-D {self.layout.dtype} dataset"
                )
            return dataset

    def _blocks(self) -> h5py.Group:
        if self._blocks_group is None:
            self._blocks_group = hard_child(self.h5, schema.BLOCKS, h5py.Group, self.path)
        return self._blocks_group


def _decode_source(raw: Any, path: Path) -> str:
    if isinstance(raw, str):  # written as text by some other tool: accept it as is
        return raw
    if not isinstance(raw, bytes):
        raise StoreError(f"{path} is a damaged fpnx feature file: a source is not a string")
    return schema.decode_source(raw)


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def open_store_file(path: Path) -> StoreFile:
    """Open and check one fpnx file: format name and version first, then the attributes the reader needs."""
    h5 = open_h5(path)
    try:
        with problems_as_store_errors(path):
            return _checked(path, h5)
    except BaseException:
        h5.close()
        raise


def _checked(path: Path, h5: h5py.File) -> StoreFile:
    attrs = {name: plain(h5.attrs[name]) for name in h5.attrs}
    name = attrs.get(schema.ATTR_FORMAT)
    if name is None:
        raise StoreError(f"{path} is not an fpnx feature file (its root has no '{schema.ATTR_FORMAT}' attribute)")
    if name != schema.FORMAT_NAME:
        raise StoreError(f"{path} is not an fpnx feature file (its format is {name!r})")
    version = attrs.get(schema.ATTR_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise StoreError(f"{path} is a damaged fpnx feature file: format_version is {version!r}")
    maps = attrs.get(schema.ATTR_MAPS, 1) != 0
    if version > schema.POOLED_ONLY_VERSION or (version == schema.POOLED_ONLY_VERSION and maps):
        raise StoreError(
            f"{path} was written by a newer fpnx (format_version {version}; this fpnx reads up to "
            f"{schema.POOLED_ONLY_VERSION}, and {schema.POOLED_ONLY_VERSION} only for files without maps); "
            f"upgrade fpnx to read it"
        )
    if version < 1 or not maps and version != schema.POOLED_ONLY_VERSION:
        raise StoreError(f"{path} is a damaged fpnx feature file: format_version is {version!r}")
    missing = [key for key in (schema.ATTR_LEVELS, schema.ATTR_STRIDES, schema.ATTR_CHANNELS, schema.ATTR_DTYPE,
                               schema.ATTR_COMPRESSION, schema.ATTR_SETTINGS, schema.ATTR_METADATA) if key not in attrs]
    if missing:
        raise StoreError(f"{path} is a damaged fpnx feature file: no root attribute {missing[0]!r}")
    levels = attrs[schema.ATTR_LEVELS]
    levels = [levels] if isinstance(levels, str) else levels
    strides = _as_list(attrs[schema.ATTR_STRIDES])
    channels = _as_list(attrs[schema.ATTR_CHANNELS])
    if not (len(levels) == len(strides) == len(channels)):
        raise StoreError(f"{path} is a damaged fpnx feature file: levels, strides and channels differ in length")
    try:
        layout = Layout.checked(
            levels,
            dict(zip(levels, channels)),
            dict(zip(levels, strides)),
            attrs[schema.ATTR_DTYPE],
            attrs[schema.ATTR_COMPRESSION],
            attrs.get(schema.ATTR_POOL),
            maps,
        )
        settings = json.loads(attrs[schema.ATTR_SETTINGS])
        metadata = json.loads(attrs[schema.ATTR_METADATA])
    except (ValueError, TypeError) as error:
        raise StoreError(f"{path} is a damaged fpnx feature file: {error}") from None
    if not isinstance(settings, dict) or not isinstance(metadata, dict):
        raise StoreError(f"{path} is a damaged fpnx feature file: settings or metadata is not a JSON object")
    recorded = schema.normalize(layout.to_settings())
    for key in (*recorded, "pool", "maps"):
        if settings.get(key) != recorded.get(key):  # the plain attributes are what the reader obeys; they must agree
            raise StoreError(f"{path} is a damaged fpnx feature file: settings and attributes disagree on {key!r}")
    attrs[schema.ATTR_SETTINGS] = settings
    attrs[schema.ATTR_METADATA] = metadata
    attrs[schema.ATTR_LEVELS] = list(levels)
    return StoreFile(path, h5, layout, settings, metadata, attrs)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def combine_failures(lists: list[list[tuple[str, str]]], stored: set[str]) -> list[tuple[str, str]]:
    """One failure per source with its latest reason, in first-seen order; stored sources drop their failures."""
    latest: dict[str, str] = {}
    for failures in lists:
        for source, reason in failures:
            if source not in stored:
                latest[source] = reason
    return list(latest.items())
