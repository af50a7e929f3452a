"""The ``OUT.h5.parts/`` folder of a run in progress: its manifest and its committed segment files."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError
from . import schema
from .files import remove_tree, write_atomically
from .schema import Layout

PARTS_SUFFIX = ".parts"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fpnx-parts"
TMP_SUFFIX = ".tmp"
_SEGMENT = re.compile(r"^seg-(\d{6,})\.h5$")
_DATA_FILE = re.compile(r"^data-(\d{6,})\.bin$")


def parts_dir_for(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


def output_for_parts(parts: Path) -> Path | None:
    """``OUT.h5`` for ``OUT.h5.parts`` (the inverse of :func:`parts_dir_for`); None for another name."""
    if not parts.name.endswith(PARTS_SUFFIX) or parts.name == PARTS_SUFFIX:
        return None
    return parts.with_name(parts.name[: -len(PARTS_SUFFIX)])


def tmp_path_for(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def early_merge_path(output: Path) -> Path:
    """Where a run merges its committed segments while it goes on (``OUT.h5.merge.tmp``; see FeatureWriter)."""
    return output.with_name(output.name + ".merge" + TMP_SUFFIX)


def in_parts_folder(segment: Path) -> bool:
    """A committed segment's name, in a ``.parts`` folder."""
    return bool(_SEGMENT.match(segment.name)) and segment.parent.name.endswith(PARTS_SUFFIX)


def data_file_name(parts: Path, number: int) -> Path:
    """Where a run keeps the early merge of the run before it, under a name that no run deletes but finalize
    (see FeatureWriter): named after the first segment that refers to it."""
    return parts / f"data-{number:06d}.bin"


def is_data_file_name(name: str) -> bool:
    return _DATA_FILE.match(name) is not None


def refers_to_own_data_file(segment: Path, names: set[bytes]) -> bool:
    """True where ``names`` (the files a dataset of ``segment`` keeps its bytes in) are its run's early merge or
    data files of its own parts folder: the one case of HDF5 external storage fpnx reads."""
    if not (names and in_parts_folder(segment)):
        return False
    parts = segment.parent
    early = os.fsencode(os.path.realpath(early_merge_path(output_for_parts(parts))))
    folder = os.fsencode(os.path.realpath(parts))
    return all(name == early or (os.path.dirname(name) == folder
                                 and is_data_file_name(os.fsdecode(os.path.basename(name))))
               for name in names)


def segment_path(parts: Path, number: int) -> Path:
    return parts / f"seg-{number:06d}.h5"


def committed_segments(parts: Path) -> list[tuple[int, Path]]:
    """(number, path) of every committed segment, in commit order. ``*.tmp`` files are not committed."""
    found = []
    for entry in parts.iterdir():
        match = _SEGMENT.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def leftover_tmp_files(parts: Path) -> list[Path]:
    return sorted(entry for entry in parts.iterdir() if entry.name.endswith(TMP_SUFFIX))


def remove_all_but_manifest(parts: Path) -> None:
    """The first step of deleting a parts folder; ``remove_tree(parts)`` then removes the manifest and the folder.

    Segments without their manifest cannot be trusted, so a run that finds them stops. Deleting the manifest
    last means a deletion cut short (kill -9, Ctrl-C) leaves a folder the next run still recognises and finishes.
    """
    for entry in parts.iterdir():
        if entry.name != MANIFEST:
            remove_tree(entry)


def looks_like_parts(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).is_file() or path.name.endswith(PARTS_SUFFIX))


@dataclass(frozen=True)
class Manifest:
    """What a run was started with: checked again by every resume."""

    run_id: str
    settings: dict[str, Any]  # full settings, layout included
    metadata: dict[str, Any]

    @property
    def layout(self) -> Layout:
        return Layout.from_settings(self.settings)

    def write(self, parts: Path) -> None:
        record = {
            "format": MANIFEST_FORMAT,
            "format_version": self.layout.format_version,
            "run_id": self.run_id,
            "settings": self.settings,
            "metadata": self.metadata,
        }
        write_atomically(parts / MANIFEST, (schema.to_json(record) + "\n").encode("utf-8"))

    @classmethod
    def read(cls, parts: Path) -> "Manifest":
        path = parts / MANIFEST
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{parts} is not an fpnx .parts folder: it has no {MANIFEST}") from None
        except (OSError, ValueError) as error:
            raise StoreError(f"{path} is damaged ({error}); --overwrite starts anew") from None
        if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
            raise StoreError(f"{path} is not an fpnx run manifest")
        version = record.get("format_version")
        if not isinstance(version, int):
            raise StoreError(f"{path} is damaged (format_version is {version!r}); --overwrite starts anew")
        if version > schema.POOLED_ONLY_VERSION:
            raise StoreError(
                f"{path} was written by a newer fpnx (format_version {version}; this fpnx reads up to "
                f"{schema.POOLED_ONLY_VERSION}); upgrade fpnx"
            )
        try:
            manifest = cls(str(record["run_id"]), dict(record["settings"]), dict(record["metadata"]))
            manifest.layout  # noqa: B018 - checks the layout keys
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{path} is damaged (bad or missing {error})") from None
        return manifest
