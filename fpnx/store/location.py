"""What a path given to fpnx names: a finished feature file, or the ``.parts`` folder of a run, and its files.

Shared by the reader, merge and the writer's resume, so all three accept and refuse the same things.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingFileError, StoreError
from . import schema
from .parts import Manifest, committed_segments, looks_like_parts, parts_dir_for
from .settings import check_settings
from .storefile import Index, StoreFile, open_store_file, plain


@dataclass(frozen=True)
class StoreLocation:
    """A finished file or a ``.parts`` folder: the fpnx files holding its images, and what they were made with."""

    path: Path
    files: list[Path]
    layout: schema.Layout
    settings: dict[str, Any]
    metadata: dict[str, Any]
    attrs: dict[str, Any]


def locate_store(path: Path) -> StoreLocation:
    """Check ``path`` (file or ``.parts`` folder) and list its files, without loading any index."""
    if path.is_dir():
        if not looks_like_parts(path):
            raise StoreError(f"{path} is a folder, neither an fpnx feature file nor an fpnx .parts folder")
        manifest = Manifest.read(path)
        attrs = _plain_attrs(schema.root_attributes(manifest.layout, manifest.settings, manifest.metadata))
        try:
            segments = [segment for _, segment in committed_segments(path)]
        except FileNotFoundError:
            raise StoreError(f"{path} vanished while being read: its run has finished; open the output") from None
        return StoreLocation(path, segments, manifest.layout, manifest.settings, manifest.metadata, attrs)
    if not path.exists():
        raise missing_output_error(path)
    store = open_store_file(path)
    try:
        return StoreLocation(path, [path], store.layout, store.settings, store.metadata, store.attrs)
    finally:
        store.close()


def missing_output_error(path: Path) -> StoreError:
    parts = parts_dir_for(path)
    if not parts.is_dir():
        return MissingFileError(f"{path} does not exist")
    count = count_images(parts)
    images = f"{count} images" if count is not None else "some images"
    return StoreError(
        f"{path} is not finished: an interrupted or running extract left {images} in {parts}; "
        f"run the same command again to resume, or open {parts} to read what is done"
    )


def count_images(parts: Path) -> int | None:
    """Images in the committed segments of ``parts`` (None if some segment cannot be read)."""
    total = 0
    try:
        for _, segment in committed_segments(parts):
            store = open_store_file(segment)
            try:
                total += store.image_count()
            finally:
                store.close()
    except (OSError, StoreError):
        return None
    return total


def open_checked(path: Path, settings: Mapping[str, Any] | None = None, *, expected_in: str = "") -> StoreFile:
    """Open one fpnx file; with ``settings`` (those of ``expected_in``), refuse a file made with others."""
    store = open_store_file(path)
    if settings is not None:
        try:
            check_settings(path, store.settings, settings, expected_in=expected_in)
        except StoreError:
            store.close()
            raise
    return store


def load_file(path: Path, settings: Mapping[str, Any] | None = None, *, expected_in: str = "") -> tuple[StoreFile, Index]:
    """Open one fpnx file (see :func:`open_checked`) and read its index."""
    store = open_checked(path, settings, expected_in=expected_in)
    try:
        return store, store.read_index()
    except BaseException:
        store.close()
        raise


def _plain_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Root attributes as a reader of a file would see them: plain values, settings and metadata parsed."""
    result = {name: plain(value) for name, value in attrs.items()}
    result[schema.ATTR_SETTINGS] = json.loads(result[schema.ATTR_SETTINGS])
    result[schema.ATTR_METADATA] = json.loads(result[schema.ATTR_METADATA])
    return result
