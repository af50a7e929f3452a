"""Crash-safe HDF5 storage of FPN feature maps: one writer, one reader, one format (see docs/format.md)."""

from .merge import merge_stores
from .reader import FeatureReader, open_features
from .schema import FORMAT_VERSION, ImageRecord
from .writer import FeatureWriter

__all__ = ["FeatureWriter", "FeatureReader", "open_features", "merge_stores", "ImageRecord", "FORMAT_VERSION"]
