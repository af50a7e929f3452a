"""Region features from stored maps: each box pooled from the FPN level its weights' framework would choose.

Both frameworks follow the FPN paper's rule, ``k = floor(4 + log2(sqrt(w * h) / 224))`` with the box in network
input pixels, clamped to the levels pooled from, then sample with ``torchvision.ops.roi_align``; they differ in
the details, which are reproduced here:

- torchvision (``models/detection/transform.py: resize_boxes``; ``ops/poolers.py: LevelMapper``,
  ``MultiScaleRoIAlign``): original -> input pixels by each axis's float32 ratio ``input side / original
  side``; ``k = floor(4 + log2(sqrt(area) / 224) + 1e-6)`` (epsilon added after the log); ``aligned=False``.
- detectron2 (``data/transforms/transform.py: ResizeTransform.apply_coords``; ``modeling/poolers.py:
  assign_boxes_to_levels``, ``ROIPooler`` with ``ROIAlignV2``): ``x * (new_w / w)``, ``y * (new_h / h)`` in
  float64, then float32; ``k = floor(4 + log2(sqrt(area) / 224 + 1e-8))`` (epsilon inside the log);
  ``aligned=True``.
- Sampling points per bin: torchvision's ``MultiScaleRoIAlign`` in its detection models takes 2; detectron2's
  R-CNN configs keep ``POOLER_SAMPLING_RATIO = 0`` (adaptive: ``ceil(bin size)``) from ``config/defaults.py``.

Edges: the network saw its input zero-padded to a multiple of ``size_divisibility``, but a stored map covers
only the image, ``n = ceil(side / stride)`` rows and columns. Each map is zero-padded to the padded input's
map before sampling, so the result equals the framework's pooler run on the stored maps zero-padded as a batch
is. It also equals the pooler on the network's own maps, except where a bilinear sample reads row or column
``n`` where the network's map has one (the padded side is longer than ``stride * n``): a sample further down or
right than ``stride * (n - 1)`` input pixels (torchvision; ``stride * (n - 1/2)`` for detectron2's aligned
sampling), i.e. in the image's last stride (half stride), blends in zero where the network's map holds its
response to the padding. Boxes more than a stride inside the bottom and right edges never do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import StoreError, UsageError
from ..models.shapes import map_size
from .schema import Layout

FRAMEWORKS = ("torchvision", "detectron2")
POOLED_LEVELS = ("p2", "p3", "p4", "p5")  # the box heads of both frameworks pool from P2-P5, never P6
CANONICAL_SIZE = 224
CANONICAL_LEVEL = 4
TORCHVISION_EPS = 1e-6  # LevelMapper(eps=1e-6)
DETECTRON2_EPS = 1e-8  # assign_boxes_to_levels
SAMPLING_RATIOS = {"torchvision": 2, "detectron2": 0}  # MultiScaleRoIAlign(..., 2); POOLER_SAMPLING_RATIO = 0


def framework_of(metadata: Mapping[str, Any], path: Path, framework: str | None = None) -> str:
    """The framework whose rules apply: ``framework`` if given, else the weights' recorded one, else (random
    weights) the one whose preprocessing the run used."""
    if framework is not None:
        if framework not in FRAMEWORKS:
            raise UsageError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
        return framework
    weights = metadata.get("weights")
    preprocessing = metadata.get("preprocessing")
    for candidate in (
        weights.get("framework") if isinstance(weights, Mapping) else None,
        preprocessing.get("resize") if isinstance(preprocessing, Mapping) else None,
    ):
        if candidate in FRAMEWORKS:
            return candidate
    raise StoreError(
        f"{path} does not record torchvision or detectron2 weights or preprocessing; pass framework= to roi_align"
    )


@dataclass(frozen=True)
class RegionRule:
    """How one store's boxes are mapped, assigned to levels and sampled."""

    framework: str
    levels: tuple[str, ...]  # the stored ones among P2-P5, finest first
    numbers: tuple[int, ...]  # their k = log2(stride)
    strides: tuple[int, ...]
    channels: int
    size_divisibility: int

    @classmethod
    def of(cls, layout: Layout, metadata: Mapping[str, Any], path: Path, framework: str | None = None) -> "RegionRule":
        levels = sorted((name for name in layout.levels if name in POOLED_LEVELS), key=lambda name: layout.strides[name])
        if not levels:
            raise UsageError(f"{path} stores none of {', '.join(POOLED_LEVELS)}, the levels regions are pooled from")
        if len({layout.channels[name] for name in levels}) > 1:
            raise UsageError(f"{path}: levels {', '.join(levels)} differ in channels; regions need them equal")
        preprocessing = metadata.get("preprocessing")
        divisibility = preprocessing.get("size_divisibility", 32) if isinstance(preprocessing, Mapping) else 32
        strides = tuple(layout.strides[name] for name in levels)
        return cls(
            framework=framework_of(metadata, path, framework),
            levels=tuple(levels),
            numbers=tuple(int(round(math.log2(stride))) for stride in strides),
            strides=strides,
            channels=layout.channels[levels[0]],
            size_divisibility=int(divisibility),
        )

    def to_input(self, boxes: np.ndarray, info: Mapping[str, Any]) -> torch.Tensor:
        """Boxes (K, 4) in original pixels -> network input pixels, float32, as the framework maps them."""
        height, width = info["height"], info["width"]
        input_height, input_width = info["input_height"], info["input_width"]
        if self.framework == "torchvision":
            tensor = torch.as_tensor(boxes, dtype=torch.float32)
            ratio_height = torch.tensor(input_height, dtype=torch.float32) / torch.tensor(height, dtype=torch.float32)
            ratio_width = torch.tensor(input_width, dtype=torch.float32) / torch.tensor(width, dtype=torch.float32)
            x1, y1, x2, y2 = tensor.unbind(1)
            return torch.stack((x1 * ratio_width, y1 * ratio_height, x2 * ratio_width, y2 * ratio_height), dim=1)
        mapped = np.array(boxes, dtype=np.float64)
        mapped[:, 0::2] *= input_width * 1.0 / width
        mapped[:, 1::2] *= input_height * 1.0 / height
        return torch.as_tensor(mapped, dtype=torch.float32)

    def assign(self, boxes: torch.Tensor) -> torch.Tensor:
        """Index into :attr:`levels` of each box (in input pixels): the framework's k, clamped to the stored
        range; where levels in that range are missing, the nearest stored one (the finer on a tie)."""
        from torchvision.ops import box_area  # here, not at the top: importing torchvision costs ~1 s

        sizes = torch.sqrt(box_area(boxes))
        if self.framework == "torchvision":
            wanted = torch.floor(
                CANONICAL_LEVEL + torch.log2(sizes / CANONICAL_SIZE) + torch.tensor(TORCHVISION_EPS, dtype=sizes.dtype)
            )
        else:
            wanted = torch.floor(CANONICAL_LEVEL + torch.log2(sizes / CANONICAL_SIZE + DETECTRON2_EPS))
        wanted = torch.clamp(wanted, min=self.numbers[0], max=self.numbers[-1])
        stored = torch.tensor(self.numbers, dtype=wanted.dtype)
        return torch.argmin((wanted[:, None] - stored[None, :]).abs(), dim=1)

    @property
    def sampling_ratio(self) -> int:
        """The framework's own sampling points per bin (0: adaptive)."""
        return SAMPLING_RATIOS[self.framework]

    def pool(
        self, maps: Mapping[str, np.ndarray], boxes: torch.Tensor, assignment: torch.Tensor, info: Mapping[str, Any],
        output_size: tuple[int, int], sampling_ratio: int,
    ) -> torch.Tensor:
        """(K, C, *output_size) float32: each box sampled from its level's map, zero-padded as the input was."""
        from torchvision.ops import roi_align as sample_regions  # see assign()

        result = torch.zeros((len(boxes), self.channels, *output_size), dtype=torch.float32)
        padded_height, padded_width = self._padded(info["input_height"], info["input_width"])
        for index, (level, stride) in enumerate(zip(self.levels, self.strides)):
            chosen = torch.nonzero(assignment == index).flatten()
            if len(chosen) == 0:
                continue
            feature = torch.from_numpy(maps[level]).to(torch.float32)
            height, width = map_size(padded_height, padded_width, stride)
            feature = F.pad(feature, (0, max(0, width - feature.shape[2]), 0, max(0, height - feature.shape[1])))
            rois = torch.cat([torch.zeros((len(chosen), 1)), boxes[chosen]], dim=1)
            result[chosen] = sample_regions(
                feature[None], rois, output_size, spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio,
                aligned=self.framework == "detectron2",
            )
        return result

    def _padded(self, height: int, width: int) -> tuple[int, int]:
        step = self.size_divisibility
        if step <= 1:
            return height, width
        return -(-height // step) * step, -(-width // step) * step


def checked_boxes(boxes: Any) -> np.ndarray:
    """Boxes as a (K, 4) float64 array of x1, y1, x2, y2 with x1 <= x2 and y1 <= y2; UsageError otherwise."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise UsageError(f"boxes must be a (K, 4) array of x1, y1, x2, y2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UsageError("boxes must be finite numbers")
    if (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
        raise UsageError("boxes must have x1 <= x2 and y1 <= y2 (x1, y1, x2, y2 in original image pixels)")
    return array


def output_pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    pair = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(pair) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in pair):
        raise UsageError(f"output_size must be a positive int or a pair of them, got {output_size!r}")
    return pair  # type: ignore[return-value]


# samples per bin side: beyond this each bin costs seconds (ratio squared samples) and changes nothing visible
MAX_SAMPLING_RATIO = 64


def roi_align(
    read: Callable[[Sequence[str]], Mapping[str, np.ndarray]], info: Mapping[str, Any], rule: RegionRule, boxes: Any,
    output_size: int | Sequence[int], sampling_ratio: int | None,
) -> torch.Tensor:
    """Pool ``boxes`` (original pixels) of one image; ``read(levels)`` returns its stored maps of those levels.
    ``sampling_ratio`` None: the framework's own."""
    if sampling_ratio is None:
        sampling_ratio = rule.sampling_ratio
    elif isinstance(sampling_ratio, (bool, np.bool_)) or not isinstance(sampling_ratio, (int, np.integer)) \
            or not 0 <= sampling_ratio <= MAX_SAMPLING_RATIO:
        raise UsageError(f"sampling_ratio must be an int from 0 (adaptive) to {MAX_SAMPLING_RATIO}, "
                         f"got {sampling_ratio!r}")
    sampling_ratio = int(sampling_ratio)
    array = checked_boxes(boxes)
    size = output_pair(output_size)
    mapped = rule.to_input(array, info)
    assignment = rule.assign(mapped)
    needed = [rule.levels[index] for index in sorted(set(assignment.tolist()))]
    maps = read(needed) if needed else {}
    return rule.pool(maps, mapped, assignment, info, size, sampling_ratio)
