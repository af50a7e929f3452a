"""``run_bench()``: how fast the network runs, where its time goes, and what it costs, returned as data.

One report holds one row per setting of a sweep (sizes x batch sizes). Each row has the model-only
throughput and latency (median and p90 over the timed iterations, warm-up excluded), the GFLOP/s achieved
against the model's cost for that size (counted from its own conv layers, :func:`model_cost`), the peak
memory, a per-stage breakdown (stem, res2..res5, FPN laterals, top-down, output convs, P6) measured by running
the model's pieces in sequence, and the P2..P6 shapes. Optionally torchvision's R50-FPN backbone is timed in
the same run (iterations interleaved, so machine load hits both alike) and an end-to-end extract of a folder.

On CUDA, times come from CUDA events with a synchronisation after each iteration; elsewhere from
``time.perf_counter`` (MPS synchronises after each stage).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FpnxError, UsageError
from .models import autocast, build_model, cpu_has_native_bf16, optimize_for_inference
from .models.build import FeaturePyramid
from .models.inference import PRECISIONS
from .models.resnet import STAGE_NAMES

DEFAULT_SIZE = (800, 1216)
STAGES = ("stem", *STAGE_NAMES, "fpn_lateral", "fpn_top_down", "fpn_output", "p6")
COMPARE_MODELS = ("torchvision",)

ProgressCallback = Callable[[str], None]


class BenchError(FpnxError):
    """A benchmark could not run as asked (e.g. ``torch.compile`` failed)."""


# -- results --------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """One model's timed iterations at one setting."""

    images_per_s: float
    latency_ms_median: float
    latency_ms_p90: float
    gflop_per_s: float
    peak_memory_bytes: int
    peak_memory_added_bytes: int | None  # CUDA: the peak minus what was allocated before the forward; None elsewhere
    latency_ms_samples: list[float]


@dataclass
class StageTiming:
    name: str
    median_ms: float
    share: float  # of the stage sum
    gflop: float  # per batch


@dataclass
class PipelineTiming:
    """An end-to-end ``extract`` of a folder into a temporary file, at this row's batch size and size bounds."""

    images: int
    failures: int
    min_size: int
    max_size: int
    images_per_s: float
    timings_s: dict[str, float]  # decode, preprocess (summed over workers), model, write, total
    model_only_images_per_s: float
    efficiency: float  # end-to-end images/s over model-only images/s


@dataclass
class BenchRow:
    batch_size: int
    height: int
    width: int
    gflop_per_image: float
    shapes: dict[str, list[int]]  # level -> [C, H, W] of one image
    fpnx: Timing
    stages: list[StageTiming]
    stage_sum_ms: float
    forward_ms: float  # = fpnx.latency_ms_median, beside stage_sum_ms for comparison
    torchvision: Timing | None = None
    ratio: float | None = None  # fpnx images/s over torchvision images/s
    pipeline: PipelineTiming | None = None


@dataclass
class BenchReport:
    """What ``fpnx bench --json`` prints (see docs/inspect-bench.md)."""

    device: str
    device_name: str
    precision: str
    weights: str
    depth: int
    channels_last: bool
    compile: bool
    iters: int
    warmup: int
    threads: int
    torch_version: str
    timer: str
    peak_memory_kind: str
    compare: str | None
    notes: list[str]
    rows: list[BenchRow]
    best: int  # index into rows of the highest fpnx images/s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- options --------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"800x1216,512x768"`` -> ``[(800, 1216), (512, 768)]`` (height x width)."""
    sizes = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        pieces = item.lower().split("x")
        try:
            height, width = (int(piece) for piece in pieces)
        except ValueError:
            raise UsageError(f"--size must be HxW (e.g. 800x1216), or several separated by commas; got {item!r}") from None
        if height < 1 or width < 1:
            raise UsageError(f"--size must be positive, got {item!r}")
        sizes.append((height, width))
    if not sizes:
        raise UsageError("--size needs at least one HxW")
    return sizes


def parse_batch_sizes(text: str | int) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``."""
    values = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"--batch-size must be a number or numbers separated by commas, got {item!r}") from None
        if value < 1:
            raise UsageError(f"--batch-size must be at least 1, got {value}")
        values.append(value)
    if not values:
        raise UsageError("--batch-size needs at least one number")
    return values


# -- the model's cost -----------------------------------------------------------------------------------------


def _conv_out(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    sizes = []
    for axis, size in enumerate((height, width)):
        k, s, p, d = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def _conv_macs(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int, int]:
    """(multiply-accumulates, out height, out width) of ``conv`` on a ``height`` x ``width`` input."""
    out_h, out_w = _conv_out(conv, height, width)
    per_output = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    return conv.out_channels * out_h * out_w * per_output, out_h, out_w


def model_cost(model: FeaturePyramid, height: int, width: int) -> dict[str, float]:
    """GFLOP per image of each stage (``STAGES``) for a ``height`` x ``width`` input, from the model's convs.

    Counted as 2 x the multiply-accumulates of every conv (the model's own layers: kernel sizes, strides,
    channels), at the sizes the formula gives; adds, ReLUs, pooling and upsampling are left out (under 1%).
    No forward pass is run. The sum is about 269 GFLOP for 800x1216 with ResNet-50.
    """
    bottom_up = model.bottom_up
    cost = dict.fromkeys(STAGES, 0.0)
    macs, h, w = _conv_macs(bottom_up.stem.conv1, height, width)
    cost["stem"] = 2 * macs
    h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1  # max-pool 3x3, stride 2, padding 1
    sizes = {}
    for name in STAGE_NAMES:
        for block in getattr(bottom_up, name):
            in_h, in_w = h, w
            for conv_name in ("conv1", "conv2", "conv3"):
                conv = getattr(block, conv_name, None)
                if conv is None:
                    continue
                macs, h, w = _conv_macs(conv, h, w)
                cost[name] += 2 * macs
            if block.shortcut is not None:
                macs, _, _ = _conv_macs(block.shortcut, in_h, in_w)
                cost[name] += 2 * macs
        sizes[name] = (h, w)
    for level_name, in_name in zip(model.lateral_convs, model.in_features):
        h, w = sizes[in_name]
        macs, h, w = _conv_macs(model.lateral_convs[level_name], h, w)
        cost["fpn_lateral"] += 2 * macs
        macs, _, _ = _conv_macs(model.output_convs[level_name], h, w)
        cost["fpn_output"] += 2 * macs
    return {name: value / 1e9 for name, value in cost.items()}


def output_shapes(model: FeaturePyramid, height: int, width: int) -> dict[str, list[int]]:
    """[C, H, W] of each output level for one ``height`` x ``width`` input."""
    return {name: [info.channels, *info.spatial_size(height, width)]
            for name, info in model.output_shape().items()}


# -- clocks and memory ----------------------------------------------------------------------------------------


class _Clock:
    """Marks on one device's timeline: CUDA events, or perf_counter (after a synchronise on MPS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda events" if device.type == "cuda" else "time.perf_counter"

    def mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the stream the work runs on, also for cuda:N
            return event
        if self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """After :meth:`sync`."""
        if self.device.type == "cuda":
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0


class _PeakMemory:
    """CUDA max allocated after a reset; on the CPU the process's peak RSS (reset through /proc where allowed)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda max allocated"
        elif device.type == "mps":
            self.kind = "mps driver allocated"
        elif _can_reset_rss_peak():
            self.kind = "process peak RSS"
        else:
            self.kind = "process peak RSS since start"

    def reset(self) -> int | None:
        """Start a new peak; returns the memory in use now where the rise can be told (CUDA), else None.

        A process's RSS hardly rises during a forward once the allocator holds memory from earlier ones, so
        on the CPU only the peak itself is reported.
        """
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if self.kind == "process peak RSS":
            _reset_rss_peak()
        return None

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        if self.kind == "process peak RSS":
            peak = _status_kb("VmHWM")
            if peak is not None:
                return peak * 1024
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(usage if sys.platform == "darwin" else usage * 1024)  # bytes on macOS, KB on Linux


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _can_reset_rss_peak() -> bool:
    return _status_kb("VmHWM") is not None and _reset_rss_peak()


# -- running the pieces ---------------------------------------------------------------------------------------


def staged_forward(model: FeaturePyramid, x: torch.Tensor, mark: Callable[[], Any] | None = None) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """The model's forward run piece by piece: (outputs, marks) with ``mark()`` called before and after each stage.

    The result equals ``model(x)``: the FPN's laterals are all computed first, then the top-down merges
    (coarse to fine), then the output convs, then P6; the same operations as the fused forward, regrouped.
    """
    mark = mark or (lambda: None)
    marks = [mark()]
    bottom_up = model.bottom_up
    y = bottom_up.stem(x)
    marks.append(mark())
    features = {}
    for name in STAGE_NAMES:
        y = getattr(bottom_up, name)(y)
        features[name] = y
        marks.append(mark())
    pairs = list(zip(model.lateral_convs, model.in_features))  # fine to coarse
    laterals = {level: model.lateral_convs[level](features[in_name]) for level, in_name in pairs}
    marks.append(mark())
    merged: dict[str, torch.Tensor] = {}
    top_down = None
    for level, _ in reversed(pairs):
        lateral = laterals[level]
        if top_down is not None:
            lateral = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
        merged[level] = top_down = lateral
    marks.append(mark())
    outputs = {level: model.output_convs[level](merged[level]) for level, _ in pairs}
    marks.append(mark())
    top = model.top_block
    outputs[top.name] = top(outputs[top.in_feature])
    marks.append(mark())
    return {name: outputs[name] for name in model.output_shape()}, marks


def _torchvision_backbone() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval().backbone.requires_grad_(False)


def _compiled(model: nn.Module, what: str) -> nn.Module:
    try:
        return torch.compile(model)
    except Exception as error:  # noqa: BLE001 - any reason becomes one line
        raise BenchError(f"--compile: torch.compile cannot compile {what}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _timing(samples_ms: list[float], batch_size: int, gflop_per_image: float, peak: tuple[int, int]) -> Timing:
    median = statistics.median(samples_ms)
    return Timing(
        images_per_s=batch_size / (median / 1000.0) if median > 0 else 0.0,
        latency_ms_median=median,
        latency_ms_p90=_percentile(samples_ms, 0.9),
        gflop_per_s=gflop_per_image * batch_size / (median / 1000.0) if median > 0 else 0.0,
        peak_memory_bytes=peak[0],
        peak_memory_added_bytes=peak[1] if peak[1] >= 0 else None,
        latency_ms_samples=samples_ms,
    )


# -- the benchmark --------------------------------------------------------------------------------------------


def run_bench(
    *,
    device: str = "auto",
    precision: str = "fp32",
    batch_sizes: Sequence[int] | int = (1,),
    sizes: Sequence[tuple[int, int]] = (DEFAULT_SIZE,),
    iters: int = 10,
    warmup: int = 2,
    weights: str | os.PathLike | None = "random",
    depth: int | None = None,
    channels_last: bool = True,
    compile: bool = False,
    compare: str | None = None,
    pipeline: str | os.PathLike | None = None,
    threads: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    model: FeaturePyramid | None = None,
) -> BenchReport:
    """Time fpnx's network at each (size, batch size) and return a :class:`BenchReport`.

    The model is built once (``weights``, default seeded random: timings do not depend on the values),
    prepared as ``extract`` prepares it (:func:`~fpnx.models.optimize_for_inference`: folded norms,
    channels_last unless ``channels_last=False``) and run under :func:`~fpnx.models.autocast` in
    ``precision``. ``compare="torchvision"`` also times torchvision's R50-FPN backbone (eager, with the same
    precision and memory format), interleaved iteration by iteration. ``pipeline`` runs an end-to-end
    extract of that folder per row. ``threads`` sets torch's CPU threads for the run. ``model`` times an
    already built network instead of building one from ``weights``/``depth`` (it is prepared in place).
    """
    from .pipeline import resolve_device

    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes]
    batch_sizes = list(batch_sizes)
    sizes = [tuple(size) for size in sizes]
    _check(precision, batch_sizes, sizes, iters, warmup, compare, pipeline, threads)
    torch_device = resolve_device(device)
    say = progress or (lambda message: None)
    notes = []
    if precision == "bf16" and torch_device.type == "cpu" and not cpu_has_native_bf16():
        notes.append("bf16 is emulated on this CPU (no AVX-512 BF16 or AMX): expect it to run slower than fp32")
    if precision == "fp16" and torch_device.type == "cpu" and not _cpu_has_native_fp16():
        notes.append("fp16 is emulated on this CPU (no AMX-FP16): expect it to run slower than fp32")
    if compile:
        notes.append("--compile: the full forward is compiled; the per-stage breakdown runs the eager pieces")

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        say("building the model")
        if model is None:
            model = build_model(weights, depth=depth)
        memory_format = torch.channels_last if channels_last and torch_device.type != "mps" else torch.contiguous_format
        base = optimize_for_inference(model, channels_last=memory_format == torch.channels_last).to(torch_device)
        runner = _compiled(base, "the fpnx model") if compile else base
        reference = None
        if compare == "torchvision":
            say("building torchvision's R50-FPN backbone")
            reference = _torchvision_backbone().to(torch_device, memory_format=memory_format)
            if compile:
                reference = _compiled(reference, "torchvision's backbone")
        rows = []
        for height, width in sizes:
            for batch_size in batch_sizes:
                say(f"{height}x{width}, batch {batch_size}")
                row = _bench_row(base, runner, reference, torch_device, precision, batch_size, height, width,
                                 iters, warmup, memory_format, compile, seed)
                if pipeline is not None:
                    say(f"{height}x{width}, batch {batch_size}: extract of {pipeline}")
                    row.pipeline = _bench_pipeline(model, pipeline, torch_device, precision, batch_size, height,
                                                   width, channels_last, row.fpnx.images_per_s)
                rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)

    best = max(range(len(rows)), key=lambda i: rows[i].fpnx.images_per_s)
    return BenchReport(
        device=str(torch_device),
        device_name=_device_name(torch_device),
        precision=precision,
        weights=model.weights.name,
        depth=model.bottom_up.depth,
        channels_last=memory_format == torch.channels_last,
        compile=compile,
        iters=iters,
        warmup=warmup,
        threads=threads if threads is not None else previous_threads,
        torch_version=torch.__version__,
        timer=_Clock(torch_device).kind,
        peak_memory_kind=_PeakMemory(torch_device).kind,
        compare=compare,
        notes=notes,
        rows=rows,
        best=best,
    )


def _check(precision, batch_sizes, sizes, iters, warmup, compare, pipeline, threads) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UsageError("--batch-size must be at least 1")
    if not sizes or min(min(size) for size in sizes) < 1:
        raise UsageError("--size must be positive")
    if iters < 1:
        raise UsageError(f"--iters must be at least 1, got {iters}")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {warmup}")
    if compare is not None and compare not in COMPARE_MODELS:
        raise UsageError(f"--compare must be one of {', '.join(COMPARE_MODELS)}, got {compare!r}")
    if pipeline is not None and not Path(pipeline).is_dir():
        raise UsageError(f"--pipeline {pipeline}: not a folder")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")


def _cpu_has_native_fp16() -> bool:
    probe = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    return bool(probe()) if probe is not None else False


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as info:
                for line in info:
                    if line.startswith("model name"):
                        return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
        except OSError:
            pass
        return f"CPU ({os.cpu_count()} cores)"
    return device.type


def _bench_row(base, runner, reference, device, precision, batch_size, height, width, iters, warmup,
               memory_format, compile, seed) -> BenchRow:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, height, width, generator=generator)
    x = x.to(device).contiguous(memory_format=memory_format)
    clock = _Clock(device)
    memory = _PeakMemory(device)
    cost = model_cost(base, height, width)
    gflop = sum(cost.values())

    def run_full(module):
        with autocast(device, precision):
            return module(x)

    def run_staged(mark):
        with autocast(device, precision):
            return staged_forward(base, x, mark)

    with torch.no_grad():
        if compile:  # the first call compiles: never timed, its errors are the user's one line
            for module, what in ((runner, "the fpnx model"), (reference, "torchvision's backbone")):
                if module is None:
                    continue
                try:
                    run_full(module)
                except FpnxError:
                    raise
                except Exception as error:  # noqa: BLE001 - torch.compile fails at its first call
                    raise BenchError(f"--compile: torch.compile failed on {what}: {_first_line(error)}") from None
        for _ in range(warmup):
            run_full(runner)
            run_staged(None)
            if reference is not None:
                run_full(reference)
        clock.sync()

        full_ms: list[float] = []
        reference_ms: list[float] = []
        stage_ms: list[list[float]] = []
        peak = reference_peak = (0, -1)
        for _ in range(iters):
            peak = _time_full(clock, memory, lambda: run_full(runner), full_ms, peak)

            _, marks = run_staged(clock.mark)
            clock.sync()
            stage_ms.append([clock.elapsed_ms(a, b) for a, b in zip(marks, marks[1:])])

            if reference is not None:
                reference_peak = _time_full(clock, memory, lambda: run_full(reference), reference_ms, reference_peak)

    medians = [statistics.median(samples[i] for samples in stage_ms) for i in range(len(STAGES))]
    stage_sum = sum(medians)
    stages = [StageTiming(name, value, value / stage_sum if stage_sum > 0 else 0.0, cost[name] * batch_size)
              for name, value in zip(STAGES, medians)]
    fpnx_timing = _timing(full_ms, batch_size, gflop, peak)
    row = BenchRow(
        batch_size=batch_size, height=height, width=width, gflop_per_image=gflop,
        shapes=output_shapes(base, height, width), fpnx=fpnx_timing, stages=stages,
        stage_sum_ms=stage_sum, forward_ms=fpnx_timing.latency_ms_median,
    )
    if reference is not None:
        row.torchvision = _timing(reference_ms, batch_size, gflop, reference_peak)
        if row.torchvision.images_per_s > 0:
            row.ratio = row.fpnx.images_per_s / row.torchvision.images_per_s
    return row


def _time_full(clock, memory, run, samples: list[float], peak):
    """Time one full forward into ``samples``; returns the higher of ``peak`` and this run's memory peak."""
    before = memory.reset()
    start = clock.mark()
    run()
    end = clock.mark()
    clock.sync()
    samples.append(clock.elapsed_ms(start, end))
    return _higher(peak, memory.read(), before)


def _higher(peak: tuple[int, int], now: int, before: int | None) -> tuple[int, int]:
    """(highest peak, highest rise) so far; the rise stays -1 where it cannot be told."""
    return max(peak[0], now), peak[1] if before is None else max(peak[1], now - before, 0)


def _bench_pipeline(model, folder, device, precision, batch_size, height, width, channels_last,
                    model_only_images_per_s) -> PipelineTiming:
    """extract() of ``folder`` into a temporary file, images resized to fit ``height`` x ``width``."""
    from .pipeline import extract

    min_size, max_size = min(height, width), max(height, width)
    with tempfile.TemporaryDirectory(prefix="fpnx-bench-") as tmp:
        summary = extract(
            [os.fspath(folder)], Path(tmp) / "bench.h5", model=model, batch_size=batch_size, device=str(device),
            precision=precision, min_size=min_size, max_size=max_size, channels_last=channels_last,
            overwrite=True, command="fpnx bench --pipeline",
        )
    if summary.images_stored == 0:
        raise UsageError(f"--pipeline {folder}: no image could be extracted from this folder")
    return PipelineTiming(
        images=summary.images_stored,
        failures=len(summary.failures),
        min_size=min_size,
        max_size=max_size,
        images_per_s=summary.images_per_s,
        timings_s={name: summary.timings[name] for name in ("decode", "preprocess", "model", "write", "total")},
        model_only_images_per_s=model_only_images_per_s,
        efficiency=summary.images_per_s / model_only_images_per_s if model_only_images_per_s > 0 else 0.0,
    )
