"""Read an fpnx feature file, or the ``.parts`` folder of an unfinished or running run, as one sequence of images.

The index (/images, /failures) of every file is loaded once at open; reading an image then costs one slice
per level of an already-open block dataset. Files are opened read-only and only through hard links.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from . import schema
from .location import StoreLocation, load_file, locate_store
from .storefile import Index, StoreFile, combine_failures, open_store_file, problems_as_store_errors

# Bounds on open handles: a .parts folder may hold thousands of segments, a file thousands of blocks.
OPEN_FILES = 16
OPEN_DATASETS = 64


def open_features(path: str | os.PathLike[str]) -> "FeatureReader":
    """Open a finished fpnx file, or a ``.parts`` folder (the committed part of an unfinished or running run)."""
    return FeatureReader(locate_store(Path(path)))


class FeatureReader:
    """Images of an fpnx store by position or by source: ``reader[i]`` / ``reader[source]`` -> {level: array}.

    Usable with or without ``with``. After ``close()`` (or the end of ``with``) its index stays in memory and
    files are reopened on demand, refusing a file that was replaced meanwhile. A ``.parts`` folder is read as it
    was at open: segments committed later are not seen.
    """

    def __init__(self, target: StoreLocation) -> None:
        self.path = target.path
        self.layout = target.layout
        self.attrs: dict[str, Any] = target.attrs
        self._paths = target.files
        self._identity: list[tuple[int, int, int, int]] = []
        self._files: OrderedDict[int, StoreFile] = OrderedDict()
        self._datasets: OrderedDict[tuple[int, int, str], h5py.Dataset] = OrderedDict()
        indexes: list[Index] = []
        try:
            for k, file_path in enumerate(self._paths):
                store, index = load_file(file_path, target.settings)
                self._identity.append(_identity(file_path))
                indexes.append(index)
                self._keep_open(k, store)
        except FileNotFoundError:
            self.close()
            raise StoreError(f"{self.path} changed while being read: its run has finished; open the output") from None
        except BaseException:
            self.close()
            raise
        self._sources = [source for index in indexes for source in index.sources]
        self._file_of_row = np.concatenate(
            [np.full(len(index), k, dtype=np.int32) for k, index in enumerate(indexes)] or [np.zeros(0, np.int32)]
        )
        empty = Index.empty(self.layout)
        self._columns = {
            name: np.concatenate([index.columns[name] for index in indexes] or [empty.columns[name]])
            for name in empty.columns
        }
        self._failures = combine_failures([index.failures for index in indexes], set(self._sources))
        self._row_of: dict[str, int] | None = None
        if len(set(self._sources)) != len(self._sources):
            self.close()
            raise StoreError(f"{self.path} is damaged: a source is stored twice")

    # -- the sequence ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sources)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def __contains__(self, source: object) -> bool:
        return isinstance(source, str) and source in self._rows()

    def __getitem__(self, key: int | str) -> dict[str, np.ndarray]:
        """{level: array (C, H, W) in the stored dtype} of one image, by position or by source."""
        i = self._position(key)
        k = int(self._file_of_row[i])
        block = int(self._columns[schema.BLOCK][i])
        height = int(self._columns[schema.INPUT_HEIGHT][i])
        width = int(self._columns[schema.INPUT_WIDTH][i])
        arrays = {}
        with problems_as_store_errors(self._paths[k]):
            for level in self.layout.levels:
                shape = self.layout.shape(level, height, width)
                size = shape[0] * shape[1] * shape[2]
                start = int(self._columns[schema.offset_column(level)][i])
                dataset = self._dataset(k, block, level)
                if start + size > dataset.shape[0]:
                    raise StoreError(
                        f"{self._paths[k]} is a damaged fpnx feature file: {self._sources[i]!r} lies past the end "
                        f"of {dataset.name}"
                    )
                arrays[level] = dataset[start : start + size].reshape(shape)
        return arrays

    @property
    def sources(self) -> list[str]:
        """Sources in stored order. The reader's own list (cheap to index in a loop): do not modify it."""
        return self._sources

    def index_of(self, source: str) -> int:
        try:
            return self._rows()[source]
        except KeyError:
            raise KeyError(f"{source!r} is not stored in {self.path}") from None

    def info(self, key: int | str) -> dict[str, Any]:
        """source, height, width (original, after EXIF), input_height, input_width (resized), scale."""
        i = self._position(key)
        columns = self._columns
        return {
            "source": self._sources[i],
            "height": int(columns[schema.HEIGHT][i]),
            "width": int(columns[schema.WIDTH][i]),
            "input_height": int(columns[schema.INPUT_HEIGHT][i]),
            "input_width": int(columns[schema.INPUT_WIDTH][i]),
            "scale": float(columns[schema.SCALE][i]),
        }

    @property
    def failures(self) -> list[tuple[str, str]]:
        return list(self._failures)

    @property
    def levels(self) -> list[str]:
        return list(self.layout.levels)

    @property
    def strides(self) -> dict[str, int]:
        return dict(self.layout.strides)

    @property
    def channels(self) -> dict[str, int]:
        return dict(self.layout.channels)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def metadata(self) -> dict[str, Any]:
        return self.attrs[schema.ATTR_METADATA]

    # -- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._datasets.clear()
        while self._files:
            _, store = self._files.popitem()
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closing a read-only file cannot lose data
                pass

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FeatureReader {self.path}: {len(self)} images, levels {', '.join(self.layout.levels)}>"

    # -- internals ------------------------------------------------------------------------------------------

    def _rows(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {source: i for i, source in enumerate(self._sources)}
        return self._row_of

    def _position(self, key: int | str) -> int:
        if isinstance(key, str):
            return self.index_of(key)
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"images are indexed by position or source, not {type(key).__name__}")
        i = int(key)
        count = len(self._sources)
        if not -count <= i < count:
            raise IndexError(f"image {i} is out of range: {self.path} holds {count} images")
        return i % count

    def _keep_open(self, k: int, store: StoreFile) -> None:
        self._files[k] = store
        self._files.move_to_end(k)
        while len(self._files) > OPEN_FILES:
            old, evicted = self._files.popitem(last=False)
            for key in [key for key in self._datasets if key[0] == old]:
                del self._datasets[key]
            evicted.close()

    def _file(self, k: int) -> StoreFile:
        store = self._files.get(k)
        if store is not None:
            self._files.move_to_end(k)
            return store
        path = self._paths[k]
        try:
            same = _identity(path) == self._identity[k]
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreError(f"{path} was replaced or removed since it was opened; open it again")
        store = open_store_file(path)
        self._keep_open(k, store)
        return store

    def _dataset(self, k: int, block: int, level: str) -> h5py.Dataset:
        key = (k, block, level)
        dataset = self._datasets.get(key)
        if dataset is None:
            dataset = self._file(k).block_dataset(block, level)
            self._datasets[key] = dataset
            while len(self._datasets) > OPEN_DATASETS:
                self._datasets.popitem(last=False)
        else:
            self._datasets.move_to_end(key)
        return dataset


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
