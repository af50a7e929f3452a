"""A :class:`FeatureWriter` fed from a thread: the model runs on while finished images are written.

The queue is bounded (a few images, more while they are small), so memory stays bounded and a slow disk slows the
producer down (backpressure) rather than filling memory. An error in the thread (a failed write, or an error raised
by ``on_written``, such as a caller's progress callback) stops the writing and is raised in the producer at its
next call; the thread itself runs until :meth:`BackgroundWriter.stop`.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from .schema import ImageRecord
from .writer import FeatureWriter

WRITE_QUEUE = 4  # images waiting for the writer thread, at least
# and more while they hold no more bytes than this: a commit holds the thread while the disk catches up (fsync, a
# few tenths of a second), and small images (pooled vectors, P5-P6) keep coming meanwhile instead of stopping the run
WRITE_QUEUE_BYTES = 256 << 20


def held_bytes(arrays) -> int:
    """The memory ``arrays`` keep alive: a view keeps its whole buffer (on the CPU, crops stored in the model's dtype
    are views of its outputs, which hold every level of the batch), counted once."""
    buffers: dict[int, int] = {}
    for array in arrays:
        owner = array
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        if hasattr(owner, "untyped_storage"):  # a tensor's memory (the store does not import torch)
            storage = owner.untyped_storage()
            buffers[storage.data_ptr()] = storage.nbytes()
        elif isinstance(owner, np.ndarray):
            buffers[id(owner)] = owner.nbytes
        else:
            buffers[id(array)] = np.asarray(array).nbytes
    return sum(buffers.values())


def queue_capacity(image_bytes: int) -> int:
    """The most images of ``image_bytes`` each that wait for the writer thread (a pool of buffers for them)."""
    return max(WRITE_QUEUE, WRITE_QUEUE_BYTES // max(1, image_bytes))


class BackgroundWriter:
    """Adds images and failures to ``writer`` in a thread; ``on_written`` is called there after each one."""

    def __init__(self, writer: FeatureWriter, on_written: Callable[[], None], depth: int = WRITE_QUEUE,
                 idle: Callable[[], bool] | None = None, max_bytes: int = WRITE_QUEUE_BYTES) -> None:
        self.writer = writer
        self._idle = idle  # work for the thread while nothing is queued, a piece per call; False: nothing left
        self.stored = 0
        self.failures: list[tuple[str, str]] = []
        self.input_sizes: collections.Counter[tuple[int, int]] = collections.Counter()  # images per input size
        self.seconds = 0.0  # time spent writing
        self._on_written = on_written
        self._queue: queue.Queue = queue.Queue()  # its room is counted here:
        self._room = threading.Condition()
        self._depth, self._max_bytes = depth, max_bytes
        self._queued: collections.deque[int] = collections.deque()  # bytes of each image queued, oldest first
        self._queued_bytes = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fpnx-writer", daemon=True)
        self._thread.start()

    def add(self, record: ImageRecord, features: Mapping[str, np.ndarray], *,
            pooled: Mapping[str, np.ndarray] | None = None, ready: Callable[[], None] | None = None,
            done: Callable[[], None] | None = None) -> None:
        """Queue one image; in the thread, ``ready()`` (e.g. waiting for a device's copy into ``features``) comes
        before writing and ``done()`` (e.g. giving the buffers back) after it, whatever happened."""
        self._put((record, features, pooled, ready, done), held_bytes([*features.values(), *(pooled or {}).values()]))

    def add_failure(self, source: str, reason: str) -> None:
        self._put((source, reason), 0)

    def stop(self) -> None:
        """Write what is queued (finished work, also after an error or Ctrl-C), end the thread, raise its error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _put(self, item: tuple, nbytes: int) -> None:
        with self._room:
            while True:
                if self._error is not None:
                    raise self._error
                if len(self._queued) < self._depth or self._queued_bytes + nbytes <= self._max_bytes:
                    break
                self._room.wait(timeout=0.5)
            self._queued.append(nbytes)
            self._queued_bytes += nbytes
            self._queue.put(item)  # never waits: the queue itself is unbounded

    def _taken(self) -> None:
        """In the thread, for the item just taken off the queue: its room is free again."""
        with self._room:
            self._queued_bytes -= self._queued.popleft()
            self._room.notify()

    def _loop(self) -> None:
        # Nothing may end this loop but the stop marker: a producer waiting on a full queue would wait forever.
        while (item := self._next()) is not None:
            self._taken()
            try:
                self._handle(item)
            except BaseException as error:  # noqa: BLE001 - handed to the producer (a caller's on_written too)
                if self._error is None:
                    self._error = error

    def _next(self) -> tuple | None:
        """The next item; until one is queued, ``idle`` work, a piece at a time (none after an error)."""
        idle = self._idle is not None
        while idle and self._error is None:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                idle = self._idle()
            except BaseException as error:  # noqa: BLE001 - handed to the producer
                self._error = error
        return self._queue.get()

    def _handle(self, item: tuple) -> None:
        if self._error is not None:  # skipped, but its buffers go back: the producer may be waiting for them
            if isinstance(item[0], ImageRecord) and item[-1] is not None:
                item[-1]()
            return
        start = time.perf_counter()
        try:
            if isinstance(item[0], ImageRecord):
                self._write(*item)
            else:
                self.writer.add_failure(*item)
                self.failures.append(item)
        finally:
            self.seconds += time.perf_counter() - start
        self._on_written()

    def _write(self, record: ImageRecord, features: Mapping[str, np.ndarray], pooled, ready, done) -> None:
        try:
            if ready is not None:
                ready()
            self.writer.add(record, features, pooled)
        finally:
            if done is not None:
                done()
        self.stored += 1
        self.input_sizes[record.input_height, record.input_width] += 1
