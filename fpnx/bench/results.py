"""What ``fpnx bench`` measured, as data: ``--json`` prints ``BenchReport.to_dict()`` (docs/inspect-bench.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
