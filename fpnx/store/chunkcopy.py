"""Copy an uncompressed block dataset into a new file by its bytes: HDF5 allocates, the kernel copies.

An uncompressed chunk is the array's bytes as they are (see :mod:`fpnx.store.chunks`). So the copy is created
with every chunk allocated at once and no fill written, and each run of chunks that lie one after the other in
both files is copied file to file with ``copy_file_range`` (read + write where the file systems cannot). HDF5's
object copy would move each chunk through its own buffers and, for files written through Python
(:class:`~fpnx.store.files.FailSafeFile`), through Python: that made finalize the costliest step of a dense run.
Compressed blocks, and anything :func:`~fpnx.store.chunks.chunk_table` cannot describe, go through HDF5.

A committed segment's block may keep its bytes in another file (HDF5 external storage, see
:func:`fpnx.store.parts.refers_to_own_data_file`); its copy gets them into the new file as ordinary chunks, never
the reference (HDF5's object copy would keep pointing at the other file).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np

from .chunks import ChunkTable, chunk_addresses, chunk_table, external_storage
from .schema import BLOCK_CHUNK_BYTES

# copy_file_range is refused between file systems on older kernels, and by some file systems altogether
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}
_BUFFER_BYTES = 16 << 20


ByteRun = tuple[bytes, int, int, int]  # (source file, its offset, offset in the target file, bytes)


def copy_dataset_bytes(source: h5py.Dataset, source_path: Path, target: h5py.Group, name: str, target_fd: int) -> bool:
    """Copy ``source`` to ``target[name]``, same layout and chunking; False (nothing created) where it cannot.

    ``target_fd`` is a descriptor of ``target``'s file, written beside HDF5: only inside the new dataset's own
    chunks, which HDF5 never writes itself (no fill).
    """
    runs = plan_byte_copy(source, source_path, target, name)
    if runs is None:
        return False
    copy_runs(runs, target_fd, open_files={_file_name(source_path): source.file.id.get_vfd_handle()})
    return True


def plan_byte_copy(source: h5py.Dataset, source_path: Path, target: h5py.Group, name: str) -> list[ByteRun] | None:
    """Create ``target[name]`` like ``source`` (every chunk allocated, nothing written) and return the runs of
    bytes that fill it (:func:`copy_runs`); None (nothing created) where only HDF5 can copy it."""
    pieces = external_storage(source)
    if pieces:
        return _external_runs(source, pieces, target, name)
    source_fd = source.file.id.get_vfd_handle()
    if not isinstance(source_fd, int):
        return None
    table = chunk_table(source, os.fstat(source_fd).st_size, source_path)
    if table is None:
        return None
    copy = _allocated_like(source, table, target, name)
    destination = _addresses(copy, table)
    if destination is None:  # HDF5 did not allocate as asked: drop the copy, let HDF5 copy instead
        del target[name]
        return None
    file = _file_name(source_path)
    return [(file, source_at, target_at, size) for source_at, target_at, size in _runs(table, destination)]


def copy_runs(runs: list[ByteRun], target_fd: int, budget_bytes: int | None = None, *,
              open_files: dict[bytes, int] | None = None) -> tuple[list[ByteRun], int]:
    """Copy ``runs`` into the file ``target_fd``, or their first ``budget_bytes``: the runs left and the bytes
    copied. ``open_files``: descriptors to read some of the files through (the file HDF5 has open)."""
    opened: dict[bytes, int] = {}
    copied, index = 0, 0
    try:
        while index < len(runs) and (budget_bytes is None or copied < budget_bytes):
            file, source_at, target_at, size = runs[index]
            step = size if budget_bytes is None else min(size, budget_bytes - copied)
            descriptor = (open_files or {}).get(file)
            if descriptor is None:
                if file not in opened:
                    opened[file] = os.open(file, os.O_RDONLY)
                descriptor = opened[file]
            copy_file_bytes(descriptor, source_at, target_fd, target_at, step)
            copied += step
            if step == size:
                index += 1
            else:
                runs = [(file, source_at + step, target_at + step, size - step), *runs[index + 1:]]
                index = 0
    finally:
        for descriptor in opened.values():
            os.close(descriptor)
    return runs[index:], copied


def _file_name(path: Path) -> bytes:
    return os.fsencode(os.path.realpath(path))


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


def _external_runs(source: h5py.Dataset, pieces: list[tuple[bytes, int, int]], target: h5py.Group,
                   name: str) -> list[ByteRun]:
    """For a 1-D dataset held in external raw storage: a copy in ordinary chunks of about 1 MiB of ``target``."""
    length, item = int(source.shape[0]), source.dtype.itemsize
    chunk = max(1, min(BLOCK_CHUNK_BYTES // item, length))
    copy = _allocated(source, target, name, chunk, (None,))
    count = -(-length // chunk)
    addresses = chunk_addresses(copy.id, chunk, chunk * item, count)
    if addresses is None:
        raise OSError(errno.EIO, f"HDF5 did not allocate {copy.name} as asked")
    wanted = [(address, min(chunk, length - j * chunk) * item) for j, address in enumerate(addresses.tolist())]
    return _pieces(pieces, wanted)


def _pieces(sources: list[tuple[bytes, int, int]], targets: list[tuple[int, int]]) -> list[tuple[bytes, int, int, int]]:
    """Walk two descriptions of the same bytes, ``sources`` (file, offset, size) and ``targets`` (offset, size),
    and return (file, source offset, target offset, size) of each run of bytes that is contiguous in both."""
    pieces: list[tuple[bytes, int, int, int]] = []
    queue = [list(entry) for entry in sources]
    index = 0
    for target_at, size in targets:
        while size:
            if index == len(queue):
                raise OSError(errno.EIO, "the external storage of a block is shorter than the block")
            file, source_at, available = queue[index]
            step = min(size, available)
            last = pieces[-1] if pieces else None
            if last and last[0] == file and last[1] + last[3] == source_at and last[2] + last[3] == target_at:
                pieces[-1] = (file, last[1], last[2], last[3] + step)
            else:
                pieces.append((file, source_at, target_at, step))
            queue[index] = [file, source_at + step, available - step]
            if available == step:
                index += 1
            target_at, size = target_at + step, size - step
    return pieces


def _allocated_like(source: h5py.Dataset, table: ChunkTable, target: h5py.Group, name: str) -> h5py.Dataset:
    chunked = source.chunks is not None
    return _allocated(source, target, name, table.chunk if chunked else None, source.maxshape if chunked else None)


def _allocated(source: h5py.Dataset, target: h5py.Group, name: str, chunk: int | None,
               maxshape: tuple | None) -> h5py.Dataset:
    """A dataset of ``source``'s shape and dtype with every chunk allocated now and no fill ever written."""
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return target.create_dataset(name, shape=source.shape, dtype=source.dtype, chunks=(chunk,) if chunk else None,
                                 maxshape=maxshape, fill_time="never", dcpl=plist)


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
