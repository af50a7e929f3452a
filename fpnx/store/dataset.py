"""Stored features as a ``torch.utils.data.Dataset``, and the collate function that batches ragged maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import UsageError
from .reader import FeatureReader, checked_levels, open_features

NOT_MAPS = ("source", "info")


class FeatureDataset(Dataset):
    """Images of an fpnx file (or ``.parts`` folder) as a map-style dataset.

    ``dataset[i]`` is ``{"source": str, "info": {height, width, input_height, input_width, scale}, "p2": Tensor
    (C, h, w), ...}`` for ``levels`` (default: all stored), converted to ``dtype`` (``None``: as stored).
    Small and picklable: its reader travels as its path and reopens in each DataLoader worker, under fork,
    spawn and forkserver alike. Batch with :func:`collate_features`.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, levels: Sequence[str] | None = None, dtype: torch.dtype | None = torch.float32
    ) -> None:
        self.reader: FeatureReader = open_features(path)
        if not self.reader.has_maps:
            raise UsageError(f"{self.reader.path} stores no feature maps (written with --no-maps): use "
                             f"torch.from_numpy(reader.pooled(level)) for its pooled vectors")
        levels = checked_levels(self.reader.layout, self.reader.path, levels)
        if not levels:
            raise UsageError(f"{self.reader.path}: choose at least one of its levels {', '.join(self.reader.levels)}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise UsageError(f"dtype must be a floating-point torch dtype or None, got {dtype!r}")
        self.levels = tuple(levels)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = self.reader.read(index, self.levels)
        info = self.reader.info(index)
        item: dict[str, Any] = {"source": info.pop("source"), "info": info}
        for level, array in arrays.items():
            tensor = torch.from_numpy(array)
            item[level] = tensor if self.dtype is None else tensor.to(self.dtype)
        return item

    def __repr__(self) -> str:
        return f"<FeatureDataset {self.reader.path}: {len(self)} images, levels {', '.join(self.levels)}>"


def collate_features(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`FeatureDataset` items whose maps differ in size.

    Returns ``{"source": [str], "info": {name: Tensor (B,)}, "p2": Tensor (B, C, H, W), ..., "masks": {level:
    bool Tensor (B, H, W)}, "sizes": {level: int64 Tensor (B, 2)}}``: each level zero-padded at the bottom and
    right to the largest map in the batch; ``masks`` is True on each image's own positions and ``sizes`` holds
    their height and width. ``info`` sizes are int64, ``scale`` float64.
    """
    if not items:
        raise UsageError("collate_features needs at least one item")
    levels = [key for key in items[0] if key not in NOT_MAPS]
    for item in items[1:]:
        if [key for key in item if key not in NOT_MAPS] != levels:
            raise UsageError("collate_features: items hold different levels; batch items of one FeatureDataset")
    info_names = list(items[0]["info"])
    batch: dict[str, Any] = {
        "source": [item["source"] for item in items],
        "info": {
            name: torch.tensor(
                [item["info"][name] for item in items],
                dtype=torch.float64 if isinstance(items[0]["info"][name], float) else torch.int64,
            )
            for name in info_names
        },
    }
    masks, sizes = {}, {}
    for level in levels:
        batch[level], masks[level], sizes[level] = _padded([item[level] for item in items], level)
    batch["masks"], batch["sizes"] = masks, sizes
    return batch


def _padded(maps: list[torch.Tensor], level: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    channels = maps[0].shape[0]
    if any(m.dim() != 3 or m.shape[0] != channels or m.dtype != maps[0].dtype for m in maps):
        raise UsageError(f"collate_features: the {level} maps differ in channels or dtype")
    height = max(m.shape[1] for m in maps)
    width = max(m.shape[2] for m in maps)
    out = maps[0].new_zeros((len(maps), channels, height, width))
    mask = torch.zeros((len(maps), height, width), dtype=torch.bool)
    for b, m in enumerate(maps):
        out[b, :, : m.shape[1], : m.shape[2]] = m
        mask[b, : m.shape[1], : m.shape[2]] = True
    sizes = torch.tensor([[m.shape[1], m.shape[2]] for m in maps], dtype=torch.int64)
    return out, mask, sizes
