"""Preprocessed pixels -> features: the ResNet + FPN written from scratch, its weights and how it runs."""

from .build import FeaturePyramid, build_model
from .device import resolve_device
from .fpn import FPN, LastLevelMaxPool
from .inference import (
    PRECISIONS, ForwardResult, autocast, cpu_has_native_bf16, forward, optimize_for_inference, pooled_vectors,
    valid_regions,
)  # fmt: skip
from .layers import ConvNorm, FrozenBatchNorm2d, fold_norms
from .resnet import ResNet
from .shapes import FeatureInfo, map_size

__all__ = [
    "PRECISIONS",
    "ConvNorm",
    "FPN",
    "FeatureInfo",
    "FeaturePyramid",
    "ForwardResult",
    "FrozenBatchNorm2d",
    "LastLevelMaxPool",
    "ResNet",
    "autocast",
    "build_model",
    "cpu_has_native_bf16",
    "fold_norms",
    "forward",
    "map_size",
    "optimize_for_inference",
    "pooled_vectors",
    "resolve_device",
    "valid_regions",
]
