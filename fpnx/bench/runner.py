"""``run_bench()``: how fast the network runs, where its time goes, and what it costs, returned as data.

One report holds one row per setting of a sweep (sizes x batch sizes). Each row has the model-only
throughput and latency (median and p90 over the timed iterations, warm-up excluded), the GFLOP/s achieved
against the model's cost for that size (:func:`~fpnx.bench.cost.model_cost`), the peak memory, a per-stage
breakdown (stem, res2..res5, FPN laterals, top-down, output convs, P6) measured through hooks on the model's own
stage modules, and the P2..P6 shapes. Optionally torchvision's R50-FPN backbone is timed in the same run
(iterations interleaved, so machine load hits both alike) and an end-to-end extract of a folder.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BenchError, FpnxError, UsageError, first_line
from ..models import FeaturePyramid, autocast, build_model, cpu_has_native_bf16, optimize_for_inference, resolve_device
from ..models.inference import cpu_has_native_fp16
from ..options import check_precision
from ..run import extract
from .cost import model_cost, output_shapes
from .results import BenchReport, BenchRow, PipelineTiming, StageTiming, Timing
from .timers import Clock, PeakMemory, StageTimer, device_name

DEFAULT_SIZE = (800, 1216)
COMPARE_MODELS = ("torchvision",)

ProgressCallback = Callable[[str], None]


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
    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes]
    batch_sizes = list(batch_sizes)
    sizes = [tuple(size) for size in sizes]
    _check(precision, batch_sizes, sizes, iters, warmup, compare, pipeline, threads)
    torch_device = resolve_device(device)
    say = progress or (lambda message: None)
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
        device_name=device_name(torch_device),
        precision=precision,
        weights=model.weights.name,
        depth=model.bottom_up.depth,
        channels_last=memory_format == torch.channels_last,
        compile=compile,
        iters=iters,
        warmup=warmup,
        threads=threads if threads is not None else previous_threads,
        torch_version=torch.__version__,
        timer=Clock(torch_device).kind,
        peak_memory_kind=PeakMemory(torch_device).kind,
        compare=compare,
        notes=_notes(torch_device, precision, compile),
        rows=rows,
        best=best,
    )


def _notes(device: torch.device, precision: str, compile: bool) -> list[str]:
    notes = []
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        notes.append("bf16 is emulated on this CPU (no AVX-512 BF16 or AMX): expect it to run slower than fp32")
    if precision == "fp16" and device.type == "cpu" and not cpu_has_native_fp16():
        notes.append("fp16 is emulated on this CPU (no AMX-FP16): expect it to run slower than fp32")
    if compile:
        notes.append("--compile: the full forward is compiled; the per-stage breakdown times the eager model")
    return notes


def _check(precision, batch_sizes, sizes, iters, warmup, compare, pipeline, threads) -> None:
    check_precision(precision)
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


def _torchvision_backbone() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval().backbone.requires_grad_(False)


def _compiled(model: nn.Module, what: str) -> nn.Module:
    try:
        return torch.compile(model)
    except Exception as error:  # noqa: BLE001 - any reason becomes one line
        raise BenchError(f"--compile: torch.compile cannot compile {what}: {first_line(error)}") from None


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


def _bench_row(base, runner, reference, device, precision, batch_size, height, width, iters, warmup,
               memory_format, compile, seed) -> BenchRow:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, height, width, generator=generator)
    x = x.to(device).contiguous(memory_format=memory_format)
    clock, memory = Clock(device), PeakMemory(device)
    cost = model_cost(base, height, width)
    gflop = sum(cost.values())

    def run(module: nn.Module) -> None:
        with autocast(device, precision):
            module(x)

    with torch.no_grad():
        if compile:
            _compile_first(run, runner, reference)
        for _ in range(warmup):
            for module in (runner, base, reference):
                if module is not None:
                    run(module)
        clock.sync()
        full_ms: list[float] = []
        reference_ms: list[float] = []
        stage_ms: list[list[float]] = []
        peak = reference_peak = (0, -1)
        for _ in range(iters):
            peak = _time_full(clock, memory, lambda: run(runner), full_ms, peak)
            with StageTimer(base, clock) as stages:  # the eager model's own forward, its stages marked by hooks
                run(base)
                clock.sync()
                stage_ms.append(stages.take())
            if reference is not None:
                reference_peak = _time_full(clock, memory, lambda: run(reference), reference_ms, reference_peak)

    names = list(base.stages())
    medians = [statistics.median(samples[i] for samples in stage_ms) for i in range(len(names))]
    stage_sum = sum(medians)
    fpnx_timing = _timing(full_ms, batch_size, gflop, peak)
    row = BenchRow(
        batch_size=batch_size, height=height, width=width, gflop_per_image=gflop,
        shapes=output_shapes(base, height, width), fpnx=fpnx_timing,
        stages=[StageTiming(name, value, value / stage_sum if stage_sum > 0 else 0.0, cost[name] * batch_size)
                for name, value in zip(names, medians)],
        stage_sum_ms=stage_sum, forward_ms=fpnx_timing.latency_ms_median,
    )
    if reference is not None:
        row.torchvision = _timing(reference_ms, batch_size, gflop, reference_peak)
        if row.torchvision.images_per_s > 0:
            row.ratio = row.fpnx.images_per_s / row.torchvision.images_per_s
    return row


def _compile_first(run: Callable[[nn.Module], None], runner: nn.Module, reference: nn.Module | None) -> None:
    """The first call of a compiled module compiles: never timed, and its errors are the user's one line."""
    for module, what in ((runner, "the fpnx model"), (reference, "torchvision's backbone")):
        if module is None:
            continue
        try:
            run(module)
        except FpnxError:
            raise
        except Exception as error:  # noqa: BLE001 - torch.compile fails at its first call
            raise BenchError(f"--compile: torch.compile failed on {what}: {first_line(error)}") from None


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
