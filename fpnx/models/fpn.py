"""Feature Pyramid Network on top of a bottom-up backbone: P2..P5 from C2..C5, P6 from P5."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNorm
from .resnet import ResNet
from .shapes import FeatureInfo


class LastLevelMaxPool(nn.Module):
    """P6 = max_pool2d(P5, kernel 1, stride 2): a subsampling of P5, as torchvision and detectron2 do."""

    def __init__(self, in_feature: str = "p5", name: str = "p6"):
        super().__init__()
        self.in_feature = in_feature
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=1, stride=2, padding=0)


class TopDownMerge(nn.Module):
    """A lateral plus the coarser merged level, upsampled (nearest) to the lateral's real size."""

    def forward(self, lateral: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        return lateral + F.interpolate(coarser, size=lateral.shape[-2:], mode="nearest")


class FPN(nn.Module):
    """ResNet + FPN: ``forward`` returns ``{"p2": ..., "p6": ...}`` for a normalised batch (B, 3, H, W).

    Each input feature ``resK`` gets a 1x1 lateral conv and a 3x3 output conv producing ``pK``; the coarser
    level is upsampled (nearest) to the lateral's actual size, so any input size works.
    """

    def __init__(
        self,
        bottom_up: ResNet,
        in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 256,
        top_block: LastLevelMaxPool | None = None,
    ):
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self.top_block = top_block if top_block is not None else LastLevelMaxPool()
        self.top_down = TopDownMerge()
        input_shapes = bottom_up.output_shape()
        self.lateral_convs = nn.ModuleDict()
        self.output_convs = nn.ModuleDict()
        self._feature_info: dict[str, FeatureInfo] = {}
        for name in self.in_features:
            info = input_shapes[name]
            level_name = f"p{info.level}"
            self.lateral_convs[level_name] = ConvNorm(info.channels, out_channels, 1, norm_eps=None)
            self.output_convs[level_name] = ConvNorm(out_channels, out_channels, 3, norm_eps=None)
            self._feature_info[level_name] = FeatureInfo(level_name, out_channels, info.stride)
        top_input = self._feature_info[self.top_block.in_feature]
        self._feature_info[self.top_block.name] = FeatureInfo(self.top_block.name, out_channels, top_input.stride * 2)
        self.reset_fpn_parameters()

    def reset_fpn_parameters(self) -> None:
        """The FPN's standard initialisation (kaiming-uniform with a=1, zero bias), as both frameworks use."""
        for conv in [*self.lateral_convs.values(), *self.output_convs.values()]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def stages(self) -> dict[str, list[nn.Module]]:
        """The modules of each stage in forward order: what ``fpnx bench`` times and costs, by their hooks."""
        return {
            "stem": [self.bottom_up.stem],
            **{name: [getattr(self.bottom_up, name)] for name in self.bottom_up.output_shape()},
            "fpn_lateral": list(self.lateral_convs.values()),
            "fpn_top_down": [self.top_down],
            "fpn_output": list(self.output_convs.values()),
            self.top_block.name: [self.top_block],
        }

    def output_shape(self) -> dict[str, FeatureInfo]:
        """Channels and stride of each output, without running the model."""
        return dict(self._feature_info)

    @property
    def size_divisibility(self) -> int:
        return max(info.stride for info in self.bottom_up.output_shape().values())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bottom_up = self.bottom_up(x)
        level_names = list(self.lateral_convs.keys())  # fine to coarse
        outputs: dict[str, torch.Tensor] = {}
        merged = None
        for level_name, in_name in zip(reversed(level_names), reversed(self.in_features)):
            lateral = self.lateral_convs[level_name](bottom_up[in_name])
            merged = lateral if merged is None else self.top_down(lateral, merged)
            outputs[level_name] = self.output_convs[level_name](merged)
        outputs[self.top_block.name] = self.top_block(outputs[self.top_block.in_feature])
        return {name: outputs[name] for name in self._feature_info}
