"""Features -> disk: crash-safe HDF5 storage of FPN feature maps, one format (docs/format.md) with one writer,
one reader (also as a torch Dataset, and pooling regions), one merge, and shards."""

from .dataset import FeatureDataset, collate_features
from .merge import merge_stores
from .reader import FeatureReader, open_features
from .schema import FORMAT_VERSION, ImageRecord
from .shard_merge import MergeSummary, merge_shards
from .shards import Shard
from .writer import FeatureWriter

__all__ = [
    "FORMAT_VERSION",
    "FeatureDataset",
    "FeatureReader",
    "FeatureWriter",
    "ImageRecord",
    "MergeSummary",
    "Shard",
    "collate_features",
    "merge_shards",
    "merge_stores",
    "open_features",
]
