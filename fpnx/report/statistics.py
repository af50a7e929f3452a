"""Per-level statistics of stored features, streamed one image at a time in float64."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..store import FeatureReader

# Elements converted to float64 at a time while streaming statistics (8 MiB of float64).
STATS_CHUNK = 1 << 20


@dataclass
class LevelStats:
    """Statistics of every stored value of a level; mean/std/min/max over the finite ones."""

    name: str
    count: int  # values, finite or not
    mean: float | None
    std: float | None  # population standard deviation (numpy's default, ddof=0)
    min: float | None
    max: float | None
    zero_fraction: float | None  # values exactly 0, over count
    nan_count: int
    inf_count: int


class _Accumulator:
    """Count, mean and sum of squared deviations (Chan et al.'s pairwise update, float64), min, max, zeros."""

    def __init__(self) -> None:
        self.count = 0
        self.finite = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.zeros = 0
        self.nans = 0
        self.infs = 0

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        for start in range(0, flat.size, STATS_CHUNK):
            self._add_chunk(flat[start : start + STATS_CHUNK].astype(np.float64))

    def _add_chunk(self, chunk: np.ndarray) -> None:
        self.count += chunk.size
        self.zeros += int(np.count_nonzero(chunk == 0))
        finite_mask = np.isfinite(chunk)
        finite = chunk if finite_mask.all() else chunk[finite_mask]
        if finite.size != chunk.size:
            self.nans += int(np.count_nonzero(np.isnan(chunk)))
            self.infs += int(np.count_nonzero(np.isinf(chunk)))
        n = finite.size
        if n == 0:
            return
        mean = float(finite.mean())
        m2 = float(np.square(finite - mean).sum())
        total = self.finite + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.finite * n / total
        self.finite = total
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))

    def result(self, name: str) -> LevelStats:
        has_values = self.finite > 0
        return LevelStats(
            name=name,
            count=self.count,
            mean=self.mean if has_values else None,
            std=math.sqrt(self.m2 / self.finite) if has_values else None,
            min=self.min if has_values else None,
            max=self.max if has_values else None,
            zero_fraction=self.zeros / self.count if self.count else None,
            nan_count=self.nans,
            inf_count=self.infs,
        )


def level_statistics(reader: FeatureReader, indices: Iterable[int] | None = None) -> list[LevelStats]:
    """Per-level :class:`LevelStats` over the images at ``indices`` (all by default), one image in memory at a time."""
    accumulators = {name: _Accumulator() for name in reader.levels}
    for i in range(len(reader)) if indices is None else indices:
        for name, array in reader[i].items():
            accumulators[name].add(array)
    return [accumulators[name].result(name) for name in reader.levels]


def pooled_statistics(reader: FeatureReader, indices: Iterable[int] | None = None) -> list[LevelStats]:
    """Per-level :class:`LevelStats` of the pooled vectors (``extract --pool``) of the images at ``indices`` (all by
    default): what ``--stats`` describes in a file of vectors only."""
    rows = None if indices is None else list(indices)
    stats = []
    for name in reader.levels:
        accumulator = _Accumulator()
        vectors = reader.pooled(name)
        accumulator.add(vectors if rows is None else vectors[rows])
        stats.append(accumulator.result(name))
    return stats
