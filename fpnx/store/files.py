"""Durable file operations: what must be on disk before a rename makes it visible."""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable (the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot fsync a directory; the data itself is synced
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Atomically put the closed file ``tmp`` at ``final``: its data durable first, then the rename."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        remove_file(path)


# Bytes written between requests to the kernel to start writing them to the disk. Without them nothing is written
# back until a commit's fsync (Linux waits for gigabytes of dirty pages, or 30 s), and every commit then holds the
# writer thread while hundreds of megabytes go to the disk at once (measured: 0.5 s per commit, the pipeline idle).
WRITEBACK_EVERY = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    """Linux's ``sync_file_range`` (not in :mod:`os`); None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def start_writeback(descriptor: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to the disk, without waiting for them (the GIL is
    released while the call runs: it waits only where the disk's queue is full). A hint: failures show at fsync."""
    function = _sync_file_range()
    if function is not None:
        function(descriptor, 0, 0, _SYNC_FILE_RANGE_WRITE)


_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def describe_os_error(error: BaseException) -> str:
    """The reason of a failed write in a few words ("No space left on device"), also for HDF5's long messages."""
    number = getattr(error, "errno", None)
    if not number:
        found = _HDF5_ERRNO.search(str(error))
        number = int(found.group(1)) if found else None
    if number:
        return os.strerror(number)
    text = str(error).strip().splitlines()
    return text[0] if text and text[0] else type(error).__name__


class FailSafeFile(io.RawIOBase):
    """A file for h5py's file-object driver that hides write failures from HDF5 and remembers the first one.

    HDF5 cannot recover from a failed write (disk full, quota, I/O error): the file can then neither be flushed
    nor closed cleanly, and the process may crash later. Only ``.tmp`` files that a failure throws away are
    written through this class, so a failed write is reported to HDF5 as done and every later write is skipped;
    the owner checks :attr:`failure` after each step and raises it (with its errno) itself.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.failure: OSError | None = None
        self._not_written_back = 0  # bytes written since the last start_writeback

    @property
    def descriptor(self) -> int:
        """The file's descriptor, for copies that bypass HDF5 (they raise their own failures)."""
        return self._file.fileno()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int | None:
        return self._file.readinto(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.failure is None and done < len(view):
            try:
                done += self._file.write(view[done:]) or 0
            except OSError as error:
                self.failure = error
        if done < len(view):  # pretend: this file is thrown away, and HDF5 must stay able to close it
            self._file.seek(len(view) - done, io.SEEK_CUR)
        self._not_written_back += done
        if self._not_written_back >= WRITEBACK_EVERY:
            start_writeback(self.descriptor)
            self._not_written_back = 0
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.failure is None:
            try:
                return self._file.truncate(size)
            except OSError as error:
                self.failure = error
        return self.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
