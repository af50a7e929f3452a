"""fpnx: folders of images into exact ResNet + FPN feature maps (P2-P6) stored in HDF5.

The data flows one way, and the subpackages follow it: :mod:`fpnx.sources` (paths -> images),
:mod:`fpnx.preprocess` and :mod:`fpnx.loader` (-> batches), :mod:`fpnx.models` (-> features), :mod:`fpnx.store`
(-> HDF5), :mod:`fpnx.report` (-> tables, statistics, plots); :mod:`fpnx.run` wires them into ``extract``.
"""

from .errors import FpnxError, ImageError, Interrupted, StoreError, UsageError, WeightsError
from .models import FeatureInfo, build_model
from .models.weights import DEFAULT_WEIGHTS, Weights, get_weights, list_weights
from .options import ExtractOptions
from .preprocess import Preprocessing
from .run import ExtractSummary, extract
from .store import FeatureDataset, FeatureReader, collate_features, merge_shards, merge_stores, open_features
from .version import __version__

__all__ = [
    "DEFAULT_WEIGHTS",
    "ExtractOptions",
    "ExtractSummary",
    "FeatureDataset",
    "FeatureInfo",
    "FeatureReader",
    "FpnxError",
    "ImageError",
    "Interrupted",
    "Preprocessing",
    "StoreError",
    "UsageError",
    "Weights",
    "WeightsError",
    "__version__",
    "build_model",
    "collate_features",
    "extract",
    "get_weights",
    "list_weights",
    "merge_shards",
    "merge_stores",
    "open_features",
]
