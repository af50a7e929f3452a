"""The one-process extraction: paths -> images -> preprocess -> model -> store -> summary.

Decoding and resizing run in worker processes ahead of the model (:mod:`fpnx.loader`); writing runs in a thread
behind it (:class:`~fpnx.store.background.BackgroundWriter`). Images are batched only with images of the same
padded size, so an image's features never depend on its batch mates.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import Interrupted
from ..loader import ImageLoader, LoadedImage, LoadOptions, batches
from ..models import FeaturePyramid, build_model, forward, optimize_for_inference, resolve_device, valid_regions
from ..options import ExtractOptions, check_output, run_metadata
from ..preprocess import pad_image, padded_size
from ..report.levels import level_reports
from ..sources import discover
from ..store import FeatureWriter, ImageRecord
from ..store.background import BackgroundWriter
from ..store.shards import SHARD_KEY, prepare_shard
from .progress import Progress, progress_reporter
from .summary import ExtractSummary


def extract_one(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, options: ExtractOptions) -> ExtractSummary:
    """Extract every image under ``inputs`` (or shard ``options.shard`` of them) into ``out`` in this process.

    Resumes when ``out`` (or its unfinished ``out.parts``) exists with the same settings. A shard is written to
    its own file next to ``out`` (:func:`~fpnx.store.shards.shard_path`); images a finished ``out`` holds count
    as done. Ctrl-C and SIGTERM raise :class:`Interrupted` after keeping everything finished.
    """
    check_output(Path(out))
    started = time.perf_counter()
    device = resolve_device(options.device)
    discovery = discover(inputs, archives=options.archives)
    model = options.model if options.model is not None else build_model(options.weights, depth=options.depth,
                                                                         bn_eps=options.bn_eps)
    spec = options.preprocessing(model.preprocessing)
    levels = options.chosen_levels(list(model.output_shape()))
    model = optimize_for_inference(model, channels_last=options.channels_last and device.type != "mps").to(device)
    settings = options.settings(model.weights, spec, levels)
    metadata = run_metadata(options, inputs, device)
    target, done_before, images = Path(out), frozenset(), discovery.images
    if options.shard is not None:
        target, done_before = prepare_shard(Path(out), options.shard, settings, overwrite=options.overwrite)
        images = options.shard.select(images)
        metadata[SHARD_KEY] = options.shard.to_dict()
    shapes = model.output_shape()
    with FeatureWriter(
        target,
        settings=settings,
        metadata=metadata,
        levels=levels,
        channels={name: shapes[name].channels for name in levels},
        strides={name: shapes[name].stride for name in levels},
        dtype=options.dtype,
        compression=options.compression,
        overwrite=options.overwrite,
        **({} if options.commit_every_s is None else {"commit_every_s": options.commit_every_s}),
    ) as writer:
        finished = writer.done_sources | done_before  # failures are finished too, but worth another try
        todo = [image for image in images if image.source not in finished]
        run = ExtractRun(model, device, options, levels, writer, len(todo))
        workers = default_workers(device) if options.workers is None else options.workers
        loader = ImageLoader(todo, LoadOptions(spec, options.max_pixels, options.allow_truncated), workers=workers,
                             prefetch=max(2 * workers, options.batch_size * 2))
        run.process_all(loader)
    run.timings["total"] = time.perf_counter() - started
    return run.summary(str(target), len(images), len(images) - len(todo), discovery.skipped)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # on the CPU the model needs the cores; one worker keeps decoding ahead of it
    return 1 if device.type == "cpu" else max(1, min(8, cores - 1))


class ExtractRun:
    """One extraction in progress: batches through the model, crops to the writer thread, counters, timings."""

    def __init__(self, model: FeaturePyramid, device: torch.device, options: ExtractOptions, levels: list[str],
                 writer: FeatureWriter, total: int) -> None:
        self.model = model
        self.device = device
        self.options = options
        self.levels = levels
        self.strides = {name: model.output_shape()[name].stride for name in levels}
        self.writer = writer
        self.total = total
        self.fp32_fallbacks = 0
        self.float16_clamped = 0
        self.timings = {"decode": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0}
        self.started = time.perf_counter()
        self._report = progress_reporter(options.progress, total)
        self._output = BackgroundWriter(writer, self._written)

    def process_all(self, loader: ImageLoader) -> None:
        """Every image of ``loader`` into the store, then finalize it; Ctrl-C/SIGTERM keep what is finished."""
        with _sigterm_as_interrupt() as received:
            try:
                try:
                    for batch in batches(loader, self.options.batch_size, self.model.size_divisibility,
                                         self._failed):
                        self._run_batch(batch)
                finally:
                    # also after an error or Ctrl-C: what is queued is finished work, and the writer thread must
                    # be done with the writer before anyone commits or closes it
                    self._stop_output()
                self.writer.finalize()
            except KeyboardInterrupt:
                self._stop_output()  # a signal during the first stop: the thread may still hold the writer
                self.writer.close()
                raise Interrupted(
                    f"interrupted: {self.writer.stored_count} images are kept in {self.writer.parts}; "
                    f"run the same command again to resume",
                    received[0] if received else signal.SIGINT,
                ) from None
            finally:
                loader.close()  # workers stop now, also after an error, not when the generator is collected

    def summary(self, out: str, found: int, already_done: int, skipped: list[tuple[str, str]]) -> ExtractSummary:
        shapes = self.model.output_shape()
        return ExtractSummary(
            out=out,
            weights=self.model.weights.to_dict(),
            device=str(self.device),
            precision=self.options.precision,
            dtype=self.options.dtype,
            images_found=found,
            images_already_done=already_done,
            images_stored=self._output.stored,
            failures=self._output.failures,
            skipped=skipped,
            levels=level_reports(self._output.input_sizes, self.strides,
                                 {name: shapes[name].channels for name in self.levels},
                                 np.dtype(self.options.dtype).itemsize),
            timings=self.timings,
            fp32_fallbacks=self.fp32_fallbacks,
            float16_clamped=self.float16_clamped,
        )

    def _failed(self, item: LoadedImage) -> None:
        self.timings["decode"] += item.decode_s
        self._output.add_failure(item.origin.source, item.error)

    def _run_batch(self, batch: list[LoadedImage]) -> None:
        for item in batch:
            self.timings["decode"] += item.decode_s
            self.timings["preprocess"] += item.preprocess_s
        height, width = padded_size(batch[0].input_height, batch[0].input_width, self.model.size_divisibility)
        pixels = torch.stack([pad_image(torch.from_numpy(item.pixels), height, width) for item in batch])
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        start = time.perf_counter()
        result = forward(self.model, pixels, self.options.precision)
        self.fp32_fallbacks += int(result.fell_back_to_fp32)
        crops = []
        for index, item in enumerate(batch):
            regions, clamped = valid_regions(result.outputs, index, (item.input_height, item.input_width),
                                             self.strides, self.options.store_dtype)
            self.float16_clamped += clamped
            crops.append({name: region.to("cpu", non_blocking=True) for name, region in regions.items()})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["model"] += time.perf_counter() - start
        for item, features in zip(batch, crops):
            record = ImageRecord(item.origin.source, item.height, item.width, item.input_height, item.input_width,
                                 item.scale)
            self._output.add(record, {name: region.numpy() for name, region in features.items()})

    def _written(self) -> None:
        """In the writer thread, after each image or failure."""
        self.timings["write"] = self._output.seconds
        done = self._output.stored + len(self._output.failures)
        self._report(Progress(done, self.total, len(self._output.failures), time.perf_counter() - self.started))

    def _stop_output(self) -> None:
        try:
            self._output.stop()
        finally:
            self._report(None)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM stops the run like Ctrl-C (SIGINT): KeyboardInterrupt, and the signal's number in the list.

    Only the first signal interrupts; later ones are ignored while the run keeps what it finished (about a
    second), so a second Ctrl-C cannot cut that short. kill -9 still can, and loses only the open segment.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum, frame):
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
