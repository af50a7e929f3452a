"""Copy an uncompressed block dataset into a new file by its bytes: HDF5 allocates, the kernel copies.

An uncompressed chunk is the array's bytes as they are (see :mod:`fpnx.store.chunks`). So the copy is created
with every chunk allocated at once and no fill written, and each run of chunks that lie one after the other in
both files is copied file to file with ``copy_file_range`` (read + write where the file systems cannot). HDF5's
object copy would move each chunk through its own buffers and, for files written through Python
(:class:`~fpnx.store.files.FailSafeFile`), through Python: that made finalize the costliest step of a dense run.
Compressed blocks, and anything :func:`~fpnx.store.chunks.chunk_table` cannot describe, go through HDF5.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np

from .chunks import ChunkTable, chunk_addresses, chunk_table

# copy_file_range is refused between file systems on older kernels, and by some file systems altogether
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}
_BUFFER_BYTES = 16 << 20


def copy_dataset_bytes(source: h5py.Dataset, source_path: Path, target: h5py.Group, name: str, target_fd: int) -> bool:
    """Copy ``source`` to ``target[name]``, same layout and chunking; False (nothing created) where it cannot.

    ``target_fd`` is a descriptor of ``target``'s file, written beside HDF5: only inside the new dataset's own
    chunks, which HDF5 never writes itself (no fill).
    """
    source_fd = source.file.id.get_vfd_handle()
    if not isinstance(source_fd, int):
        return False
    table = chunk_table(source, os.fstat(source_fd).st_size, source_path)
    if table is None:
        return False
    copy = _allocated_like(source, table, target, name)
    destination = _addresses(copy, table)
    if destination is None:  # HDF5 did not allocate as asked: drop the copy, let HDF5 copy instead
        del target[name]
        return False
    for source_at, target_at, size in _runs(table, destination):
        copy_file_bytes(source_fd, source_at, target_fd, target_at, size)
    return True


def copy_file_bytes(source_fd: int, source_at: int, target_fd: int, target_at: int, size: int) -> None:
    """Copy ``size`` bytes between two files at the given offsets, in the kernel where it can."""
    while size:
        try:
            done = os.copy_file_range(source_fd, target_fd, min(size, 1 << 30), source_at, target_at)
        except OSError as error:
            if error.errno not in _NO_KERNEL_COPY:
                raise
            _read_and_write(source_fd, source_at, target_fd, target_at, size)
            return
        if done == 0:
            raise OSError(errno.EIO, "the file ended before its data (truncated?)")
        source_at, target_at, size = source_at + done, target_at + done, size - done


def _read_and_write(source_fd: int, source_at: int, target_fd: int, target_at: int, size: int) -> None:
    buffer = bytearray(min(size, _BUFFER_BYTES))
    view = memoryview(buffer)
    while size:
        count = os.preadv(source_fd, [view[: min(size, len(buffer))]], source_at)
        if count == 0:
            raise OSError(errno.EIO, "the file ended before its data (truncated?)")
        written = 0
        while written < count:
            written += os.pwrite(target_fd, view[written:count], target_at + written)
        source_at, target_at, size = source_at + count, target_at + count, size - count


def _allocated_like(source: h5py.Dataset, table: ChunkTable, target: h5py.Group, name: str) -> h5py.Dataset:
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    chunked = source.chunks is not None
    return target.create_dataset(
        name, shape=source.shape, dtype=source.dtype, chunks=(table.chunk,) if chunked else None,
        maxshape=source.maxshape if chunked else None, fill_time="never", dcpl=plist,
    )


def _addresses(copy: h5py.Dataset, table: ChunkTable) -> np.ndarray | None:
    if copy.chunks is None:
        address = copy.id.get_offset()
        return None if address is None else np.array([address], np.int64)
    return chunk_addresses(copy.id, table.chunk, table.chunk * table.itemsize, len(table.addresses))


def _runs(table: ChunkTable, destination: np.ndarray) -> list[tuple[int, int, int]]:
    """(source address, target address, bytes) of each run of chunks consecutive in both files."""
    chunk_bytes = table.chunk * table.itemsize
    runs: list[tuple[int, int, int]] = []
    for source_at, target_at in zip(table.addresses.tolist(), destination.tolist()):
        if runs and runs[-1][0] + runs[-1][2] == source_at and runs[-1][1] + runs[-1][2] == target_at:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + chunk_bytes)
        else:
            runs.append((source_at, target_at, chunk_bytes))
    return runs
