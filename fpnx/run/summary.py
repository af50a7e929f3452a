"""What an extraction did, as data: ``ExtractSummary`` (``--json`` prints its ``to_dict()``), and one summary
for a run split into shards."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..report.levels import LevelReport
from ..store import MergeSummary

STAGES = ("decode", "preprocess", "model", "write", "finalize")
"""Where a run's time goes (``finalize``: merging the committed segments into the output); ``timings`` also has
``total`` (wall time) and, for sharded runs, ``merge``."""


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
    mean_batch_fill: float = 1.0  # images per batch over --batch-size, averaged over the batches
    # what this run did to the pixels (``weights["preprocessing"]`` is what the weights carry; sizes and pixel
    # order may differ by option)
    preprocessing: dict[str, Any] = field(default_factory=dict)

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


def combine_summaries(
    summaries: Sequence[ExtractSummary], out: str, merged: MergeSummary | None, total_s: float
) -> ExtractSummary:
    """One summary for a run split into shards: counts and bytes added up, the merge's time included.

    Level sizes: min and max are exact; the median is the median of the shards' medians weighted by their image
    counts. Stage timings are summed over ranks; ``total`` is the wall time of the whole run.
    """
    first = summaries[0]
    stored = [s for s in summaries if s.images_stored]
    levels = [_combine_level([s.levels[k] for s in stored] or [first.levels[k]], [s.images_stored for s in stored])
              for k in range(len(first.levels))]
    timings = {name: sum(s.timings.get(name, 0.0) for s in summaries) for name in STAGES}
    timings["merge"] = merged.seconds if merged is not None else 0.0
    timings["total"] = total_s
    devices = [s.device for s in summaries]
    device = f"{len(devices)} x {devices[0]}" if len(set(devices)) == 1 else ", ".join(devices)
    return dataclasses.replace(
        first,
        out=out,
        device=device,
        images_found=sum(s.images_found for s in summaries),
        images_already_done=sum(s.images_already_done for s in summaries),
        images_stored=sum(s.images_stored for s in summaries),
        failures=[failure for s in summaries for failure in s.failures],
        levels=levels,
        timings=timings,
        fp32_fallbacks=sum(s.fp32_fallbacks for s in summaries),
        mean_batch_fill=_weighted_fill(summaries),
        float16_clamped=sum(s.float16_clamped for s in summaries),
    )


def _combine_level(reports: Sequence[LevelReport], weights: Sequence[int]) -> LevelReport:
    def area(hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        return hw[0] * hw[1], tuple(hw)

    first = reports[0]
    if len(reports) == 1:
        return first
    medians = [tuple(r.median_hw) for r, w in zip(reports, weights) for _ in range(w)]
    return dataclasses.replace(
        first,
        min_hw=min((tuple(r.min_hw) for r in reports), key=area),
        max_hw=max((tuple(r.max_hw) for r in reports), key=area),
        median_hw=sorted(medians, key=area)[len(medians) // 2] if medians else tuple(first.median_hw),
        bytes=sum(r.bytes for r in reports),
    )


def _weighted_fill(summaries: Sequence[ExtractSummary]) -> float:
    stored = sum(s.images_stored for s in summaries)
    return sum(s.mean_batch_fill * s.images_stored for s in summaries) / stored if stored else 1.0
