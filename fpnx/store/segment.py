"""The open segment of a run: ``seg-NNNNNN.h5.tmp``, filled image by image, then published by commit."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import schema
from .files import publish, remove_file
from .parts import segment_path, tmp_path_for
from .schema import ImageRecord, Layout
from .tables import NewFile, write_tables


class OpenSegment:
    """A segment being written. Feature arrays go to disk as they arrive, in whole chunks (so each chunk is
    compressed once); what waits in memory is less than one chunk per level, plus the small index rows.

    Its one block is named after the segment number, so a committed segment is itself a valid fpnx file.
    """

    def __init__(self, parts: Path, number: int, layout: Layout, attrs: Mapping[str, Any]) -> None:
        self.number = number
        self.path = segment_path(parts, number)
        self.tmp = tmp_path_for(self.path)
        self.layout = layout
        self.opened_at = time.monotonic()
        self.nbytes = 0
        self.sources: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self._rows: dict[str, list[Any]] = {name: [] for name in schema.INDEX_COLUMNS}
        self._rows.update({schema.offset_column(level): [] for level in layout.levels})
        self._file: NewFile | None = NewFile(self.tmp, attrs)
        self._levels = {level: _LevelData(level, layout, self._block) for level in layout.levels}
        # False while an add() runs: one cut short (Ctrl-C) may leave queued arrays and offsets out of step,
        # and such a segment must be thrown away, never committed.
        self.consistent = True

    @property
    def image_count(self) -> int:
        return len(self.sources)

    def add(self, record: ImageRecord, features: Mapping[str, np.ndarray]) -> None:
        """Append one image's arrays to the block, then its index row."""
        self.consistent = False
        offsets = {}
        for level in self.layout.levels:
            flat = np.ascontiguousarray(features[level]).reshape(-1)
            offsets[level] = self._levels[level].append(flat)
            self.nbytes += flat.nbytes
        self._live_file().check()  # a failed write ends the segment before its row is recorded
        self.sources.append(record.source)
        row = {
            schema.HEIGHT: record.height,
            schema.WIDTH: record.width,
            schema.INPUT_HEIGHT: record.input_height,
            schema.INPUT_WIDTH: record.input_width,
            schema.SCALE: record.scale,
            schema.BLOCK: self.number,
        }
        row.update({schema.offset_column(level): offset for level, offset in offsets.items()})
        for name, value in row.items():
            self._rows[name].append(value)
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
        write_tables(file.h5, self.layout, self.sources, self._rows, self.failures)
        file.close()
        self._file = None
        publish(self.tmp, self.path)
        return self.path

    @property
    def failure(self) -> OSError | None:
        return self._file.failure if self._file is not None else None

    def discard(self) -> None:
        """Drop the segment after a failure: close what HDF5 holds, remove the ``.tmp`` file."""
        self._levels.clear()
        if self._file is not None:
            self._file.abandon()
            self._file = None
        remove_file(self.tmp)

    def _live_file(self) -> NewFile:
        if self._file is None:
            raise ValueError(f"segment {self.path} is already committed or discarded")
        return self._file

    def _block(self) -> h5py.Group:
        return self._live_file().h5[schema.BLOCKS].require_group(schema.block_name(self.number))


class _LevelData:
    """One level's flat dataset in the open block, written a whole number of chunks at a time.

    The dataset is created when the first full chunk is ready, or at commit: a block smaller than one chunk
    then gets a single chunk of exactly its size.
    """

    def __init__(self, level: str, layout: Layout, block: Callable[[], h5py.Group]) -> None:
        self._level = level
        self._layout = layout
        self._block = block
        self._chunk = layout.chunk_elements
        self._dataset: h5py.Dataset | None = None
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self._written = 0

    def append(self, flat: np.ndarray) -> int:
        """Queue one image's flat array; return its offset in the dataset."""
        offset = self._written + self._pending_size
        self._pending.append(flat)
        self._pending_size += flat.size
        if self._pending_size >= self._chunk:
            self._write(whole_chunks_only=True)
        else:
            self._pending[-1] = flat.copy()  # the caller may reuse its array
        return offset

    def finish(self) -> None:
        if self._pending_size:
            self._write(whole_chunks_only=False)

    def _write(self, whole_chunks_only: bool) -> None:
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        count = data.size - data.size % self._chunk if whole_chunks_only else data.size
        if self._dataset is None:
            options = self._layout.dataset_options(min(self._chunk, data.size))
            self._dataset = self._block().create_dataset(self._level, shape=(0,), **options)
        start = self._written
        self._dataset.resize((start + count,))
        self._dataset[start:] = data[:count]
        self._written += count
        rest = data[count:]
        self._pending = [rest.copy()] if rest.size else []
        self._pending_size = rest.size
