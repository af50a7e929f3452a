"""Images -> batches: decode and preprocess in worker processes, in input order, with bounded prefetch, then
group images of one padded size into batches.

A decoder that raises costs its image a failure record; a decoder that crashes its process (a segfault, the
OOM killer) is found by re-running the images that were in flight one at a time, and costs only that image.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ImageError, first_line
from .preprocess import Preprocessing, padded_size, prepare_image
from .sources import DEFAULT_MAX_PIXELS, ImageSource, decode_source


@dataclass(frozen=True)
class LoadOptions:
    preprocessing: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False


@dataclass
class LoadedImage:
    """One image ready for the network (``pixels`` (3, h, w) float32, unpadded), or the reason it failed."""

    origin: ImageSource
    pixels: np.ndarray | None = None
    height: int = 0
    width: int = 0
    input_height: int = 0
    input_width: int = 0
    scale: float = 0.0
    error: str | None = None
    decode_s: float = 0.0
    preprocess_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def load_image(image: ImageSource, options: LoadOptions) -> LoadedImage:
    """Decode and preprocess one image; every exception becomes a one-line failure reason."""
    start = time.perf_counter()
    try:
        decoded = decode_source(image, max_pixels=options.max_pixels, allow_truncated=options.allow_truncated)
        decoded_at = time.perf_counter()
        with _one_thread():
            prepared = prepare_image(decoded.rgb, options.preprocessing)
    except ImageError as error:
        return LoadedImage(image, error=str(error), decode_s=time.perf_counter() - start)
    except MemoryError:
        return LoadedImage(image, error="out of memory while decoding", decode_s=time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - one bad image must never stop a run
        reason = f"{type(error).__name__}: {first_line(error, '')}"
        return LoadedImage(image, error=reason, decode_s=time.perf_counter() - start)
    return LoadedImage(
        image,
        pixels=prepared.tensor.numpy(),
        height=decoded.height,
        width=decoded.width,
        input_height=prepared.input_height,
        input_width=prepared.input_width,
        scale=prepared.scale,
        decode_s=decoded_at - start,
        preprocess_s=time.perf_counter() - decoded_at,
    )


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Preprocess on one thread, as workers do: torch's resize rounds differently where its work is split between
    threads, and the stored features must not depend on ``--workers`` or on the number of cores."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)  # cheap (well under a microsecond); decoding in this process is sequential
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ping() -> bool:
    return True


def _worker_init() -> None:
    # workers share the machine with the model: one thread each
    torch.set_num_threads(1)
    # A terminal's Ctrl-C reaches the whole process group: the main process stops the run and shuts the pool
    # down, so workers ignore it (no half-done task, no traceback from every worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A main process killed outright (kill -9, the OOM killer) cannot shut the pool down: leave with it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), name="fpnx-parent", daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the parent process is gone
    os._exit(1)


LoadFunction = Callable[[ImageSource, LoadOptions], LoadedImage]


class ImageLoader:
    """Iterates :class:`LoadedImage` in the order of ``images``; ``workers=0`` loads in this process.

    ``load`` decodes one image (default :func:`load_image`); another must be a module-level function, so that
    worker processes can import it (tests use this to simulate decoders that crash). Crash isolation needs
    workers: with ``workers=0`` a crashing decoder takes this process with it.
    """

    def __init__(
        self,
        images: Sequence[ImageSource],
        options: LoadOptions,
        *,
        workers: int = 1,
        prefetch: int = 8,
        load: LoadFunction = load_image,
    ):
        self.images = list(images)
        self.options = options
        self.load = load
        self.workers = workers
        self.prefetch = max(prefetch, workers)
        self.crashes = 0
        self._pool: ProcessPoolExecutor | None = None

    def __iter__(self) -> Iterator[LoadedImage]:
        pending: collections.deque[tuple[ImageSource, Future]] = collections.deque()
        upcoming = iter(self.images)
        try:
            while True:
                while len(pending) < self.prefetch and (image := next(upcoming, None)) is not None:
                    pending.append((image, self._submit(image)))
                if not pending:
                    return
                image, future = pending.popleft()
                try:
                    yield future.result()
                except BrokenProcessPool:
                    # the crash hit every image in flight; find the culprit by running them one by one
                    in_flight = [image] + [queued for queued, _ in pending]
                    pending.clear()
                    self.close()
                    for queued in in_flight:
                        yield self._load_isolated(queued)
        finally:
            self.close()

    def _submit(self, image: ImageSource) -> Future:
        if self._pool is None and self.workers > 0:
            self._pool = self._start_pool()
        if self._pool is None:
            future: Future = Future()
            future.set_result(self.load(image, self.options))
            return future
        return self._pool.submit(self.load, image, self.options)

    def _start_pool(self) -> ProcessPoolExecutor | None:
        """A pool whose workers are known to start; None (decode here) where they cannot."""
        # spawn, not fork: forking a process that holds torch's thread pools can deadlock
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        try:
            pool.submit(_ping).result(timeout=300)
        except Exception as error:  # noqa: BLE001 - e.g. a __main__ read from stdin cannot be re-imported
            pool.shutdown(wait=False, cancel_futures=True)
            warnings.warn(f"worker processes cannot start here ({type(error).__name__}); decoding in this process")
            self.workers = 0
            return None
        return pool

    def _load_isolated(self, image: ImageSource) -> LoadedImage:
        try:
            return self._submit(image).result()
        except BrokenProcessPool:
            self.crashes += 1
            self.close()
            return LoadedImage(image, error="the decoder crashed (its worker process died)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def batches(
    loaded: Iterable[LoadedImage], batch_size: int, divisibility: int, on_failure: Callable[[LoadedImage], None]
) -> Iterator[list[LoadedImage]]:
    """Batches of images sharing one padded size; partial batches go when too many images wait.

    Only images of one padded size share a batch, so an image's features never depend on its batch mates (extra
    padding would change the features near its border). Failed images go to ``on_failure``.
    """
    waiting: dict[tuple[int, int], list[LoadedImage]] = {}
    held = 0
    for item in loaded:
        if not item.ok:
            on_failure(item)
            continue
        key = padded_size(item.input_height, item.input_width, divisibility)
        bucket = waiting.setdefault(key, [])
        bucket.append(item)
        held += 1
        if len(bucket) == batch_size:
            held -= len(waiting.pop(key))
            yield bucket
        elif held >= 4 * batch_size:  # bound memory: run the fullest bucket now
            key = max(waiting, key=lambda k: len(waiting[k]))
            bucket = waiting.pop(key)
            held -= len(bucket)
            yield bucket
    yield from waiting.values()
