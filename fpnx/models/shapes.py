"""What a model produces, stated without running it."""

from __future__ import annotations

import math
from dataclasses import dataclass


def map_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Height and width of a stride-``stride`` map of a ``height`` x ``width`` input: ``ceil(side / stride)``.

    Each stride-2 step of the network maps n to ceil(n / 2), and nested ceilings of halvings equal one ceiling
    of the whole division. The stored arrays have exactly this size (docs/format.md).
    """
    return math.ceil(height / stride), math.ceil(width / stride)


@dataclass(frozen=True)
class FeatureInfo:
    """One output map: its name (``res3``, ``p4``), channel count and stride in input pixels."""

    name: str
    channels: int
    stride: int

    @property
    def level(self) -> int:
        """log2 of the stride: ``p4`` has stride 16 and level 4."""
        return int(math.log2(self.stride))

    def spatial_size(self, height: int, width: int) -> tuple[int, int]:
        """Height and width of this map for an input of ``height`` x ``width`` pixels."""
        return map_size(height, width, self.stride)
