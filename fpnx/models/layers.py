"""Convolution + frozen batch norm, the building block of every fpnx network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    ``eps`` is part of the checkpoint's contract: torchvision's COCO_V1 detectors were trained with eps 0,
    torchvision's default and detectron2 use 1e-5.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_and_shift(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel ``scale`` and ``shift`` with ``norm(x) == x * scale + shift``."""
        weight, bias, mean, var = (t.to(dtype or t.dtype) for t in (self.weight, self.bias, self.running_mean, self.running_var))
        scale = weight * (var + self.eps).rsqrt()
        return scale, bias - mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ConvNorm(nn.Conv2d):
    """A conv followed by an optional frozen norm and ReLU.

    The norm is an attribute of the conv (``conv1.norm.weight``), detectron2's naming, so checkpoint keys map
    one to one. :meth:`fold_norm` merges the norm into the conv's weight and bias for inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        norm_eps: float | None = 1e-5,
        relu: bool = False,
    ):
        has_norm = norm_eps is not None
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=not has_norm
        )
        self.norm = FrozenBatchNorm2d(out_channels, norm_eps) if has_norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu_(x) if self.relu else x

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Fold the frozen norm into weight and bias, computed in float64 to keep fp32 parity."""
        if self.norm is None:
            return
        scale, shift = self.norm.scale_and_shift(torch.float64)
        weight = self.weight.double() * scale.reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else shift + self.bias.double() * scale
        self.weight = nn.Parameter(weight.to(self.weight.dtype), requires_grad=False)
        self.bias = nn.Parameter(bias.to(self.weight.dtype), requires_grad=False)
        self.norm = None


def fold_norms(module: nn.Module) -> nn.Module:
    """Fold every :class:`ConvNorm`'s frozen norm into its conv, in place; returns ``module``."""
    for child in module.modules():
        if isinstance(child, ConvNorm):
            child.fold_norm()
    return module
