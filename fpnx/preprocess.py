"""Resize, normalise and pad images exactly as the weights' own framework does.

Every checkpoint in ``fpnx.weights`` carries a :class:`Preprocessing`, so weights and pixels can never be
mismatched (RGB vs BGR, 0-1 vs 0-255, mean/std, resize rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PIXEL_ORDERS = ("RGB", "BGR")
RESIZE_RULES = ("torchvision", "detectron2")


@dataclass(frozen=True)
class Preprocessing:
    """What a checkpoint expects of its input pixels.

    ``mean`` and ``std`` are per network input channel (so in ``pixel_order``) and in units of ``value_range``:
    pixels are scaled to ``[0, value_range]`` before ``(x - mean) / std``.

    ``resize`` names the framework whose resize is reproduced:

    - ``"torchvision"``: normalise the float image first, then bilinear ``F.interpolate`` (align_corners=False),
      each side ``floor(side * scale)`` (``GeneralizedRCNNTransform``).
    - ``"detectron2"``: PIL bilinear on the uint8 image, sides rounded half up (``ResizeShortestEdge``), then
      normalise.

    ``scale = min(min_size / short_side, max_size / long_side)``; no side becomes smaller than 1.
    The network input is zero-padded (after normalisation) to a multiple of ``size_divisibility``.
    """

    pixel_order: str
    value_range: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 32

    def __post_init__(self) -> None:
        if self.pixel_order not in PIXEL_ORDERS:
            raise ValueError(f"pixel_order must be one of {PIXEL_ORDERS}, got {self.pixel_order!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def replace(self, **changes: Any) -> "Preprocessing":
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


TORCHVISION = Preprocessing(
    pixel_order="RGB",
    value_range=1.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    resize="torchvision",
)

# detectron2's MSRA-initialised R50-FPN configs: BGR 0-255, caffe mean, unit std.
DETECTRON2 = Preprocessing(
    pixel_order="BGR",
    value_range=255.0,
    mean=(103.530, 116.280, 123.675),
    std=(1.0, 1.0, 1.0),
    resize="detectron2",
)
