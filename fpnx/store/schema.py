"""Names, version and layout rules of an fpnx feature file, shared by the writer, the reader and merge.

Every fpnx file (a finished ``OUT.h5`` or one committed segment of a run) has the same layout; see
``docs/format.md``. Changing anything here that an older reader would misread needs a new ``FORMAT_VERSION``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..models.shapes import map_size

FORMAT_NAME = "fpnx-features"
FORMAT_VERSION = 1
"""The version of files with feature maps (with or without pooled vectors, which older readers ignore)."""
POOLED_ONLY_VERSION = 2
"""The version of files written with ``--no-maps``: pooled vectors only, which readers of version 1 must refuse."""
POOLS = ("avg", "max")

# Groups of the file.
IMAGES = "images"
BLOCKS = "blocks"
FAILURES = "failures"

# Columns of /images (one row per stored image) and /failures.
SOURCE = "source"
HEIGHT = "height"
WIDTH = "width"
INPUT_HEIGHT = "input_height"
INPUT_WIDTH = "input_width"
SCALE = "scale"
BLOCK = "segment"  # the column's on-disk name (format version 1); it holds the number of the image's block
OFFSET_PREFIX = "offset_"
POOLED_PREFIX = "pooled_"  # /images/pooled_<level>: (N, C) float32, one row per stored image
REASON = "reason"

# Fixed-type columns of /images; `source` and the per-level offsets are added to these.
INDEX_COLUMNS: dict[str, np.dtype] = {
    HEIGHT: np.dtype("int32"),
    WIDTH: np.dtype("int32"),
    INPUT_HEIGHT: np.dtype("int32"),
    INPUT_WIDTH: np.dtype("int32"),
    SCALE: np.dtype("float64"),
    BLOCK: np.dtype("int32"),
}
OFFSET_DTYPE = np.dtype("int64")

# Sources are file system paths: any bytes but NUL, so they are stored as raw bytes (an HDF5 variable-length
# string tagged ASCII, which HDF5 and h5py pass through untouched) rather than as text that may not be UTF-8.
SOURCE_DTYPE = h5py.string_dtype("ascii")
REASON_DTYPE = h5py.string_dtype("utf-8")

# Root attributes.
ATTR_FORMAT = "format"
ATTR_VERSION = "format_version"
ATTR_METADATA = "metadata"
ATTR_SETTINGS = "settings"
ATTR_LEVELS = "levels"
ATTR_STRIDES = "strides"
ATTR_CHANNELS = "channels"
ATTR_DTYPE = "dtype"
ATTR_COMPRESSION = "compression"
ATTR_POOL = "pool"  # "avg" or "max" where pooled vectors are stored (absent: none)
ATTR_MAPS = "maps"  # 0 where no maps are stored (--no-maps; absent: 1)
ATTR_WEIGHTS = "weights"
# Set only by a writer's finalize: the run id of the .parts folder this file absorbed, so a rerun after a kill
# between "OUT.h5 replaced" and ".parts removed" knows those parts are already in OUT.h5.
ATTR_PARTS_ID = "parts_id"

DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "lzf", "gzip")
GZIP_LEVEL = 4
BLOCK_CHUNK_BYTES = 1 << 20
# Every block chunk starts at a multiple of 4 KiB in the file (HDF5's alignment; at most 0.4% padding): file
# systems that share extents (XFS, btrfs) then turn finalize's byte copy of whole chunks into a reflink.
CHUNK_ALIGNMENT = 4096
INDEX_CHUNK_ROWS = 4096
POOLED_CHUNK_ROWS = 32
# HDF5 1.8 object headers: readable by any HDF5 >= 1.8 and able to hold attributes over 64 KiB.
LIBVER = ("v108", "v108")

_LEVEL_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class ImageRecord:
    """One stored image's row of /images: where it came from and how it was resized."""

    source: str
    height: int
    width: int
    input_height: int
    input_width: int
    scale: float


def encode_source(source: str) -> bytes:
    """A source path as stored: the bytes the file system uses (undecodable bytes survive as surrogates)."""
    return source.encode("utf-8", "surrogateescape")


def decode_source(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode_reason(reason: str) -> str:
    # Reasons often quote a path; lone surrogates from undecodable bytes are not valid UTF-8.
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")


def block_name(block: int) -> str:
    return f"{block:06d}"


def offset_column(level: str) -> str:
    return OFFSET_PREFIX + level


def pooled_column(level: str) -> str:
    return POOLED_PREFIX + level


def to_json(value: Any) -> str:
    """JSON as stored in attributes and manifests (sorted keys: equal settings give equal text)."""
    return json.dumps(value, sort_keys=True, default=str)


def normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), for comparisons."""
    return json.loads(to_json(value))


@dataclass(frozen=True)
class Layout:
    """How feature arrays are shaped and stored: the settings a reader needs to cut arrays out of blocks."""

    levels: tuple[str, ...]
    channels: Mapping[str, int]
    strides: Mapping[str, int]
    dtype: str
    compression: str
    pool: str | None = None  # pooled vectors stored beside the maps: "avg", "max", or None
    maps: bool = True  # False: pooled vectors only (--no-maps)

    @classmethod
    def checked(
        cls,
        levels: Sequence[str],
        channels: Mapping[str, int],
        strides: Mapping[str, int],
        dtype: str,
        compression: str,
        pool: str | None = None,
        maps: bool = True,
    ) -> "Layout":
        """A layout from caller arguments; ValueError (with a message for people) when one is impossible."""
        if isinstance(levels, str) or not levels:
            raise ValueError(f"levels must be a non-empty list of level names, got {levels!r}")
        levels = tuple(levels)
        for level in levels:
            if not isinstance(level, str) or not _LEVEL_NAME.match(level):
                raise ValueError(f"level names are letters, digits and '_', got {level!r}")
        if len(set(levels)) != len(levels):
            raise ValueError(f"levels repeat a name: {list(levels)}")
        for what, table in (("channels", channels), ("strides", strides)):
            for level in levels:
                value = table.get(level)
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                    raise ValueError(f"{what}[{level!r}] must be a positive integer, got {value!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if not maps and pool is None:
            raise ValueError("a store without maps must store pooled vectors")
        return cls(
            levels=levels,
            channels={level: int(channels[level]) for level in levels},
            strides={level: int(strides[level]) for level in levels},
            dtype=dtype,
            compression=compression,
            pool=pool,
            maps=bool(maps),
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Layout":
        """The layout a store's full settings record (``to_settings`` keys); ValueError/KeyError if damaged."""
        return cls.checked(
            settings["levels"], settings["channels"], settings["strides"], settings["dtype"], settings["compression"],
            settings.get("pool"), settings.get("maps", True),
        )

    def index_columns(self) -> dict[str, np.dtype]:
        """The fixed-type columns of /images (``source`` and the pooled vectors aside): per-image sizes, and
        where each level's array lies when maps are stored."""
        columns = dict(INDEX_COLUMNS)
        if self.maps:
            columns.update({offset_column(level): OFFSET_DTYPE for level in self.levels})
        return columns

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.maps else POOLED_ONLY_VERSION

    def shape(self, level: str, input_height: int, input_width: int) -> tuple[int, int, int]:
        """(C, H, W) of one image's array at ``level``: the resized input, before padding, over the stride."""
        return (self.channels[level], *map_size(input_height, input_width, self.strides[level]))

    def to_settings(self) -> dict[str, Any]:
        """As recorded in ``settings``; ``pool`` and ``maps`` only where they differ from the defaults, so that
        files written before pooled vectors existed keep their settings (and can be resumed and merged)."""
        settings = {
            "levels": list(self.levels),
            "channels": dict(self.channels),
            "strides": dict(self.strides),
            "dtype": self.dtype,
            "compression": self.compression,
        }
        if self.pool is not None:
            settings["pool"] = self.pool
        if not self.maps:
            settings["maps"] = False
        return settings

    @property
    def chunk_elements(self) -> int:
        """Elements in a full chunk of a block dataset: about 1 MiB."""
        return BLOCK_CHUNK_BYTES // np.dtype(self.dtype).itemsize

    def dataset_options(self, chunk: int) -> dict[str, Any]:
        """create_dataset options of a block dataset with ``chunk`` elements per chunk."""
        options: dict[str, Any] = {"chunks": (chunk,), "maxshape": (None,), "dtype": self.dtype}
        if self.compression == "gzip":
            options.update(compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True)
        elif self.compression == "lzf":
            options.update(compression="lzf", shuffle=True)
        return options


def root_attributes(layout: Layout, settings: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The root attributes of a file: machine-readable JSON plus plain copies for HDFView users."""
    described = {**settings, **metadata}  # metadata as given, plus any setting it does not mention
    attrs = {
        ATTR_FORMAT: FORMAT_NAME,
        ATTR_VERSION: layout.format_version,
        ATTR_METADATA: to_json(described),
        ATTR_SETTINGS: to_json(settings),
        ATTR_LEVELS: np.array(layout.levels, dtype=h5py.string_dtype("utf-8")),
        ATTR_STRIDES: np.array([layout.strides[level] for level in layout.levels], dtype=np.int64),
        ATTR_CHANNELS: np.array([layout.channels[level] for level in layout.levels], dtype=np.int64),
        ATTR_DTYPE: layout.dtype,
        ATTR_COMPRESSION: layout.compression,
        ATTR_WEIGHTS: weights_label(described.get("weights")),
    }
    if layout.pool is not None:
        attrs[ATTR_POOL] = layout.pool
    if not layout.maps:
        attrs[ATTR_MAPS] = 0
    return attrs


def weights_label(weights: Any) -> str:
    """A one-line name of the weights for the plain ``weights`` attribute (the full record is in metadata)."""
    if weights is None:
        return ""
    if isinstance(weights, Mapping):
        name = weights.get("name")
        sha256 = weights.get("sha256")
        if name and sha256:
            return f"{name} (sha256 {sha256})"
        if name or sha256:
            return str(name or f"sha256 {sha256}")
        return to_json(weights)
    return str(weights)
