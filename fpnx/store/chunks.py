"""Direct reads of uncompressed block datasets: one copy per run of chunks from a read-only map of the file.

An uncompressed HDF5 chunk holds the array's bytes as they are, at a file address HDF5 reports
(``H5Dget_chunk_info``). Reading an image's range through HDF5 instead costs a pass through the chunk cache
per chunk and a fixed overhead per call; copying from a memory map of the file costs what a numpy memmap of
the same bytes costs. The format is unchanged: this is a faster way to read the documented layout.

fpnx never modifies a finished file or a committed segment (docs/format.md): a writer replaces a file by
renaming a new one over it, which leaves a mapping of the old file valid. Only a file rewritten in place by
another program (``cp new.h5 feats.h5`` while a reader has it open) could change under a mapping.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError

_EMPTY = np.zeros(0, np.uint8)


class MappedFile:
    """A read-only memory map of the very file an open ``h5py.File`` reads (its own descriptor, duplicated)."""

    def __init__(self, h5: h5py.File) -> None:
        descriptor = h5.id.get_vfd_handle()
        if not isinstance(descriptor, int):
            raise OSError("the HDF5 file driver has no file descriptor")
        self.size = os.fstat(descriptor).st_size
        self._map = mmap.mmap(descriptor, self.size, access=mmap.ACCESS_READ) if self.size else None
        self.bytes = np.frombuffer(self._map, np.uint8) if self._map is not None else _EMPTY

    def close(self) -> None:
        self.bytes = _EMPTY
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an array still views it: the map goes when that array does
                pass
            self._map = None


@dataclass(frozen=True)
class ChunkTable:
    """Where the bytes of one uncompressed 1-D dataset lie in its file.

    ``addresses[j]`` is the file address of chunk ``j`` (``chunk`` elements each); a contiguous dataset is one
    chunk as long as the dataset. ``consecutive`` says every chunk directly follows the one before, so any
    range is a single copy.
    """

    length: int
    chunk: int
    itemsize: int
    addresses: np.ndarray
    consecutive: bool

    def copy_into(self, data: np.ndarray, start: int, out: np.ndarray) -> None:
        """Copy elements ``start : start + out.size`` from the mapped file ``data`` (uint8) into ``out``."""
        target = out.view(np.uint8)
        item, chunk = self.itemsize, self.chunk
        if self.consecutive:
            address = int(self.addresses[0]) + start * item
            target[:] = data[address : address + target.size]
            return
        done, position, end = 0, start, start + out.size
        while position < end:
            j = position // chunk
            # extend over the following chunks while each directly follows the one before
            last = j
            while (last + 1) * chunk < end and self.addresses[last + 1] == self.addresses[last] + chunk * item:
                last += 1
            count = min(end, (last + 1) * chunk) - position
            address = int(self.addresses[j]) + (position - j * chunk) * item
            target[done : done + count * item] = data[address : address + count * item]
            done += count * item
            position += count


def chunk_table(dataset: h5py.Dataset, file_size: int, path: Path) -> ChunkTable | None:
    """The table of ``dataset``, or None when it cannot be read directly (filters, unallocated chunks, a user
    block, an odd storage layout): HDF5 then reads it. Addresses past the end of the file are damage."""
    if dataset.file.userblock_size or dataset.ndim != 1 or dataset.shape[0] == 0:
        return None
    dataset_id = dataset.id
    plist = dataset_id.get_create_plist()
    if plist.get_nfilters():
        return None
    length, item = int(dataset.shape[0]), dataset.dtype.itemsize
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        address = dataset_id.get_offset()
        if address is None:
            return None
        addresses, chunk = np.array([address], np.int64), length
    elif layout == h5py.h5d.CHUNKED:
        chunk = int(dataset.chunks[0])
        addresses = chunk_addresses(dataset_id, chunk, chunk * item, -(-length // chunk))
        if addresses is None:
            return None
    else:
        return None
    if int(addresses.max()) + chunk * item > file_size:
        raise StoreError(f"{path} is a damaged fpnx feature file: {dataset.name} lies past the end of the file")
    consecutive = bool(np.all(np.diff(addresses) == chunk * item))
    return ChunkTable(length, chunk, item, addresses, consecutive)


def external_storage(dataset: h5py.Dataset) -> list[tuple[bytes, int, int]]:
    """(file name, offset, bytes) of each piece of a dataset kept in HDF5 external raw storage, in order; [] for
    a dataset stored in its own file."""
    plist = dataset.id.get_create_plist()
    return [plist.get_external(i) for i in range(plist.get_external_count())]


def chunk_addresses(dataset_id: h5py.h5d.DatasetID, chunk: int, chunk_bytes: int, count: int) -> np.ndarray | None:
    addresses = np.full(count, -1, np.int64)
    usable = [True]

    def visit(info: h5py.h5d.StoreInfo) -> None:
        j = info.chunk_offset[0] // chunk
        if info.filter_mask or info.size != chunk_bytes or info.byte_offset is None or not 0 <= j < count:
            usable[0] = False
        else:
            addresses[j] = info.byte_offset

    try:
        if dataset_id.get_num_chunks() != count:
            return None
        try:
            dataset_id.chunk_iter(visit)
        except (AttributeError, NotImplementedError):  # HDF5 before 1.12.3: one call per chunk
            for index in range(count):
                visit(dataset_id.get_chunk_info(index))
    except AttributeError:  # HDF5 before 1.10.5 tells no chunk addresses: it reads the data itself
        return None
    if not usable[0] or addresses.min() < 0:
        return None
    return addresses
