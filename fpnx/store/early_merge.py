"""Finalize's merge of a new output, begun while its run goes on: ``OUT.h5.merge.tmp`` beside the output.

With uncompressed maps, each segment's block is written straight into it and the committed segment refers to
those bytes (HDF5 external storage): every byte reaches the disk once, and finalize adds only the tables.
Otherwise each committed segment is copied in as it is committed, so that finalize has only the last one left.
A resumed run's earlier segments are added first, their bytes copied when the writer is idle or at finalize.
Merging early is only an optimisation: at its first failure it is given up and finalize merges the parts (a
failed write of a segment's block into it fails that segment, as any failed write does).

Once a committed segment refers to it, the file is never deleted by the run: a kill, a failure or a close
without finalize leaves it, and the next run keeps those bytes under another name in the parts folder
(:func:`keep_data_of`) before deleting it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py

from ..errors import StoreError
from . import schema
from .chunks import external_storage
from .files import fsync_dir, publish, remove_file
from .merge import MergedFile, write_merged
from .parts import committed_segments, data_file_name, early_merge_path, is_data_file_name, tmp_path_for
from .schema import Layout
from .tables import NewFile


class EarlyMerge:
    """The early merge of the run writing ``output`` (``enabled`` for a new output only: an old ``OUT.h5``
    comes first in the merge, and copying it belongs to finalize)."""

    def __init__(self, output: Path, parts: Path, layout: Layout, settings: Mapping[str, Any],
                 attrs: Mapping[str, Any], *, enabled: bool, expected_in: str) -> None:
        self.path = early_merge_path(output)
        self._parts = parts
        self._layout = layout
        self._settings = settings
        self._attrs = attrs
        self._expected_in = expected_in
        self._enabled = enabled
        self._writes_blocks = enabled and layout.maps and layout.compression == "none"
        self._file: MergedFile | None = None
        self._in_place: dict[Path, int] = {}  # committed segment -> its block in the file

    def file_for_segment(self) -> MergedFile | None:
        """Where the next segment writes its block: the merge (the committed segments so far added first), or
        None (in the segment itself) where blocks are not written in place or the merge was given up."""
        if not self._writes_blocks:
            return None
        try:
            return self._add_committed({})
        except Exception:  # noqa: BLE001 - only an optimisation: the segment holds its block instead
            self.give_up()
            return None

    def committed(self, segment: Path, data_block: int | None) -> None:
        """A segment was committed (its block at ``data_block`` of this file, or in itself): add every committed
        segment not merged yet and write them back."""
        if data_block is not None:
            self._in_place[segment] = data_block
        if not self._enabled:
            return
        try:
            self._add_committed(self._in_place).write_back()
        except BaseException as error:  # noqa: BLE001 - see the module; a half-copied segment is never kept
            self.give_up()
            if not isinstance(error, Exception):
                raise

    def copy_earlier_work(self, budget_bytes: int) -> bool:
        """Copy about ``budget_bytes`` more of the blocks of segments committed before this run (see
        :meth:`_add_committed`); True while some are left."""
        if self._file is None or not self._enabled:
            return False
        try:
            return self._file.copy_later_blocks(budget_bytes)
        except Exception:  # noqa: BLE001 - only an optimisation (see the module)
            self.give_up()
            return False

    def take(self) -> MergedFile | None:
        """Hand the file to finalize (which finishes or abandons it)."""
        file, self._file = self._file, None
        return file

    def stop(self) -> None:
        """No more merging: the run closes without finalize."""
        self._enabled = self._writes_blocks = False

    def give_up(self) -> None:
        self.stop()
        self.abandon()

    def abandon(self) -> None:
        """Close the file; delete it unless committed segments refer to it."""
        file, self._file = self._file, None
        if file is not None:
            file.abandon()  # kept once held
        elif not self._in_place:
            remove_file(self.path)

    def _add_committed(self, in_place: Mapping[Path, int]) -> MergedFile:
        """The file, with every committed segment added. Where blocks are written in place, the segments of an
        earlier run (resumed here) are added at once but their bytes copied later, while the writer has nothing
        else to do (:meth:`copy_earlier_work`) or at finalize: a resumed run starts writing at once."""
        if self._file is None:
            self._file = MergedFile(self.path, self._layout, self._attrs)
        merged = set(self._file.added)
        for _, path in committed_segments(self._parts):
            if path not in merged:
                self._file.add(path, self._settings, expected_in=self._expected_in, in_place=in_place.get(path),
                               copy_later=self._writes_blocks)
        return self._file


def keep_data_of(early: Path, parts: Path, segments: list[tuple[int, Path]], layout: Layout,
                 settings: Mapping[str, Any], attrs: Mapping[str, Any], *, expected_in: str) -> None:
    """Before a run deletes the early merge ``early`` of a run that did not finalize, keep the bytes committed
    segments refer to: a hard link ``data-NNNNNN.bin`` in the parts folder, the segments rewritten to name it
    (no data copied), or, where the file system has no hard links, the bytes copied back into the segments.
    At every step each segment names a file that holds its bytes, so a kill in between changes nothing.

    Segments of a folder that was moved (or renamed) name their data files where they were: they are rewritten
    to name them where they are now, beside or in this parts folder."""
    here = os.fsencode(os.path.realpath(early))
    named = {number: _data_files(segment) for number, segment in segments}
    moved = {number: {name: _where_now(name, here, parts) for name in names} for number, names in named.items()}
    referring = [(number, segment) for number, segment in segments if here in moved[number].values()]
    kept = data_file_name(parts, referring[0][0]) if referring and early.exists() else None
    if kept is not None:
        try:
            if not (kept.exists() and os.path.samefile(kept, early)):
                os.link(early, kept)
                fsync_dir(parts)
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            kept = None  # copied back into the segments below
    for number, segment in segments:
        renames = {name: now for name, now in moved[number].items() if name != now}
        if kept is not None:
            renames.update({name: os.fsencode(os.path.realpath(kept)) for name, now in moved[number].items()
                            if now == here})
        missing = sorted(name for name in {renames.get(name, name) for name in named[number]}
                         if not os.path.exists(name))
        if missing:
            raise StoreError(f"{segment} keeps its data in {os.fsdecode(missing[0])}, which is missing")
        if renames:
            _rename_data_files(segment, renames)
        if kept is None and here in moved[number].values() and early.exists():
            whole = MergedFile(tmp_path_for(segment), layout, attrs, first_block=number)
            write_merged([segment], segment, layout, settings, attrs, expected_in=expected_in, started=whole)


_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOSYS}


def _data_files(segment: Path) -> set[bytes]:
    """The files ``segment``'s blocks keep their bytes in (names only: nothing is read from them)."""
    with h5py.File(segment, "r") as h5:
        blocks = h5.get(schema.BLOCKS)
        if not isinstance(blocks, h5py.Group):
            return set()
        return {file for group in blocks.values() if isinstance(group, h5py.Group)
                for dataset in group.values() if isinstance(dataset, h5py.Dataset)
                for file, _, _ in external_storage(dataset)}


def _where_now(name: bytes, early: bytes, parts: Path) -> bytes:
    """Where a data file named ``name`` by a segment of ``parts`` is now: the early merge beside ``parts`` or a
    data file in it, found by its own name; ``name`` as it is for anything else (which no reader trusts)."""
    base = os.path.basename(name)
    if base == os.path.basename(early):
        return early
    if is_data_file_name(os.fsdecode(base)):
        return os.fsencode(os.path.realpath(parts / os.fsdecode(base)))
    return name


def _rename_data_files(segment: Path, renames: Mapping[bytes, bytes]) -> None:
    """Rewrite ``segment`` (atomically) with its external storage naming ``renames[name]`` for each ``name``."""
    tmp = tmp_path_for(segment)
    with h5py.File(segment, "r") as source:
        target = NewFile(tmp, dict(source.attrs))
        try:
            for name in source:
                if name != schema.BLOCKS:
                    source.copy(source[name], target.h5, name)
            for block, group in source[schema.BLOCKS].items():
                copy = target.h5[schema.BLOCKS].create_group(block)
                for level, dataset in group.items():
                    pieces = [(renames.get(file, file), at, size) for file, at, size in external_storage(dataset)]
                    if pieces:
                        copy.create_dataset(level, shape=dataset.shape, dtype=dataset.dtype, external=pieces)
                    else:
                        source.copy(dataset, copy, level)
            target.close()
        except BaseException:
            target.abandon()
            remove_file(tmp)
            raise
    publish(tmp, segment)
