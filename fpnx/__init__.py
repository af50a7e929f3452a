"""fpnx: folders of images into exact ResNet + FPN feature maps (P2-P6) stored in HDF5.

The data flows one way, and the subpackages follow it: :mod:`fpnx.sources` (paths -> images),
:mod:`fpnx.preprocess` and :mod:`fpnx.loader` (-> batches), :mod:`fpnx.models` (-> features), :mod:`fpnx.store`
(-> HDF5), :mod:`fpnx.report` (-> tables, statistics, plots); :mod:`fpnx.run` wires them into ``extract``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import FpnxError, ImageError, Interrupted, StoreError, UsageError, WeightsError
from .version import __version__

# The rest is imported on first use: ``import fpnx`` stays light until a name is needed (the command line can then
# catch a Ctrl-C during torch's import and print one line).
_LAZY = {
    "build_model": "models", "FeatureInfo": "models",
    "DEFAULT_WEIGHTS": "models.weights", "Weights": "models.weights", "get_weights": "models.weights",
    "list_weights": "models.weights",
    "ExtractOptions": "options", "Preprocessing": "preprocess", "ExtractSummary": "run", "extract": "run",
    "FeatureDataset": "store", "FeatureReader": "store", "collate_features": "store", "merge_shards": "store",
    "merge_stores": "store", "open_features": "store",
}  # fmt: skip

if TYPE_CHECKING:
    from .models import FeatureInfo, build_model
    from .models.weights import DEFAULT_WEIGHTS, Weights, get_weights, list_weights
    from .options import ExtractOptions
    from .preprocess import Preprocessing
    from .run import ExtractSummary, extract
    from .store import FeatureDataset, FeatureReader, collate_features, merge_shards, merge_stores, open_features


def __getattr__(name: str) -> Any:
    """A public name from its module, or a subpackage (``fpnx.preprocess``), imported on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
