"""Worker processes that decode and preprocess images in input order, with bounded prefetch.

A decoder that raises costs its image a failure record; a decoder that crashes its process (a segfault, the
OOM killer) or hangs (no result within ``timeout_s`` per image) is found by re-running the images that were in
flight one at a time, and costs only that image.
Images come back through shared-memory slots (:mod:`fpnx.loader.slots`). Workers start together before the
first task, with SIGINT blocked until they ignore it (a terminal's Ctrl-C reaches them too).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from ..sources import ImageSource
from .load import LoadedImage, LoadOptions, load_image
from .slots import SharedSlots, SlotRef, write_into_slot


def _ping(hold_s: float = 0.0) -> int:
    time.sleep(hold_s)  # a worker holding a ping leaves the next one to another worker
    return os.getpid()


def _worker_init(uses_torch: bool) -> None:
    if uses_torch:  # workers that only decode (for a GPU) never import it: seconds of CPU and ~500 MB each
        import torch

        torch.set_num_threads(1)  # workers share the machine with the model: one thread each
    _keep_freed_memory()
    # A terminal's Ctrl-C reaches the whole process group: the main process stops the run and shuts the pool
    # down, so workers ignore it (no half-done task, no traceback from every worker). Until here it was blocked
    # (see _submit_blocking_sigint); a Ctrl-C pending since is dropped with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # A main process killed outright (kill -9, the OOM killer) cannot shut the pool down: leave with it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), name="fpnx-parent", daemon=True).start()
    # A worker told to stop leaves without the interpreter's teardown (~0.5 s with torch loaded, on cores the run
    # still needs to finalize): by then multiprocessing has sent every result and run its own clean-up.
    atexit.register(_exit_at_once)


def _submit_blocking_sigint(pool: ProcessPoolExecutor, function: Callable, *args) -> Future:
    """``pool.submit`` with SIGINT blocked in this thread, where the executor starts worker processes on demand.

    A new process inherits the signal mask of the thread that starts it, and Python leaves a blocked SIGINT
    blocked: a terminal's Ctrl-C, sent to the whole process group, then cannot interrupt a worker while it
    imports torch (seconds; each would print a traceback of that import) before :func:`_worker_init` ignores it.
    In this process a SIGINT meanwhile goes to another thread or waits for the mask to be restored: none is lost.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return pool.submit(function, *args)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(function, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_at_once() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(0)


# glibc's mallopt parameters, and the values workers use: every block of up to 32 MB (a float32 image at the
# default sizes is 10 MB) comes from the heap, and freed memory stays there for the next image
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCKS = 32 << 20
_TRIM_ABOVE = 256 << 20


def _keep_freed_memory() -> None:
    """Each image allocates the same large arrays again. glibc would hand some of them back to the kernel when
    freed and fault the pages in again for the next image (measured: ~3,000 page faults and 4 ms of system time
    per image in one of two workers); keeping freed memory in the heap makes them cost nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, musl): their allocators decide
        pass


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the parent process is gone
    os._exit(1)


WORKER_START_S = 300.0  # the first worker's start: importing torch on a loaded machine can take minutes
ALL_WORKERS_START_S = 60.0  # then the others', at most this much longer
DEFAULT_TIMEOUT_S = 120.0  # per image: minutes beyond the slowest legitimate decode+resize (~5 s at max_pixels)
LoadFunction = Callable[[ImageSource, LoadOptions], LoadedImage]
_Task = tuple[ImageSource, SlotRef | None]  # an image and the slot it comes back through


def _load_into_slots(load: LoadFunction, tasks: list[_Task], options: LoadOptions) -> list[LoadedImage]:
    """The task a worker runs: ``load`` each image, then hand its pixels over through its slot."""
    divisibility = options.preprocessing.size_divisibility
    return [write_into_slot(load(image, options), slot, divisibility) for image, slot in tasks]


def _wait_for_every_worker(pool: ProcessPoolExecutor, workers: int, started: set[int], pings: list[Future]) -> None:
    """Return once ``workers`` processes have answered a ping (or a minute has passed: then go on with those up).

    Workers start on demand, and a worker still importing torch (1-2 s of CPU) takes a core from those already
    decoding: measured on 2 cores, the loader's first seconds ran at 0.6-0.7 of its rate with every worker up.
    Pings hold a worker for a moment so that the others get theirs as soon as they are up.
    """
    deadline = time.monotonic() + ALL_WORKERS_START_S
    processes = getattr(pool, "_processes", None)  # the executor's own; absent elsewhere: then wait for all
    while True:
        for ping in pings:
            try:
                started.add(ping.result(timeout=max(0.0, deadline - time.monotonic())))
            except (FutureTimeout, BrokenProcessPool):
                return  # the run goes on with the workers that are up (a broken pool is found by the first task)
        expected = min(workers, len(processes)) if isinstance(processes, dict) else workers
        if len(started) >= expected or time.monotonic() >= deadline:
            return
        pings = [_submit_blocking_sigint(pool, _ping, 0.02) for _ in range(expected - len(started))]


class ImageLoader:
    """Iterates :class:`LoadedImage` in the order of ``images``; ``workers=0`` loads in this process.

    ``load`` decodes one image (default :func:`load_image`); another must be a module-level function, so that
    worker processes can import it (tests use this to simulate decoders that crash). Crash isolation needs
    workers: with ``workers=0`` a crashing decoder takes this process with it. With ``slots`` > 0, workers hand
    images over through that many shared-memory slots: call :meth:`release` with each image once its pixels are
    no longer needed (an image never released keeps its slot, and later images travel the ordinary way).
    A task carries ``per_task`` images: each task costs a fixed amount of pickling, messages and wake-ups (about
    0.5 ms of this process's time, measured), so tasks of a few images cost a fraction of it per image.
    With workers, ``timeout_s`` (None: no limit) bounds the seconds an image may take: a worker that takes
    longer is stopped and the image fails (without workers a hanging decoder cannot be interrupted).
    The first task waits until the workers it needs (one per task of images, up to ``workers``) have started;
    they start in parallel, and none is still starting while the others decode.
    """

    def __init__(
        self,
        images: Sequence[ImageSource],
        options: LoadOptions,
        *,
        workers: int = 1,
        prefetch: int = 8,
        load: LoadFunction = load_image,
        slots: int = 0,
        per_task: int = 1,
        timeout_s: float | None = None,
    ):
        self.images = list(images)
        self.timeout_s = timeout_s
        self.options = options
        self.load = load
        self.workers = workers
        self.prefetch = max(prefetch, workers)
        self.per_task = max(1, per_task)
        self.crashes = 0
        self.timeouts = 0
        self._pool: ProcessPoolExecutor | None = None
        self._wanted_slots = slots
        self._slots: SharedSlots | None = None
        self._leaving: list[multiprocessing.process.BaseProcess] = []  # workers of a shut-down pool, exiting
        self._leaving_threads: list[threading.Thread] = []  # the executors' own, of those pools
        self._first_pool = True

    def __iter__(self) -> Iterator[LoadedImage]:
        pending: collections.deque[tuple[list[_Task], Future]] = collections.deque()
        upcoming = iter(self.images)
        in_flight = 0
        try:
            while True:
                while in_flight < self.prefetch:
                    images = list(itertools.islice(upcoming, min(self.per_task, self.prefetch - in_flight)))
                    if not images:
                        break
                    pending.append(self._submit(images))
                    in_flight += len(images)
                if not pending:
                    return
                tasks, future = pending.popleft()
                in_flight -= len(tasks)
                try:
                    # the oldest task: running since the tasks before it came back (workers take them in order)
                    items = future.result(timeout=self._limit(len(tasks)))
                except (BrokenProcessPool, FutureTimeout):
                    # a crash hit every image in flight, a hang holds one worker: find the culprit one by one
                    crashed = tasks + [task for queued, _ in pending for task in queued]
                    pending.clear()
                    in_flight = 0
                    self._stop_pool(kill=True)
                    for image, slot in crashed:
                        self._release_slot(slot)
                        yield self._load_isolated(image)
                    continue
                for (_, slot), item in zip(tasks, items):
                    yield self._received(item, slot)
        finally:
            # every image is in: the workers may leave while the caller finishes (close() waits for them)
            self._stop_pool(wait=False)
            self._free_slots()

    @property
    def slot_bytes(self) -> int | None:
        """The size of a shared-memory slot, once workers use them."""
        return self._slots.slot_bytes if self._slots is not None else None

    def release(self, item: LoadedImage) -> None:
        """``item``'s slot may be reused: its pixels will not be read again."""
        if item.slot is not None and self._slots is not None:
            self._slots.release(item.slot)
        item.slot = None

    def _received(self, item: LoadedImage, slot: SlotRef | None) -> LoadedImage:
        if item.slot is None:  # handed over the ordinary way
            self._release_slot(slot)
            return item
        return self._slots.receive(item)

    def _release_slot(self, slot: SlotRef | None) -> None:
        if slot is not None and self._slots is not None:
            self._slots.release(slot.index)

    def _submit(self, images: list[ImageSource]) -> tuple[list[_Task], Future]:
        if self._pool is None and self.workers > 0:
            self._pool = self._start_pool(every_worker=self._first_pool)
            self._first_pool = False
        future: Future = Future()
        if self._pool is None:
            future.set_result([self.load(image, self.options) for image in images])
            return [(image, None) for image in images], future
        if self._slots is None and self._wanted_slots > 0:
            self._slots = SharedSlots.for_options(self.options, self._wanted_slots)
            self._wanted_slots = 0
        tasks = [(image, self._slots.take() if self._slots is not None else None) for image in images]
        return tasks, _submit_blocking_sigint(self._pool, _load_into_slots, self.load, tasks, self.options)

    def _start_pool(self, every_worker: bool) -> ProcessPoolExecutor | None:
        """A pool whose workers are known to start; None (decode here) where they cannot. With ``every_worker``,
        every worker the images need has started when it returns (see :func:`_wait_for_every_worker`)."""
        # spawn, not fork: forking a process that holds torch's thread pools can deadlock
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(self.options.finish_here,))
        try:
            # one ping per worker wanted (no more than there are tasks), sent at once: the executor starts a process
            # for each (it starts one per task while none is idle)
            wanted = min(self.workers, -(-len(self.images) // self.per_task)) if every_worker else 1
            pings = [_submit_blocking_sigint(pool, _ping) for _ in range(wanted)]
            started = {pings[0].result(timeout=WORKER_START_S)}
            if wanted > 1:
                _wait_for_every_worker(pool, wanted, started, pings[1:])
        except Exception as error:  # noqa: BLE001 - e.g. a __main__ read from stdin cannot be re-imported
            self._pool = pool
            self._stop_pool(wait=False)
            warnings.warn(f"worker processes cannot start here ({type(error).__name__}); decoding in this process "
                          f"(in a script, call fpnx.extract under `if __name__ == \"__main__\":`)")
            self.workers = 0
            return None
        except BaseException:  # Ctrl-C while they start: they leave, and close() waits for them as for others
            self._pool = pool
            self._stop_pool(wait=False, kill=True)
            raise
        return pool

    def _limit(self, images: int) -> float | None:
        return None if self.timeout_s is None or self._pool is None else self.timeout_s * images

    def _load_isolated(self, image: ImageSource) -> LoadedImage:
        [(_, slot)], future = self._submit([image])
        try:
            return self._received(future.result(timeout=self._limit(1))[0], slot)
        except BrokenProcessPool:
            self.crashes += 1
            error = "the decoder crashed (its worker process died)"
        except FutureTimeout:
            self.timeouts += 1
            error = f"decoding took longer than {self.timeout_s:g} s (its worker was stopped)"
        self._stop_pool(kill=True)
        self._release_slot(slot)
        return LoadedImage(image, error=error)

    def close(self) -> None:
        """Stop the workers, wait for them to be gone, and free the slots (arrays handed out stay valid)."""
        self._stop_pool()
        self._free_slots()

    def _stop_pool(self, wait: bool = True, kill: bool = False) -> None:
        """Shut the workers down; without ``wait`` they exit in the background until a later call waits; with
        ``kill`` they are killed first (one may be stuck in a decoder that never returns).

        A shutdown that does not wait drops the executor's own handles, so the worker processes are kept here
        (where the executor does not show them, it waits at once)."""
        if self._pool is not None:
            processes = getattr(self._pool, "_processes", None)
            leaving = list(processes.values()) if isinstance(processes, dict) else None
            if kill:
                for process in leaving or []:
                    process.kill()
            thread = getattr(self._pool, "_executor_manager_thread", None)  # the shutdown forgets it
            self._pool.shutdown(wait=wait or leaving is None, cancel_futures=True)
            self._leaving.extend(leaving or [])
            if isinstance(thread, threading.Thread):
                self._leaving_threads.append(thread)
            self._pool = None
        if wait:
            while self._leaving:
                self._leaving.pop().join()
            # and the executors' own threads: one still running when Python exits can race its exit handler
            # (Python 3.11: "Exception ignored ... OSError: Bad file descriptor", gh-125451)
            while self._leaving_threads:
                self._leaving_threads.pop().join()

    def _free_slots(self) -> None:
        if self._slots is not None:
            self._slots.close()
            self._slots = None
