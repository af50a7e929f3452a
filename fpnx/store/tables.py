"""Writing the skeleton of an fpnx file: root attributes, /blocks, and the /images and /failures tables.

Shared by the segment writer and by merge, so segments and finished files have one layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import schema
from .files import FailSafeFile
from .schema import Layout

# While writing, the partly filled last chunk of each block dataset must stay in the cache (so it is compressed
# once, when full) next to the one being written.
WRITE_CHUNK_CACHE_BYTES = 4 << 20


class NewFile:
    """A new fpnx file being written at ``path`` (a ``.tmp`` name: it becomes visible only when published).

    Written through :class:`FailSafeFile`: HDF5 never sees a failed write, and :meth:`check` and :meth:`close`
    raise the first one (an OSError with its errno) so the caller can throw the file away.
    """

    def __init__(self, path: Path, attrs: Mapping[str, Any]) -> None:
        self._raw = FailSafeFile(path)
        try:
            self.h5 = h5py.File(
                self._raw, "w", libver=schema.LIBVER, rdcc_nbytes=WRITE_CHUNK_CACHE_BYTES, rdcc_w0=1.0,
                alignment_threshold=schema.BLOCK_CHUNK_BYTES, alignment_interval=schema.CHUNK_ALIGNMENT,
            )
        except BaseException:
            self._raw.close()
            raise
        try:
            for name, value in attrs.items():
                self.h5.attrs[name] = value
            self.h5.create_group(schema.BLOCKS)
            self.check()
        except BaseException:
            self.abandon()
            raise

    @property
    def failure(self) -> OSError | None:
        return self._raw.failure

    @property
    def descriptor(self) -> int:
        return self._raw.descriptor

    def check(self) -> None:
        """Raise the first failed write, if any."""
        if self._raw.failure is not None:
            raise self._raw.failure

    def close(self) -> None:
        """Close, then raise the first failed write, if any (the file must then be thrown away)."""
        if not self._raw.closed:
            try:
                self.h5.close()
            finally:
                self._raw.close()
        self.check()

    def abandon(self) -> None:
        """Close without raising: the caller reports the failure and removes the file."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the failure is being reported by the caller already
            pass

    def __enter__(self) -> "NewFile":
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.close()
            return
        self.abandon()
        if self.failure is not None and rest and rest[0] is not self.failure:
            raise self.failure  # report the cause (errno) rather than whatever HDF5 made of it


def write_tables(
    h5: h5py.File,
    layout: Layout,
    sources: Sequence[str],
    columns: Mapping[str, np.ndarray],
    failures: Sequence[tuple[str, str]],
    pooled: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write /images (one row per source, columns as given; pooled vectors where given) and /failures."""
    images = h5.require_group(schema.IMAGES)  # a merge may have written the pooled vectors into it already
    _column(images, schema.SOURCE, _bytes_array([schema.encode_source(s) for s in sources]), schema.SOURCE_DTYPE)
    for name, dtype in layout.index_columns().items():
        _column(images, name, np.asarray(columns[name], dtype=dtype), dtype)
    for level, vectors in (pooled or {}).items():
        append_pooled(pooled_dataset(images, level, layout.channels[level]), vectors)
    group = h5.create_group(schema.FAILURES)
    _column(group, schema.SOURCE, _bytes_array([schema.encode_source(s) for s, _ in failures]), schema.SOURCE_DTYPE)
    reasons = np.array([schema.encode_reason(r) for _, r in failures] or [], dtype=object)
    _column(group, schema.REASON, reasons, schema.REASON_DTYPE)


def _bytes_array(values: list[bytes]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _column(group: h5py.Group, name: str, values: np.ndarray, dtype: Any) -> None:
    rows = len(values)
    group.create_dataset(
        name,
        shape=(rows,),
        maxshape=(None,),
        chunks=(max(1, min(rows, schema.INDEX_CHUNK_ROWS)),),
        dtype=dtype,
    )
    if rows:
        group[name][...] = values


def pooled_dataset(images: h5py.Group, level: str, channels: int) -> h5py.Dataset:
    """The empty, growable ``(0, C)`` float32 dataset of one level's pooled vectors, in chunks of
    :data:`~fpnx.store.schema.POOLED_CHUNK_ROWS` rows (32 KiB at 256 channels: small files stay small)."""
    return images.create_dataset(schema.pooled_column(level), shape=(0, channels), maxshape=(None, channels),
                                 chunks=(schema.POOLED_CHUNK_ROWS, channels), dtype=np.float32)


def append_pooled(dataset: h5py.Dataset, vectors: np.ndarray) -> None:
    start = dataset.shape[0]
    if len(vectors):
        dataset.resize((start + len(vectors), dataset.shape[1]))
        dataset[start:] = vectors
