"""``extract()``: paths -> images -> preprocess -> model -> writer -> summary.

Decoding and resizing run in worker processes ahead of the model; writing runs in a thread behind it. Images
are batched only with images of the same padded size, so an image's features never depend on its batch mates
(extra padding would change the features near its border).
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from . import distributed
from .errors import FpnxError, UsageError
from .images import DEFAULT_MAX_PIXELS, discover
from .loader import ImageLoader, LoadedImage, LoadOptions
from .models import build_model, forward, optimize_for_inference
from .models.inference import PRECISIONS
from .models.build import FeaturePyramid
from .preprocess import PIXEL_ORDERS, pad_image, padded_size
from .report import LevelReport, level_reports
from .store import FeatureWriter, ImageRecord
from .weights import DEFAULT_WEIGHTS

DTYPES = {"float32": torch.float32, "float16": torch.float16}
COMPRESSIONS = ("none", "lzf", "gzip")
LEVELS = ("p2", "p3", "p4", "p5", "p6")  # what every fpnx network produces; checked before loading weights
FLOAT16_MAX = 65504.0

ProgressCallback = Callable[["Progress"], None]


class Interrupted(FpnxError):
    """Ctrl-C or SIGTERM: finished work is kept; the message says how to resume.

    ``exit_code`` is 128 + the signal's number, as a shell reports a process stopped by it: 130 for Ctrl-C
    (SIGINT), 143 for SIGTERM.
    """

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


@dataclass
class Progress:
    done: int
    total: int
    failed: int
    elapsed_s: float


@dataclass
class ExtractSummary:
    """What a run did; ``to_dict()`` is what ``fpnx extract --json`` prints."""

    out: str
    weights: dict[str, Any]
    device: str
    precision: str
    dtype: str
    images_found: int
    images_already_done: int
    images_stored: int
    failures: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    levels: list[LevelReport]
    timings: dict[str, float]
    fp32_fallbacks: int = 0
    float16_clamped: int = 0

    @property
    def images_per_s(self) -> float:
        total = self.timings.get("total", 0.0)
        return self.images_stored / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["images_per_s"] = self.images_per_s
        data["failures"] = [{"source": s, "reason": r} for s, r in self.failures]
        data["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return data


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"device {device}: MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return resolved


def extract(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = DEFAULT_WEIGHTS,
    depth: int | None = None,
    bn_eps: float | None = None,
    levels: Sequence[str] | None = None,
    batch_size: int = 1,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    pixel_order: str | None = None,
    dtype: str = "float32",
    compression: str = "none",
    overwrite: bool = False,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    commit_every_s: float | None = None,
    channels_last: bool = True,
    progress: bool | ProgressCallback = False,
    command: str | None = None,
    model: FeaturePyramid | None = None,
    shard: distributed.Shard | str | tuple[int, int] | None = None,
) -> ExtractSummary:
    """Extract P2..P6 (or ``levels``) of every image under ``inputs`` into the HDF5 file ``out``.

    Resumes when ``out`` (or its unfinished ``out.parts``) exists with the same settings; ``overwrite`` starts
    anew. Failed images are recorded with a reason and the run goes on. ``progress=True`` shows a tqdm bar;
    a callable gets :class:`Progress` updates instead. Returns an :class:`ExtractSummary`.

    Images that failed in an earlier run are tried again (a fixed file gets stored). Ctrl-C and SIGTERM raise
    :class:`Interrupted` after keeping everything finished. ``commit_every_s`` (advanced; default: the writer's
    10 s) is how often finished images are made durable: a crash loses at most that much work (a tiny value
    commits after every image).

    ``shard="I/N"`` extracts only shard I of N into ``OUT.shard-0000I-of-0000N.h5`` (join them with
    :func:`fpnx.distributed.merge_shards`). Launched by torchrun, each process extracts its own shard and rank 0
    merges them into ``out`` (:func:`fpnx.distributed.extract_with_torchrun`). See docs/scaling.md.
    """
    if shard is None and distributed.launched() is not None:  # torchrun: one shard per process, then a merge
        options = {name: value for name, value in locals().items() if name not in ("inputs", "out", "shard")}
        return distributed.extract_with_torchrun(inputs, out, **options)
    _check_options(batch_size, min_size, max_size, pixel_order, dtype, compression, workers, max_pixels, levels)
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _check_output(Path(out))
    shard = distributed.as_shard(shard)
    started = time.perf_counter()
    torch_device = resolve_device(device)
    discovery = discover(inputs)
    if model is None:
        model = build_model(weights, depth=depth, bn_eps=bn_eps)
    spec = model.preprocessing.replace(min_size=min_size, max_size=max_size, pixel_order=pixel_order)
    shapes = model.output_shape()
    levels = [name for name in shapes if name in (levels or shapes)]  # canonical order, no duplicates
    model = optimize_for_inference(model, channels_last=channels_last and torch_device.type != "mps").to(torch_device)

    settings = {
        "weights": {k: v for k, v in model.weights.to_dict().items() if k not in ("file", "description")},
        "preprocessing": spec.to_dict(),
        "levels": levels,
        "dtype": dtype,
        "compression": compression,
        "precision": precision,
    }
    metadata = {
        "fpnx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(sys.argv),
        "device": str(torch_device),
        "torch_version": torch.__version__,
    }
    target, done_before = out, frozenset()  # a shard: its own file; what a finished OUT.h5 holds is done
    if shard is not None:
        target, done_before = distributed.prepare_shard(Path(out), shard, settings, overwrite=overwrite)
        discovery = dataclasses.replace(discovery, images=shard.select(discovery.images))
        metadata[distributed.SHARD_KEY] = shard.to_dict()
    with FeatureWriter(
        target,
        settings=settings,
        metadata=metadata,
        levels=levels,
        channels={name: shapes[name].channels for name in levels},
        strides={name: shapes[name].stride for name in levels},
        dtype=dtype,
        compression=compression,
        overwrite=overwrite,
        **({} if commit_every_s is None else {"commit_every_s": commit_every_s}),
    ) as writer:
        finished = writer.done_sources | done_before  # failures are finished too, but worth another try
        todo = [image for image in discovery.images if image.source not in finished]
        run = _Run(model, torch_device, precision, levels, DTYPES[dtype], writer, len(todo), progress)
        workers = _default_workers(torch_device) if workers is None else workers
        loader = ImageLoader(todo, LoadOptions(spec, max_pixels, allow_truncated), workers=workers,
                             prefetch=max(2 * workers, batch_size * 2))
        with _sigterm_as_interrupt() as received:
            try:
                run.process(loader, batch_size)
                writer.finalize()
            except KeyboardInterrupt:
                run.stop_writer()
                writer.close()
                raise Interrupted(
                    f"interrupted: {writer.stored_count} images are kept in {target}.parts; "
                    f"run the same command again to resume",
                    received[0] if received else signal.SIGINT,
                ) from None
            finally:
                loader.close()  # workers stop now, also after an error, not when the generator is collected
    timings = run.timings
    timings["total"] = time.perf_counter() - started
    return ExtractSummary(
        out=str(target),
        weights=model.weights.to_dict(),
        device=str(torch_device),
        precision=precision,
        dtype=dtype,
        images_found=len(discovery.images),
        images_already_done=len(discovery.images) - len(todo),
        images_stored=run.stored,
        failures=run.failures,
        skipped=discovery.skipped,
        levels=level_reports(run.sizes, {n: shapes[n].stride for n in levels}, {n: shapes[n].channels for n in levels},
                             np.dtype(dtype).itemsize),
        timings=timings,
        fp32_fallbacks=run.fp32_fallbacks,
        float16_clamped=run.float16_clamped,
    )


def _check_options(batch_size, min_size, max_size, pixel_order, dtype, compression, workers, max_pixels, levels) -> None:
    unknown = [name for name in levels or () if name not in LEVELS]
    if unknown:
        raise UsageError(f"unknown level {unknown[0]!r}; choose from {', '.join(LEVELS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if min_size < 1 or max_size < 1:
        raise UsageError(f"--min-size and --max-size must be positive, got {min_size} and {max_size}")
    if pixel_order is not None and pixel_order not in PIXEL_ORDERS:
        raise UsageError(f"--pixel-order must be RGB or BGR, got {pixel_order!r}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be float32 or float16, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    if max_pixels < 1:
        raise UsageError(f"--max-pixels must be positive, got {max_pixels}")


def _check_output(out: Path) -> None:
    """Before any weights are loaded: a bad --out should not cost a download."""
    if out.is_dir():
        raise UsageError(f"{out} is a folder; --out must be a file path such as features.h5")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")


def _default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # on the CPU the model needs the cores; one worker keeps decoding ahead of it
    return 1 if device.type == "cpu" else max(1, min(8, cores - 1))


class _Run:
    """The state of one extraction: batching, the model, the writer thread, counters and timings."""

    def __init__(self, model, device, precision, levels, store_dtype, writer, total, progress):
        self.model = model
        self.device = device
        self.precision = precision
        self.levels = levels
        self.strides = {name: info.stride for name, info in model.output_shape().items()}
        self.store_dtype = store_dtype
        self.writer = writer
        self.total = total
        self.report = _progress_reporter(progress, total)
        self.divisibility = model.size_divisibility
        self.stored = 0
        self.failures: list[tuple[str, str]] = []
        self.sizes: list[tuple[int, int]] = []
        self.fp32_fallbacks = 0
        self.float16_clamped = 0
        self.timings = {"decode": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0}
        self.started = time.perf_counter()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._writer_error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="fpnx-writer", daemon=True)
        self._thread.start()

    def process(self, loader: ImageLoader, batch_size: int) -> None:
        try:
            for batch in _buckets(loader, batch_size, self.divisibility, self._record_failure):
                self._run_batch(batch)
        finally:
            # Also after an error or Ctrl-C: what is queued is finished work, and the writer thread must be
            # done with the writer before anyone commits or closes it.
            self.stop_writer()

    def _record_failure(self, item: LoadedImage) -> None:
        self.timings["decode"] += item.decode_s
        self._put(("failure", item.image.source, item.error))

    def _run_batch(self, batch: list[LoadedImage]) -> None:
        for item in batch:
            self.timings["decode"] += item.decode_s
            self.timings["preprocess"] += item.preprocess_s
        height, width = padded_size(batch[0].input_height, batch[0].input_width, self.divisibility)
        pixels = torch.stack([pad_image(torch.from_numpy(item.pixels), height, width) for item in batch])
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        start = time.perf_counter()
        result = forward(self.model, pixels, self.precision)
        self.fp32_fallbacks += int(result.fell_back_to_fp32)
        crops = [self._crop(result.outputs, index, item) for index, item in enumerate(batch)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings["model"] += time.perf_counter() - start
        for item, features in zip(batch, crops):
            record = ImageRecord(
                item.image.source, item.height, item.width, item.input_height, item.input_width, item.scale
            )
            self._put(("image", record, features))

    def _crop(self, outputs: dict[str, torch.Tensor], index: int, item: LoadedImage) -> dict[str, torch.Tensor]:
        """The valid region of each level, cast to the stored dtype on the device, then moved to the host."""
        features = {}
        for name in self.levels:
            stride = self.strides[name]
            h, w = math.ceil(item.input_height / stride), math.ceil(item.input_width / stride)
            region = outputs[name][index, :, :h, :w].float()
            if self.store_dtype == torch.float16:
                overflow = region.abs() > FLOAT16_MAX
                if bool(overflow.any()):
                    # inf in a stored file is worse than a clamped value; the summary counts them
                    self.float16_clamped += int(overflow.sum())
                    region = region.clamp(-FLOAT16_MAX, FLOAT16_MAX)
            features[name] = region.to(self.store_dtype).contiguous().to("cpu", non_blocking=True)
        return features

    # -- the writer thread ------------------------------------------------------------------------------
    def _put(self, item: tuple) -> None:
        while True:
            if self._writer_error is not None:
                raise self._writer_error
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._writer_error is not None:
                continue
            start = time.perf_counter()
            try:
                if item[0] == "image":
                    _, record, features = item
                    self.writer.add(record, {k: v.numpy() for k, v in features.items()})
                    self.stored += 1
                    self.sizes.append((record.input_height, record.input_width))
                else:
                    _, source, reason = item
                    self.writer.add_failure(source, reason)
                    self.failures.append((source, reason))
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self._writer_error = error
            self.timings["write"] += time.perf_counter() - start
            self.report(Progress(self.stored + len(self.failures), self.total, len(self.failures),
                                 time.perf_counter() - self.started))

    def stop_writer(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.report(None)
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error


def _buckets(loader: ImageLoader, batch_size: int, divisibility: int, on_failure) -> Iterator[list[LoadedImage]]:
    """Batches of images sharing one padded size; partial batches go when too many images wait."""
    waiting: dict[tuple[int, int], list[LoadedImage]] = {}
    held = 0
    for item in loader:
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


def _progress_reporter(progress: bool | ProgressCallback, total: int) -> Callable[[Progress | None], None]:
    """``None`` closes the bar."""
    if callable(progress):
        return lambda update: update is not None and progress(update)
    if not progress:
        return lambda update: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def report(update: Progress | None) -> None:
        if update is None:
            bar.close()
            return
        bar.n = update.done
        bar.set_postfix(failed=update.failed, refresh=False)
        bar.refresh()

    return report


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
