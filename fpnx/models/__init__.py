"""The ResNet + FPN network, written from scratch, and ``build_model``."""

from .build import FeaturePyramid, build_model
from .fpn import FPN, LastLevelMaxPool
from .inference import Forward, autocast, cpu_has_native_bf16, forward, optimize_for_inference
from .layers import ConvNorm, FrozenBatchNorm2d, fold_norms
from .resnet import ResNet
from .shapes import FeatureInfo

__all__ = [
    "ConvNorm",
    "FPN",
    "FeatureInfo",
    "FeaturePyramid",
    "FrozenBatchNorm2d",
    "LastLevelMaxPool",
    "ResNet",
    "Forward",
    "autocast",
    "build_model",
    "cpu_has_native_bf16",
    "forward",
    "optimize_for_inference",
    "fold_norms",
]
