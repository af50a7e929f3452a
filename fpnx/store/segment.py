"""The open segment of a run: ``seg-NNNNNN.h5.tmp``, filled image by image, then published by commit."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import schema
from .chunks import chunk_addresses
from .files import publish, remove_file
from .merge import MergedFile
from .parts import segment_path, tmp_path_for
from .schema import ImageRecord, Layout
from .tables import NewFile, write_tables


class OpenSegment:
    """A segment being written. Feature arrays go to disk as they arrive, in whole chunks (so each chunk is
    compressed once); what waits in memory is less than one chunk per level, plus the small index rows.

    Its one block is named after the segment number, so a committed segment is itself a valid fpnx file.
    With ``data_file`` (a run's early merge; uncompressed blocks only) the block's chunks are written there, as
    that file's own block, and the segment's block datasets refer to those bytes (HDF5 external storage): each
    byte is written to the disk once. The data file is made durable before the segment is committed.
    """

    def __init__(self, parts: Path, number: int, layout: Layout, attrs: Mapping[str, Any],
                 data_file: MergedFile | None = None) -> None:
        self.number = number
        self.path = segment_path(parts, number)
        self.tmp = tmp_path_for(self.path)
        self.layout = layout
        self.opened_at = time.monotonic()
        self.nbytes = 0
        self.sources: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self._rows: dict[str, list[Any]] = {name: [] for name in layout.index_columns()}
        self._pooled: dict[str, list[np.ndarray]] = {level: [] for level in layout.levels} if layout.pool else {}
        self._file: NewFile | None = NewFile(self.tmp, attrs)
        self._data_file = data_file
        self.data_block: int | None = None  # the block's number in data_file
        self._levels: dict[str, _LevelData] = {}
        block = self._block
        if data_file is not None:
            try:
                self.data_block, data_group = data_file.open_block()
            except BaseException:
                self.discard()
                raise
            block = lambda: data_group  # noqa: E731
        self._levels = {level: _LevelData(level, layout, block) for level in layout.levels if layout.maps}
        # False while an add() runs: one cut short (Ctrl-C) may leave queued arrays and offsets out of step,
        # and such a segment must be thrown away, never committed.
        self.consistent = True

    @property
    def image_count(self) -> int:
        return len(self.sources)

    def add(self, record: ImageRecord, features: Mapping[str, np.ndarray],
            pooled: Mapping[str, np.ndarray] | None = None) -> None:
        """Append one image's arrays to the block, then its index row (and pooled vectors)."""
        self.consistent = False
        offsets = {}
        for level, level_data in self._levels.items():
            flat = np.ascontiguousarray(features[level]).reshape(-1)
            offsets[level] = level_data.append(flat)
            self.nbytes += flat.nbytes
        self._live_file().check()  # a failed write ends the segment before its row is recorded
        if self._data_file is not None:
            self._data_file.check()
        self.sources.append(record.source)
        row = {
            schema.HEIGHT: record.height,
            schema.WIDTH: record.width,
            schema.INPUT_HEIGHT: record.input_height,
            schema.INPUT_WIDTH: record.input_width,
            schema.SCALE: record.scale,
            schema.BLOCK: self.number if self.layout.maps else 0,
        }
        row.update({schema.offset_column(level): offset for level, offset in offsets.items()})
        for name, value in row.items():
            self._rows[name].append(value)
        for level, vectors in self._pooled.items():
            vectors.append(np.array(pooled[level], dtype=np.float32))
            self.nbytes += vectors[-1].nbytes
        self.consistent = True

    def add_failure(self, source: str, reason: str) -> None:
        self.failures.append((source, reason))

    def commit(self) -> Path:
        """Write the rest and the index, close, fsync, rename into place. The segment is never touched again."""
        file = self._live_file()
        if not self.consistent:
            raise ValueError(f"segment {self.path} was interrupted while adding an image and cannot be committed")
        for level_data in self._levels.values():
            level_data.finish()
        if self._data_file is not None:
            self._refer_to_data_file(self._data_file)
        pooled = {level: np.stack(vectors) if vectors else np.zeros((0, self.layout.channels[level]), np.float32)
                  for level, vectors in self._pooled.items()}
        write_tables(file.h5, self.layout, self.sources, self._rows, self.failures, pooled)
        file.close()
        self._file = None
        if self._data_file is not None:
            self._data_file.hold()
        publish(self.tmp, self.path)
        return self.path

    @property
    def failure(self) -> tuple[Path, OSError] | None:
        """The file whose write failed first (this segment or its data file) and the error; None if none did."""
        if self._file is not None and self._file.failure is not None:
            return self.path, self._file.failure
        if self._data_file is not None and self._data_file.failure is not None:
            return self._data_file.path, self._data_file.failure
        return None

    def discard(self) -> None:
        """Drop the segment after a failure: close what HDF5 holds, remove the ``.tmp`` file."""
        self._levels.clear()
        if self.data_block is not None:
            try:
                self._data_file.drop_block(self.data_block)
            except Exception:  # noqa: BLE001 - a data file that failed is being reported already
                pass
            self.data_block = None
        if self._file is not None:
            self._file.abandon()
            self._file = None
        remove_file(self.tmp)

    def _live_file(self) -> NewFile:
        if self._file is None:
            raise ValueError(f"segment {self.path} is already committed or discarded")
        return self._file

    def _refer_to_data_file(self, data_file: MergedFile) -> None:
        """Make the written chunks durable in ``data_file``, then give this segment's block datasets that refer
        to them (raises the data file's first failed write: the segment is then thrown away)."""
        data_file.write_back()
        name = os.fsencode(os.path.realpath(data_file.path))
        for level, level_data in self._levels.items():
            pieces = level_data.stored_pieces()
            if pieces is None:  # no image had maps in this segment
                continue
            external = [(name, address, size) for address, size in pieces]
            self._block().create_dataset(level, shape=(level_data.length,), dtype=self.layout.dtype,
                                         external=external)

    def _block(self) -> h5py.Group:
        return self._live_file().h5[schema.BLOCKS].require_group(schema.block_name(self.number))


class _LevelData:
    """One level's flat dataset in the open block, written a whole number of chunks at a time.

    The dataset is created when the first full chunk is ready, or at commit: a block smaller than one chunk
    then gets a single chunk of exactly its size. Uncompressed chunks go to the file as they are
    (``write_direct_chunk``: no pass through HDF5's chunk cache); HDF5 compresses the others.
    """

    def __init__(self, level: str, layout: Layout, block: Callable[[], h5py.Group]) -> None:
        self._level = level
        self._layout = layout
        self._block = block
        self._chunk = layout.chunk_elements
        self._direct = layout.compression == "none"
        self._dataset: h5py.Dataset | None = None
        self._partial = np.empty(self._chunk, np.dtype(layout.dtype))  # the chunk being filled
        self._partial_size = 0
        self._written = 0

    def append(self, flat: np.ndarray) -> int:
        """Queue one image's flat array; return its offset in the dataset.

        The array goes to disk in place where it can (its whole chunks, written straight from it): only what
        completes the chunk being filled, and its own incomplete last chunk, are copied.
        """
        offset = self._written + self._partial_size
        data = flat
        if self._partial_size:
            head, data = data[: self._chunk - self._partial_size], data[self._chunk - self._partial_size :]
            self._partial[self._partial_size : self._partial_size + head.size] = head
            self._partial_size += head.size
            if self._partial_size < self._chunk:
                return offset
            self._write(self._partial)
            self._partial_size = 0
        whole = data.size - data.size % self._chunk
        step = self._chunk if self._direct else whole  # direct writes take one chunk each, HDF5 takes them all
        for start in range(0, whole, step or 1):
            self._write(data[start : start + step])
        rest = data.size - whole
        self._partial[:rest] = data[whole:]  # the caller may reuse its array
        self._partial_size = rest
        return offset

    @property
    def length(self) -> int:
        return self._written + self._partial_size

    def stored_pieces(self) -> list[tuple[int, int]] | None:
        """(file address, bytes) of the written data, contiguous runs of chunks joined; None before any write.
        Only for uncompressed datasets, after :meth:`finish`."""
        if self._dataset is None:
            return None
        item = self._dataset.dtype.itemsize
        chunk = self._dataset.chunks[0]
        count = -(-self._written // chunk)
        addresses = chunk_addresses(self._dataset.id, chunk, chunk * item, count)
        if addresses is None:
            raise OSError(errno.EIO, f"HDF5 did not store {self._dataset.name} as whole chunks")
        pieces: list[tuple[int, int]] = []
        for j, address in enumerate(addresses.tolist()):
            size = min(chunk, self._written - j * chunk) * item
            if pieces and pieces[-1][0] + pieces[-1][1] == address:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + size)
            else:
                pieces.append((address, size))
        return pieces

    def finish(self) -> None:
        if self._partial_size:
            self._write(self._partial[: self._partial_size])
            self._partial_size = 0

    def _write(self, data: np.ndarray) -> None:
        """Append ``data`` (whole chunks, except at the end) to the dataset, created at the first write."""
        if self._dataset is None:
            options = self._layout.dataset_options(min(self._chunk, data.size))
            self._dataset = self._block().create_dataset(self._level, shape=(0,), **options)
        start = self._written
        self._dataset.resize((start + data.size,))
        chunk = self._dataset.chunks[0]
        if self._direct and data.size == chunk:
            self._dataset.id.write_direct_chunk((start,), data)
        elif self._direct and data.size < chunk:  # the last chunk of a block: stored full size, zeros after the end
            padded = np.zeros(chunk, data.dtype)
            padded[: data.size] = data
            self._dataset.id.write_direct_chunk((start,), padded)
        else:
            self._dataset[start:] = data
        self._written += data.size
