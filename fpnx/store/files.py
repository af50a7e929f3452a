"""Durable file operations: what must be on disk before a rename makes it visible."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


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
