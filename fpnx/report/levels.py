"""Per-level summaries shared by ``extract``'s report and ``inspect``: map sizes and bytes over many images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    input_sizes: Sequence[tuple[int, int]],
    strides: Mapping[str, int],
    channels: Mapping[str, int],
    itemsize: int,
) -> list[LevelReport]:
    """Reports for each level of ``strides`` (in its order) over images of the given resized input sizes."""
    reports = []
    for name, stride in strides.items():
        maps = [map_size(h, w, stride) for h, w in input_sizes]
        ordered = sorted(maps, key=lambda hw: (hw[0] * hw[1], hw)) or [(0, 0)]
        total = sum(h * w for h, w in maps) * channels[name] * itemsize
        reports.append(LevelReport(name, stride, channels[name], ordered[0], ordered[len(ordered) // 2], ordered[-1], total))
    return reports
