"""ResNet bottom-up pathway: stem and stages res2..res5 at strides 4, 8, 16, 32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNorm
from .shapes import FeatureInfo


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, *, norm_eps: float, stride_in_1x1: bool = False):
        super().__init__()
        out_channels = width * self.expansion
        self.shortcut = _projection(in_channels, out_channels, stride, norm_eps)
        self.conv1 = ConvNorm(in_channels, width, 3, stride=stride, norm_eps=norm_eps, relu=True)
        self.conv2 = ConvNorm(width, out_channels, 3, norm_eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv2(self.conv1(x)) + identity)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152).

    torchvision puts the stride in the 3x3 conv ("ResNet v1.5"); detectron2's MSRA weights put it in the first
    1x1 conv (``stride_in_1x1``).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, *, norm_eps: float, stride_in_1x1: bool = False):
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = _projection(in_channels, out_channels, stride, norm_eps)
        self.conv1 = ConvNorm(in_channels, width, 1, stride=stride_1x1, norm_eps=norm_eps, relu=True)
        self.conv2 = ConvNorm(width, width, 3, stride=stride_3x3, norm_eps=norm_eps, relu=True)
        self.conv3 = ConvNorm(width, out_channels, 1, norm_eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv3(self.conv2(self.conv1(x))) + identity)


def _projection(in_channels: int, out_channels: int, stride: int, norm_eps: float) -> ConvNorm | None:
    """A 1x1 conv + norm where the shape changes, identity (None) otherwise."""
    if in_channels == out_channels and stride == 1:
        return None
    return ConvNorm(in_channels, out_channels, 1, stride=stride, norm_eps=norm_eps)


class Stem(nn.Module):
    """7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool: stride 4."""

    stride = 4

    def __init__(self, out_channels: int = 64, *, norm_eps: float):
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, norm_eps=norm_eps, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


# depth -> (block type, blocks per stage res2..res5)
RESNET_SPECS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
    101: (BottleneckBlock, (3, 4, 23, 3)),
    152: (BottleneckBlock, (3, 8, 36, 3)),
}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class ResNet(nn.Module):
    """Stem and four stages; ``forward`` returns ``{"res2": C2, ..., "res5": C5}``."""

    def __init__(self, depth: int = 50, *, norm_eps: float = 1e-5, stride_in_1x1: bool = False):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
        block_type, blocks_per_stage = RESNET_SPECS[depth]
        self.depth = depth
        self.stem = Stem(norm_eps=norm_eps)
        in_channels, stride, width = self.stem.out_channels, self.stem.stride, 64
        self._feature_info: dict[str, FeatureInfo] = {}
        for index, (name, num_blocks) in enumerate(zip(STAGE_NAMES, blocks_per_stage)):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                block = block_type(
                    in_channels,
                    width,
                    first_stride if block_index == 0 else 1,
                    norm_eps=norm_eps,
                    stride_in_1x1=stride_in_1x1,
                )
                blocks.append(block)
                in_channels = width * block_type.expansion
            self.add_module(name, nn.Sequential(*blocks))
            stride *= first_stride
            self._feature_info[name] = FeatureInfo(name, in_channels, stride)
            width *= 2

    def output_shape(self) -> dict[str, FeatureInfo]:
        return dict(self._feature_info)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        outputs = {}
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs
