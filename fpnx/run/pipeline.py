"""The one-process extraction: paths -> images -> preprocess -> model -> store -> summary.

Decoding and resizing run in worker processes ahead of the model (:mod:`fpnx.loader`); writing runs in a thread
behind it (:class:`~fpnx.store.background.BackgroundWriter`). Images are batched only with images of the same
padded size, so an image's features never depend on its batch mates.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import Interrupted
from ..loader import Batches, ImageLoader, LoadedImage, LoadOptions, default_window
from ..models import (
    FeaturePyramid, build_model, optimize_for_inference, pooled_vectors, resolve_device, valid_regions,
)  # fmt: skip
from ..models.inference import PRECISIONS, all_finite, run_model
from ..options import ExtractOptions, check_output_is_not_an_input, run_metadata
from ..report.levels import level_reports
from ..sources import discover
from ..store import FeatureWriter, ImageRecord
from ..store.background import BackgroundWriter, queue_capacity
from ..store.merge import check_output_path
from ..store.shards import SHARD_KEY, prepare_shard
from .progress import Progress, progress_reporter
from .staging import CudaStage, HostStage, max_output_bytes
from .summary import ExtractSummary


def extract_one(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, options: ExtractOptions) -> ExtractSummary:
    """Extract every image under ``inputs`` (or shard ``options.shard`` of them) into ``out`` in this process.

    Resumes when ``out`` (or its unfinished ``out.parts``) exists with the same settings. A shard is written to
    its own file next to ``out`` (:func:`~fpnx.store.shards.shard_path`); images a finished ``out`` holds count
    as done. Ctrl-C and SIGTERM raise :class:`Interrupted` after keeping everything finished.
    """
    check_output_path(Path(out), "--out")  # before any weights are loaded: a bad --out costs no download
    started = time.perf_counter()
    device = resolve_device(options.device)
    discovery = discover(inputs, archives=options.archives)
    check_output_is_not_an_input(Path(out), discovery.images)
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
        pool=options.pool,
        maps=options.maps,
        **({} if options.commit_every_s is None else {"commit_every_s": options.commit_every_s}),
    ) as writer:
        finished = writer.done_sources | done_before  # failures are finished too, but worth another try
        todo = [image for image in images if image.source not in finished]
        loader = _loader(todo, spec, options, device)
        run = ExtractRun(model, device, options, levels, writer, len(todo), loader)
        run.process_all(loader)
    run.timings["total"] = time.perf_counter() - started
    return run.summary(str(target), len(images), len(images) - len(todo), discovery.skipped)


SETTLED_SPANS = 256  # GPU timing events kept per batch are read this many batches at a time
TASK_IMAGES = 8  # images per worker task: each task costs the main process ~0.5 ms of messages and wake-ups
POOLED = "pooled:"  # the prefix that tells pooled vectors from maps on their way to the host


def _loader(todo, spec, options: ExtractOptions, device: torch.device) -> ImageLoader:
    """Workers that finish the preprocessing on the CPU, or only decode for a GPU, handing images over through
    enough shared-memory slots for every image in flight, waiting for batch mates, or in the batch running."""
    workers = default_workers(device) if options.workers is None else options.workers
    prefetch = max(2 * workers * TASK_IMAGES, options.batch_size * 2)  # two tasks per worker: none waits for work
    load = LoadOptions(spec, options.max_pixels, options.allow_truncated, finish_here=device.type != "cuda")
    slots = prefetch + default_window(options.batch_size) + 2 * options.batch_size
    return ImageLoader(todo, load, workers=workers, prefetch=prefetch, slots=slots, per_task=TASK_IMAGES,
                       timeout_s=options.decode_timeout_s or None)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # on the CPU the model needs the cores; one worker keeps decoding ahead of it
    return 1 if device.type == "cpu" else max(1, min(8, cores - 1))


@dataclass
class _Launched:
    """A batch whose forward was started; on CUDA its overflow check is read one batch later."""

    batch: list[LoadedImage]
    inputs: torch.Tensor
    outputs: dict[str, torch.Tensor]
    finite: torch.Tensor | None  # reduced precision: no NaN/inf in the outputs (on CUDA, in pinned host memory)
    started: float
    events: tuple | None  # CUDA: events before preprocessing, before the forward, after it


class ExtractRun:
    """One extraction in progress: batches through the model, crops to the writer thread, counters, timings."""

    def __init__(self, model: FeaturePyramid, device: torch.device, options: ExtractOptions, levels: list[str],
                 writer: FeatureWriter, total: int, loader: ImageLoader) -> None:
        self.model = model
        self.device = device
        self.options = options
        self.levels = levels
        shapes = model.output_shape()
        self.strides = {name: shapes[name].stride for name in levels}
        self.channels = {name: shapes[name].channels for name in levels}
        self.writer = writer
        self.total = total
        self.fp32_fallbacks = 0
        self.batch_fill = 1.0
        self.timings = {"decode": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0, "finalize": 0.0}
        self.started = time.perf_counter()
        self._clamped: torch.Tensor | None = None  # a running count on the device: read once, at the end
        self._gpu_spans: list[tuple] = []
        self._launched: collections.deque[_Launched] = collections.deque()
        self._report = progress_reporter(options.progress, total)
        self._output = BackgroundWriter(writer, self._written, idle=writer.copy_earlier_work)
        self.stage = self._stage(loader)
        self._compute_threads = torch.get_num_threads()

    def _stage(self, loader: ImageLoader) -> HostStage | CudaStage:
        if self.device.type != "cuda":
            return HostStage(loader, self.model.size_divisibility, self.device)
        spec = loader.options.preprocessing
        output_bytes = sum(self.channels.values()) * 4 + 64 * len(self.strides) if self.options.pool else 0
        if self.options.maps:
            output_bytes += max_output_bytes(spec, self.strides, self.channels, np.dtype(self.options.dtype).itemsize)
        return CudaStage(loader, self.device, spec, self.model.size_divisibility, output_bytes,
                         buffers=self.options.batch_size + queue_capacity(output_bytes) + 2)

    def process_all(self, loader: ImageLoader) -> None:
        """Every image of ``loader`` into the store, then finalize it; Ctrl-C/SIGTERM keep what is finished."""
        batches = Batches(loader, self.options.batch_size, self.model.size_divisibility, self._failed)
        # the host's own work (batches, crops) on one thread: tiny tensor operations spread over busy cores wait on
        # each other; the forward alone uses every thread
        with _sigterm_as_interrupt() as received, _threads(1):
            try:
                try:
                    for batch in batches:
                        self._launched.append(self._launch(batch))
                        while len(self._launched) > (1 if self.device.type == "cuda" else 0):
                            self._complete(self._launched.popleft())
                    while self._launched:
                        self._complete(self._launched.popleft())
                finally:
                    # also after an error or Ctrl-C: what is queued is finished work, and the writer thread must
                    # be done with the writer before anyone commits or closes it
                    self._stop_output()
                finalizing = time.perf_counter()
                self.writer.finalize()
                self.timings["finalize"] = time.perf_counter() - finalizing
            except KeyboardInterrupt:
                self._stop_output()  # a signal during the first stop: the thread may still hold the writer
                self.writer.close()
                kept = (f"{self.writer.path} is complete; the same command removes what is left of "
                        f"{self.writer.parts}" if self.writer.published else
                        f"{self.writer.stored_count} images are kept in {self.writer.parts}; run the same command "
                        f"again to resume")
                raise Interrupted(f"interrupted: {kept}", received[0] if received else signal.SIGINT) from None
            finally:
                loader.close()  # workers stop now, also after an error, not when the generator is collected
                self.batch_fill = batches.fill
        self._settle_device_counts()

    def _launch(self, batch: list[LoadedImage]) -> _Launched:
        """Preprocessing left to the device, and the forward, started (on CUDA: queued, not waited for)."""
        for item in batch:
            self.timings["decode"] += item.decode_s
            self.timings["preprocess"] += item.preprocess_s
        started = time.perf_counter()
        events = self._events(3)
        inputs = self.stage.inputs(batch)
        if events:
            events[1].record(torch.cuda.current_stream(self.device))
        with _threads(self._compute_threads):
            outputs = run_model(self.model, inputs, self.options.precision)
        reduced = PRECISIONS[self.options.precision] is not None
        finite = all_finite(outputs) if reduced else None
        if finite is not None and events:  # read later without waiting for the batches queued after this one
            finite = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
        if events:  # the forward (and that copy) ends here, before the next batch is queued behind it
            events[2].record(torch.cuda.current_stream(self.device))
        return _Launched(batch, inputs, outputs, finite, started, events)

    def _complete(self, launched: _Launched) -> None:
        """Overflow check (fp32 again if needed), crops cast on the device, on their way to the writer thread."""
        outputs, events = launched.outputs, launched.events
        if launched.finite is not None and events:
            events[2].synchronize()  # this batch's forward only: bool() on the device would wait for the next too
        if launched.finite is not None and not bool(launched.finite):
            with _threads(self._compute_threads):
                outputs = run_model(self.model, launched.inputs, "fp32")
            self.fp32_fallbacks += 1
            if events:  # the fp32 forward counts too
                events = (*events[:2], self._events(1)[0])
        features = self.stage.to_host([self._image_outputs(outputs, index, item)
                                       for index, item in enumerate(launched.batch)])
        self.stage.release(launched.batch)
        if events:
            self._gpu_spans.append(events)
            if len(self._gpu_spans) >= 2 * SETTLED_SPANS:  # long done: read them, keep the list short
                self._settle_spans(self._gpu_spans[:SETTLED_SPANS])
                del self._gpu_spans[:SETTLED_SPANS]
        else:
            self.timings["model"] += time.perf_counter() - launched.started
        for item, host in zip(launched.batch, features):
            record = ImageRecord(item.origin.source, item.height, item.width, item.input_height, item.input_width,
                                 item.scale)
            maps = {name: array for name, array in host.arrays.items() if not name.startswith(POOLED)}
            pooled = {name[len(POOLED):]: array for name, array in host.arrays.items() if name.startswith(POOLED)}
            self._output.add(record, maps, pooled=pooled or None, ready=host.ready, done=host.done)

    def _image_outputs(self, outputs: dict[str, torch.Tensor], index: int, item: LoadedImage) -> dict[str, torch.Tensor]:
        """What is stored of one image, still on the device: its maps cropped and cast, its pooled vectors."""
        size = (item.input_height, item.input_width)
        stored: dict[str, torch.Tensor] = {}
        if self.options.maps:
            regions, clamped = valid_regions(outputs, index, size, self.strides, self.options.store_dtype)
            stored.update(regions)
            self._clamped = clamped if self._clamped is None else self._clamped.add_(clamped)
        if self.options.pool is not None:
            vectors = pooled_vectors(outputs, index, size, self.strides, self.options.pool)
            stored.update({POOLED + name: vector for name, vector in vectors.items()})
        return stored

    def _events(self, count: int) -> tuple | None:
        if self.device.type != "cuda":
            return None
        events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(count))
        events[0].record(torch.cuda.current_stream(self.device))
        return events

    def _settle_device_counts(self) -> None:
        """Counts and GPU times kept on the device during the run, read once at its end."""
        if self._gpu_spans:
            torch.cuda.synchronize(self.device)
            self._settle_spans(self._gpu_spans)
            self._gpu_spans.clear()
        self.float16_clamped = 0 if self._clamped is None else int(self._clamped)

    def _settle_spans(self, spans: list[tuple]) -> None:
        spans[-1][-1].synchronize()  # the spans end in order
        for before, forward, done in spans:
            self.timings["preprocess"] += before.elapsed_time(forward) / 1000
            self.timings["model"] += forward.elapsed_time(done) / 1000

    def summary(self, out: str, found: int, already_done: int, skipped: list[tuple[str, str]]) -> ExtractSummary:
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
            levels=level_reports(self._output.input_sizes, self.strides, self.channels,
                                 np.dtype(self.options.dtype).itemsize if self.options.maps else 0),
            timings=self.timings,
            fp32_fallbacks=self.fp32_fallbacks,
            float16_clamped=self.float16_clamped,
            mean_batch_fill=self.batch_fill,
            preprocessing=self.stage.loader.options.preprocessing.to_dict(),
        )

    def _failed(self, item: LoadedImage) -> None:
        self.timings["decode"] += item.decode_s
        self._output.add_failure(item.origin.source, item.error)

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
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM stops the run like Ctrl-C (SIGINT): KeyboardInterrupt, and the signal's number in the list.

    Only the first signal interrupts; later ones are ignored while the run keeps what it finished (about a
    second), so a second Ctrl-C cannot cut that short. kill -9 still can, and loses only the open segment.
    A signal ignored when the run starts stays ignored: a script's ``fpnx extract ... &`` starts with SIGINT
    ignored, so that a Ctrl-C meant for the script leaves the run going (Python keeps it so too).
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum, frame):
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
