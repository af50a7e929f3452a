"""Per-level summaries shared by ``extract``'s report and ``inspect``: map sizes and bytes over many images."""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from ..models.shapes import map_size


@dataclass
class LevelReport:
    """One level over a set of images: min/median/max map size (ordered by area) and the bytes of its arrays."""

    name: str
    stride: int
    channels: int
    min_hw: tuple[int, int]
    median_hw: tuple[int, int]
    max_hw: tuple[int, int]
    bytes: int  # C * H * W * itemsize summed over the images: the arrays as read
    stored_bytes: int | None = None  # what the level takes in a file (after compression), where known


def level_reports(
    size_counts: Mapping[tuple[int, int], int],
    strides: Mapping[str, int],
    channels: Mapping[str, int],
    itemsize: int,
) -> list[LevelReport]:
    """Reports for each level of ``strides`` (in its order) over images of the given resized input sizes, given as
    ``{(input_height, input_width): number of images}`` (a run of millions of images has few distinct sizes)."""
    images = sum(size_counts.values())
    reports = []
    for name, stride in strides.items():
        maps: collections.Counter[tuple[int, int]] = collections.Counter()
        for (height, width), count in size_counts.items():
            maps[map_size(height, width, stride)] += count
        ordered = sorted(maps, key=lambda hw: (hw[0] * hw[1], hw)) or [(0, 0)]
        ends = list(itertools.accumulate(maps[hw] for hw in ordered))  # images up to each size, in that order
        median = ordered[min(bisect.bisect_right(ends, images // 2), len(ordered) - 1)]
        total = sum(h * w * count for (h, w), count in maps.items()) * channels[name] * itemsize
        reports.append(LevelReport(name, stride, channels[name], ordered[0], median, ordered[-1], total))
    return reports
