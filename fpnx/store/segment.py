"""The open segment of a run: ``seg-NNNNNN.h5.tmp``, filled image by image, then published by commit."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import schema
from .files import publish, remove_file
from .parts import segment_path, tmp_path_for
from .schema import ImageRecord, Layout
from .tables import create_file, write_tables


class OpenSegment:
    """A segment being written. Feature arrays go to disk as they arrive; only the small index rows wait.

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
        self._datasets: dict[str, h5py.Dataset] = {}
        self._h5: h5py.File | None = create_file(self.tmp, attrs)

    @property
    def image_count(self) -> int:
        return len(self.sources)

    def add(self, record: ImageRecord, features: Mapping[str, np.ndarray]) -> None:
        """Append one image's arrays to the block, then its index row (a row never points at unwritten data)."""
        offsets = {}
        for level in self.layout.levels:
            flat = np.ascontiguousarray(features[level]).reshape(-1)
            dataset = self._dataset(level, flat.size)
            start = dataset.shape[0]
            dataset.resize((start + flat.size,))
            dataset[start:] = flat
            offsets[level] = start
            self.nbytes += flat.nbytes
        self.sources.append(record.source)
        row = {
            schema.HEIGHT: record.height,
            schema.WIDTH: record.width,
            schema.INPUT_HEIGHT: record.input_height,
            schema.INPUT_WIDTH: record.input_width,
            schema.SCALE: record.scale,
            schema.SEGMENT: self.number,
        }
        row.update({schema.offset_column(level): offset for level, offset in offsets.items()})
        for name, value in row.items():
            self._rows[name].append(value)

    def add_failure(self, source: str, reason: str) -> None:
        self.failures.append((source, reason))

    def commit(self) -> Path:
        """Write the index, close, fsync, rename into place. Afterwards the segment is never touched again."""
        assert self._h5 is not None
        write_tables(self._h5, self.layout, self.sources, self._rows, self.failures)
        self._h5.close()
        self._h5 = None
        publish(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop the segment after a failure: close whatever HDF5 still holds, remove the ``.tmp`` file."""
        if self._h5 is not None:
            try:
                self._h5.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away; its own error was reported
                pass
            self._h5 = None
        remove_file(self.tmp)

    def _dataset(self, level: str, first_size: int) -> h5py.Dataset:
        dataset = self._datasets.get(level)
        if dataset is None:
            assert self._h5 is not None
            block = self._h5[schema.BLOCKS].require_group(schema.block_name(self.number))
            dataset = block.create_dataset(level, shape=(0,), **self.layout.dataset_options(first_size))
            self._datasets[level] = dataset
        return dataset
