"""Decode and preprocess images in worker processes, in input order, with bounded prefetch.

A decoder that raises costs its image a failure record; a decoder that crashes its process (a segfault, the
OOM killer) is found by re-running the images that were in flight one at a time, and costs only that image.
"""

from __future__ import annotations

import collections
import multiprocessing
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ImageError
from .images import DEFAULT_MAX_PIXELS, ImageSource, decode_image
from .preprocess import Preprocessing, prepare_image


@dataclass(frozen=True)
class LoadOptions:
    preprocessing: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False


@dataclass
class LoadedImage:
    """One image ready for the network (``pixels`` (3, h, w) float32, unpadded), or the reason it failed."""

    image: ImageSource
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
        decoded = decode_image(image.path, max_pixels=options.max_pixels, allow_truncated=options.allow_truncated)
        decoded_at = time.perf_counter()
        prepared = prepare_image(decoded.rgb, options.preprocessing)
    except ImageError as error:
        return LoadedImage(image, error=str(error), decode_s=time.perf_counter() - start)
    except MemoryError:
        return LoadedImage(image, error="out of memory while decoding", decode_s=time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - one bad image must never stop a run
        reason = (str(error).strip().splitlines() or [""])[0]
        return LoadedImage(image, error=f"{type(error).__name__}: {reason}", decode_s=time.perf_counter() - start)
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


def _ping() -> bool:
    return True


def _worker_init() -> None:
    # workers share the machine with the model: one thread each
    torch.set_num_threads(1)


class ImageLoader:
    """Iterates :class:`LoadedImage` in the order of ``images``; ``workers=0`` loads in this process."""

    def __init__(self, images: Sequence[ImageSource], options: LoadOptions, *, workers: int = 1, prefetch: int = 8):
        self.images = list(images)
        self.options = options
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
            future.set_result(load_image(image, self.options))
            return future
        return self._pool.submit(load_image, image, self.options)

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
