"""Read an fpnx feature file, or the ``.parts`` folder of an unfinished or running run, as one sequence of images.

The index (/images, /failures) of every file is loaded once; reading an image then copies its arrays out of
already-open files (uncompressed blocks straight from a memory map of the file, see :mod:`.chunks`). Files are
opened read-only and only through hard links.

A reader travels: it pickles as its path, the files it indexed and their identity, and reopens them lazily in
the process that unpickles it (a DataLoader worker under spawn or forkserver); a reader used in a forked child
notices the new process and opens its own handles (:mod:`.handles`). A file replaced since is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import StoreError, UsageError
from . import schema
from .handles import Identity, OpenFiles, file_identity, identity_of
from .location import StoreLocation, load_file, locate_store
from .parts import output_for_parts
from .regions import RegionRule, roi_align
from .storefile import Index, combine_failures, problems_as_store_errors


def open_features(path: str | os.PathLike[str]) -> "FeatureReader":
    """Open a finished fpnx file, or a ``.parts`` folder (the committed part of an unfinished or running run)."""
    return FeatureReader(locate_store(Path(path)))


@dataclass
class _Rows:
    """The images of all files, in stored order: what the reader looks things up in."""

    sources: list[str]
    file_of_row: np.ndarray
    columns: dict[str, np.ndarray]
    failures: list[tuple[str, str]]
    row_of: dict[str, int] | None = None

    @classmethod
    def of(cls, indexes: list[Index], layout: schema.Layout, path: Path) -> "_Rows":
        sources = [source for index in indexes for source in index.sources]
        if len(set(sources)) != len(sources):
            raise StoreError(f"{path} is damaged: a source is stored twice")
        empty = Index.empty(layout)
        return cls(
            sources=sources,
            file_of_row=np.concatenate(
                [np.full(len(index), k, dtype=np.int32) for k, index in enumerate(indexes)] or [np.zeros(0, np.int32)]
            ),
            columns={
                name: np.concatenate([index.columns[name] for index in indexes] or [empty.columns[name]])
                for name in empty.columns
            },
            failures=combine_failures([index.failures for index in indexes], set(sources)),
        )

    def position_of(self, source: str) -> int | None:
        if self.row_of is None:
            self.row_of = {source: i for i, source in enumerate(self.sources)}
        return self.row_of.get(source)


class FeatureReader:
    """Images of an fpnx store by position or by source: ``reader[i]`` / ``reader[source]`` -> {level: array}.

    Usable with or without ``with``. After ``close()`` (or the end of ``with``) its index stays in memory and
    files are reopened on demand, refusing a file that was replaced meanwhile. A ``.parts`` folder is read as it
    was at open: segments committed later are not seen. Picklable (see the module's docstring).
    """

    def __init__(self, target: StoreLocation) -> None:
        self.path = target.path
        self.layout = target.layout
        self.attrs: dict[str, Any] = target.attrs
        # absolute: a training script that changes its working directory (Hydra, output folders) keeps reading
        self._paths = [file.absolute() for file in target.files]
        # a .parts folder's output: once its finalize has replaced it, the folder's files are gone
        self._output = output_for_parts(self.path.absolute()) if self.path.is_dir() else None
        self._output_identity = _identity_or_none(self._output)
        self._identity: list[Identity] = []
        self._handles: OpenFiles | None = None
        self._index: _Rows | None = None
        handles = self._open_files()
        indexes: list[Index] = []
        try:
            for k, file_path in enumerate(self._paths):
                store, index = load_file(file_path, target.settings)
                self._identity.append(file_identity(store))
                handles.adopt(k, store)
                indexes.append(index)
            self._index = _Rows.of(indexes, self.layout, self.path)
        except FileNotFoundError:
            self.close()
            raise self._finished_error() from None
        except BaseException:
            self.close()
            raise

    # -- travelling -----------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """The path, the files indexed with their identity, and the root attributes: no handle, no index."""
        return {"path": self.path, "layout": self.layout, "attrs": self.attrs, "files": self._paths,
                "identity": self._identity, "output": (self._output, self._output_identity)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.layout, self.attrs = state["path"], state["layout"], state["attrs"]
        self._paths, self._identity = list(state["files"]), list(state["identity"])
        self._output, self._output_identity = state["output"]
        self._handles = None
        self._index = None  # read again, from the same files, when first needed

    # -- the sequence ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows().sources)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def __contains__(self, source: object) -> bool:
        return isinstance(source, str) and self._rows().position_of(source) is not None

    def __getitem__(self, key: int | str) -> dict[str, np.ndarray]:
        """{level: array (C, H, W) in the stored dtype} of one image, by position or by source."""
        return self.read(key)

    def read(self, key: int | str, levels: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{level: array (C, H, W) in the stored dtype} of one image, for ``levels`` (default: all stored)."""
        if not self.layout.maps:
            raise UsageError(f"{self.path} stores no feature maps (it was written with --no-maps): read its pooled "
                             f"vectors with .pooled(level)")
        rows = self._rows()
        i = self._position(key)
        chosen = checked_levels(self.layout, self.path, levels)
        k = int(rows.file_of_row[i])
        block = int(rows.columns[schema.BLOCK][i])
        height = int(rows.columns[schema.INPUT_HEIGHT][i])
        width = int(rows.columns[schema.INPUT_WIDTH][i])
        handles = self._open_files()
        arrays = {}
        with self._run_not_finished(), problems_as_store_errors(self._paths[k]):
            for level in chosen:
                shape = self.layout.shape(level, height, width)
                start = int(rows.columns[schema.offset_column(level)][i])
                flat = handles.read(k, block, level, start, shape[0] * shape[1] * shape[2], rows.sources[i])
                arrays[level] = flat.reshape(shape)
        return arrays

    def roi_align(
        self, key: int | str, boxes: Any, *, output_size: int | tuple[int, int] = 7,
        sampling_ratio: int | None = None, framework: str | None = None,
    ) -> torch.Tensor:
        """Features of regions of one image: ``(K, C, output_size, output_size)`` float32.

        ``boxes`` is ``(K, 4)``: x1, y1, x2, y2 in the original image's pixels (after its EXIF orientation:
        ``info(key)["height"]``, ``["width"]``). Each box is mapped to the network input, assigned a level among
        the stored P2-P5 and sampled with ``torchvision.ops.roi_align`` exactly as the weights' framework does
        (torchvision: ``MultiScaleRoIAlign``, 2 samples per bin; detectron2: ``ROIPooler`` with ``ROIAlignV2``,
        adaptive sampling, 0); ``framework`` overrides the recorded one, ``sampling_ratio`` its sampling. Near the
        bottom and right edges see :mod:`fpnx.store.regions`.
        """
        rule = RegionRule.of(self.layout, self.metadata, self.path, framework)
        return roi_align(lambda levels: self.read(key, levels), self.info(key), rule, boxes, output_size, sampling_ratio)

    def pooled(self, level: str) -> np.ndarray:
        """``(N, C)`` float32: each stored image's pooled vector at ``level`` (``extract --pool``), in stored order,
        read in one piece per file. Row ``i`` belongs to ``sources[i]``."""
        if self.layout.pool is None:
            raise UsageError(f"{self.path} stores no pooled vectors; extract with --pool avg or --pool max")
        checked_levels(self.layout, self.path, [level])
        handles = self._open_files()
        with self._run_not_finished():
            parts = [handles.file(k).read_pooled(level) for k in range(len(self._paths))]
        return np.concatenate(parts) if parts else np.zeros((0, self.layout.channels[level]), np.float32)

    @property
    def pool(self) -> str | None:
        """How the pooled vectors were made (``"avg"`` or ``"max"``), or None where the store keeps none."""
        return self.layout.pool

    @property
    def has_maps(self) -> bool:
        """False for a store written with ``--no-maps``: pooled vectors only."""
        return self.layout.maps

    @property
    def sources(self) -> list[str]:
        """Sources in stored order. The reader's own list (cheap to index in a loop): do not modify it."""
        return self._rows().sources

    def index_of(self, source: str) -> int:
        position = self._rows().position_of(source)
        if position is None:
            raise KeyError(f"{source!r} is not stored in {self.path}")
        return position

    def info(self, key: int | str) -> dict[str, Any]:
        """source, height, width (original, after EXIF), input_height, input_width (resized), scale."""
        i = self._position(key)
        rows = self._rows()
        columns = rows.columns
        return {
            "source": rows.sources[i],
            "height": int(columns[schema.HEIGHT][i]),
            "width": int(columns[schema.WIDTH][i]),
            "input_height": int(columns[schema.INPUT_HEIGHT][i]),
            "input_width": int(columns[schema.INPUT_WIDTH][i]),
            "scale": float(columns[schema.SCALE][i]),
        }

    @property
    def failures(self) -> list[tuple[str, str]]:
        return list(self._rows().failures)

    @property
    def levels(self) -> list[str]:
        return list(self.layout.levels)

    @property
    def strides(self) -> dict[str, int]:
        return dict(self.layout.strides)

    @property
    def channels(self) -> dict[str, int]:
        return dict(self.layout.channels)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def metadata(self) -> dict[str, Any]:
        return self.attrs[schema.ATTR_METADATA]

    # -- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._handles is not None:
            self._handles.close()

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FeatureReader {self.path}: {len(self)} images, levels {', '.join(self.layout.levels)}>"

    # -- internals ------------------------------------------------------------------------------------------

    def _open_files(self) -> OpenFiles:
        """This process's handles: a forked child closes its copies of the parent's and opens its own."""
        handles = self._handles
        if handles is None or handles.pid != os.getpid():
            if handles is not None:
                handles.close()
            handles = self._handles = OpenFiles(self._paths, self._identity)
        return handles

    def _rows(self) -> _Rows:
        if self._index is None:  # unpickled: index the same files again, refusing replaced ones
            handles = self._open_files()
            indexes = []
            with self._run_not_finished():
                for k in range(len(self._paths)):
                    indexes.append(handles.file(k).read_index())
            self._index = _Rows.of(indexes, self.layout, self.path)
        return self._index

    @contextmanager
    def _run_not_finished(self) -> Iterator[None]:
        """A .parts folder's files fail to read once its run has finished (finalize moves the data into the
        output and removes the folder): say that, rather than that a file is damaged or was replaced."""
        try:
            yield
        except StoreError:
            if self._output is None or _identity_or_none(self._output) == self._output_identity:
                raise
            raise self._finished_error() from None

    def _finished_error(self) -> StoreError:
        where = f" {self._output}" if self._output is not None else ""
        return StoreError(f"{self.path} changed while being read: its run has finished; open the output{where}")

    def _position(self, key: int | str) -> int:
        if isinstance(key, str):
            return self.index_of(key)
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"images are indexed by position or source, not {type(key).__name__}")
        i = int(key)
        count = len(self._rows().sources)
        if not -count <= i < count:
            raise IndexError(f"image {i} is out of range: {self.path} holds {count} images")
        return i % count


def _identity_or_none(path: Path | None) -> Identity | None:
    try:
        return None if path is None else identity_of(os.stat(path))
    except OSError:
        return None


def checked_levels(layout: schema.Layout, path: Path, levels: Sequence[str] | None) -> Sequence[str]:
    """``levels`` if the store holds them all (None: all it holds); UsageError naming the first it lacks."""
    if levels is None:
        return layout.levels
    if isinstance(levels, str):
        raise UsageError(f"levels must be a list of level names, got the string {levels!r}")
    unknown = [level for level in levels if level not in layout.channels]
    if unknown:
        raise UsageError(f"{path} stores no level {unknown[0]!r} (it stores {', '.join(layout.levels)})")
    return levels
