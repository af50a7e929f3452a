"""What a model produces, stated without running it."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
        size_h, size_w = height, width
        for _ in range(self.level):
            size_h, size_w = (size_h + 1) // 2, (size_w + 1) // 2
        return size_h, size_w
