"""fpnx: folders of images into exact ResNet + FPN feature maps (P2-P6) stored in HDF5."""

__version__ = "0.1.0"

from .errors import FpnxError, ImageError, StoreError, UsageError, WeightsError
from .models import FeatureInfo, build_model
from .distributed import merge_shards
from .pipeline import ExtractSummary, extract
from .preprocess import Preprocessing
from .store import open_features
from .weights import DEFAULT_WEIGHTS, Weights, get_weights, list_weights

__all__ = [
    "DEFAULT_WEIGHTS",
    "FeatureInfo",
    "FpnxError",
    "ImageError",
    "Preprocessing",
    "StoreError",
    "UsageError",
    "Weights",
    "WeightsError",
    "ExtractSummary",
    "build_model",
    "extract",
    "get_weights",
    "list_weights",
    "merge_shards",
    "open_features",
]
