"""One writer per output: an exclusive flock on ``OUT.h5.lock``, released by the OS if the process dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import StoreError, UsageError
from .files import remove_file


def lock_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    """Held while a writer or a merge works on ``output``; the lock file names the holder for error messages."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = lock_path_for(output)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as error:  # a read-only or special file system (/sys, /proc), or no permission
                raise UsageError(f"cannot write {self.output}: {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise StoreError(
                    f"{self.output} is being written by another fpnx run ({holder}); "
                    "wait for it or choose another --out"
                ) from None
            except OSError as error:
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {error.strerror or error}") from None
            # A holder that was just closing may have unlinked the file we opened: then our lock guards
            # nothing, and the next writer would lock a fresh file. Retry on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order, so no one locks a file about to vanish)."""
        if self._fd is None:
            return
        try:
            remove_file(self.path)
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


@contextlib.contextmanager
def hold_locks(outputs: Sequence[Path]) -> Iterator[None]:
    """Hold the locks of several outputs (taken in order, released in reverse), e.g. a merge and its inputs."""
    held: list[OutputLock] = []
    try:
        for output in outputs:
            lock = OutputLock(output)
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()
