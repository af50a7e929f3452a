"""The open files of one reader in one process.

Each file is checked to be the very file the reader indexed (device, inode, size, modification time), so a
file replaced meanwhile is refused instead of misread. Handles belong to the process that opened them: the
owner checks :attr:`OpenFiles.pid` and starts a new ``OpenFiles`` in a forked child, which closes its copies
of the parent's handles first (HDF5 would otherwise hand the child the parent's open file again).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from . import schema
from .chunks import ChunkTable, MappedFile, chunk_table
from .storefile import StoreFile, open_store_file, problems_as_store_errors

Identity = tuple[int, int, int, int]

# Bounds: a .parts folder may hold thousands of segments, a file thousands of blocks.
OPEN_FILES = 16
OPEN_DATASETS = 64  # h5py datasets, for blocks HDF5 must read (compressed ones)
# Chunk tables of directly read block datasets hold no handle, 8 bytes per MiB of features and a few hundred
# bytes more: 1 << 16 (13,000 blocks of five levels, 1M images at 240x320) take a few tens of MB at most.
KNOWN_TABLES = 1 << 16


def identity_of(stat: os.stat_result) -> Identity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def file_identity(store: StoreFile) -> Identity:
    """The identity of the file ``store`` has open (not of whatever its path names now)."""
    try:
        return identity_of(os.fstat(store.h5.id.get_vfd_handle()))
    except (OSError, TypeError, ValueError, RuntimeError):  # a driver without a descriptor
        return identity_of(os.stat(store.path))


class OpenFiles:
    """Files ``paths[k]`` opened on demand (at most :data:`OPEN_FILES` at a time), and the block datasets read."""

    def __init__(self, paths: Sequence[Path], identity: Sequence[Identity]) -> None:
        self.pid = os.getpid()
        self._paths = paths
        self._identity = identity
        self._files: OrderedDict[int, StoreFile] = OrderedDict()
        self._maps: dict[int, MappedFile | None] = {}
        self._tables: OrderedDict[tuple[int, int, str], ChunkTable] = OrderedDict()
        self._datasets: OrderedDict[tuple[int, int, str], h5py.Dataset] = OrderedDict()

    def adopt(self, k: int, store: StoreFile) -> None:
        """Keep ``store``, just opened and checked by the reader, as file ``k``."""
        self._files[k] = store
        self._files.move_to_end(k)
        while len(self._files) > OPEN_FILES:
            self._evict(next(iter(self._files)))

    def file(self, k: int) -> StoreFile:
        """File ``k``, reopened if need be; StoreError if it is no longer the file that was indexed."""
        store = self._files.get(k)
        if store is not None:
            self._files.move_to_end(k)
            return store
        path = self._paths[k]
        if not self._same(k, path):
            raise StoreError(f"{path} was replaced or removed since it was opened; open it again")
        store = open_store_file(path)
        if file_identity(store) != self._identity[k]:  # replaced between the check and the open
            store.close()
            raise StoreError(f"{path} was replaced or removed since it was opened; open it again")
        self.adopt(k, store)
        return store

    def read(self, k: int, block: int, level: str, start: int, size: int, source: str) -> np.ndarray:
        """Elements ``start : start + size`` of ``level`` in block ``block`` of file ``k``, as a new flat array."""
        key = (k, block, level)
        table = self._tables.get(key)
        if table is None and key not in self._datasets:
            table = self._learn(key)
        mapped = self._mapped(k) if table is not None else None
        if table is not None and mapped is not None:
            self._tables.move_to_end(key)
            self._check_length(k, block, level, start + size, table.length, source)
            out = np.empty(size, self.file(k).layout.dtype)
            table.copy_into(mapped.bytes, start, out)
            return out
        dataset = self._dataset(key)
        self._check_length(k, block, level, start + size, dataset.shape[0], source)
        return dataset[start : start + size]

    def close(self) -> None:
        self._tables.clear()
        for k in list(self._files):
            self._evict(k)

    # -- internals ------------------------------------------------------------------------------------------

    def _same(self, k: int, path: Path) -> bool:
        try:
            return identity_of(os.stat(path)) == self._identity[k]
        except FileNotFoundError:
            return False

    def _evict(self, k: int) -> None:
        store = self._files.pop(k)
        for key in [key for key in self._datasets if key[0] == k]:
            del self._datasets[key]
        mapped = self._maps.pop(k, None)
        if mapped is not None:
            mapped.close()
        try:
            store.close()
        except Exception:  # noqa: BLE001 - closing a read-only file cannot lose data
            pass

    def _mapped(self, k: int) -> MappedFile | None:
        """A map of file ``k``, or None where the file system or HDF5 driver allows none (HDF5 reads then)."""
        store = self.file(k)
        if k not in self._maps:
            try:
                self._maps[k] = MappedFile(store.h5)
            except (OSError, ValueError, TypeError, RuntimeError):
                self._maps[k] = None
        return self._maps[k]

    def _learn(self, key: tuple[int, int, str]) -> ChunkTable | None:
        """Decide how ``key`` is read: a chunk table if its bytes can be copied directly, else HDF5."""
        k, block, level = key
        store = self.file(k)
        dataset = store.block_dataset(block, level)
        table = None
        mapped = self._mapped(k) if store.layout.compression == "none" else None
        if mapped is not None:
            with problems_as_store_errors(store.path):
                table = chunk_table(dataset, mapped.size, store.path)
        if table is None:
            self._remember_dataset(key, dataset)
            return None
        self._tables[key] = table
        while len(self._tables) > KNOWN_TABLES:
            self._tables.popitem(last=False)
        return table

    def _dataset(self, key: tuple[int, int, str]) -> h5py.Dataset:
        dataset = self._datasets.get(key)
        if dataset is None:
            dataset = self.file(key[0]).block_dataset(key[1], key[2])
            self._remember_dataset(key, dataset)
        else:
            self._datasets.move_to_end(key)
        return dataset

    def _remember_dataset(self, key: tuple[int, int, str], dataset: h5py.Dataset) -> None:
        self._datasets[key] = dataset
        while len(self._datasets) > OPEN_DATASETS:
            self._datasets.popitem(last=False)

    def _check_length(self, k: int, block: int, level: str, end: int, length: int, source: str) -> None:
        if end > length:
            raise StoreError(
                f"{self._paths[k]} is a damaged fpnx feature file: {source!r} lies past the end of "
                f"/{schema.BLOCKS}/{schema.block_name(block)}/{level}"
            )
