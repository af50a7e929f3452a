"""Merge fpnx files and ``.parts`` folders into one file, atomically (``.tmp`` + fsync + rename).

Uncompressed blocks are copied byte for byte by the kernel; compressed ones with HDF5's object copy (H5Ocopy),
which moves chunks as stored: compressed data is never decompressed, so merging costs about as much as copying
the files. :func:`merge_into` is the one merge:
``merge_stores``, shard merges and ``FeatureWriter.finalize`` all go through it.
"""

from __future__ import annotations

import collections
import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError, UsageError
from . import schema
from .chunkcopy import ByteRun, copy_dataset_bytes, copy_runs, plan_byte_copy
from .files import describe_os_error, publish, remove_file
from .lock import OutputLock
from .parts import tmp_path_for
from .location import StoreLocation, load_file, locate_store, open_checked
from .schema import Layout
from .settings import check_settings
from .storefile import Index, StoreFile, combine_failures
from .tables import NewFile, append_pooled, pooled_dataset, write_tables


def merge_stores(
    inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Merge finished fpnx files and/or ``.parts`` folders made with the same settings into ``out``.

    A source stored in two inputs is an error. Failures are merged: one per source, the latest reason, and a
    source stored in any input keeps only its stored row. The first input's metadata is kept.
    """
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UsageError("merge needs at least one input")
    check_output_path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; --overwrite replaces it")
    lock = OutputLock(out)
    lock.acquire()
    try:
        stores = [locate_store(path) for path in paths]
        first = stores[0]
        attrs = schema.root_attributes(first.layout, first.settings, first.metadata)
        merge_into(out, stores, first.settings, attrs, expected_in=f"in {first.path}", kept="the inputs are unchanged")
    finally:
        lock.release()
    return out


def check_output_path(out: Path, what: str = "the merged output") -> None:
    """Before any work (and any download): ``out`` must be a regular file path (or none yet) in an existing folder
    this process may write in. ``what`` names it in the messages (``--out`` for extract)."""
    if out.is_dir():
        raise UsageError(f"{out} is a folder; {what} must be a file path such as features.h5")
    if out.exists() and not out.is_file():  # a device or pipe: never "started anew" by removing it
        raise UsageError(f"{out} is not a regular file; {what} must be a file path such as features.h5")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"{out}: {out.parent} is a file, not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: the folder {out.parent} is not writable")


def merge_into(
    out: Path,
    stores: Sequence[StoreLocation],
    settings: Mapping[str, Any],
    attrs: Mapping[str, Any],
    *,
    expected_in: str,
    kept: str,
    started: MergedFile | None = None,
) -> None:
    """The one merge behind ``merge_stores``, shard merges and a writer's finalize.

    Every store must have ``settings`` (those of ``expected_in``, for the message), checked before anything is
    copied; then their files are written to ``out`` atomically (:func:`write_merged`). A failed write becomes
    one line saying what is ``kept``. ``started``: a merge already holding the first of these files, in order
    (any other is abandoned and everything merged anew).
    """
    for store in stores:
        check_settings(store.path, store.settings, settings, expected_in=expected_in)
    files = [file for store in stores for file in store.files]
    if started is not None and files[: len(started.added)] != started.added:
        started.abandon()
        started = None
    remaining = files[len(started.added):] if started is not None else files
    try:
        write_merged(remaining, out, Layout.from_settings(settings), settings, attrs, expected_in=expected_in,
                     started=started)
    except StoreError:  # an input's problem (MissingFileError is an OSError too), not the output's
        raise
    except OSError as error:
        raise write_error(out, error, kept) from None


def write_merged(
    files: Sequence[Path],
    out: Path,
    layout: schema.Layout,
    settings: Mapping[str, Any],
    attrs: Mapping[str, Any],
    *,
    expected_in: str,
    started: MergedFile | None = None,
) -> None:
    """Write the union of ``files`` (each checked to have ``settings``) to ``out`` atomically, rows in input order.

    Blocks are renumbered 1, 2, ... in input order. On any failure ``out`` is untouched and the ``.tmp`` removed.
    Inputs are opened one at a time (a .parts folder may hold thousands of segments). ``started``: a merge that
    already holds the files before these (a writer's, begun while its run went on); it is finished where it is
    and renamed to ``out``.
    """
    merged = started
    try:
        if merged is None:
            remove_file(tmp_path_for(out))
            merged = MergedFile(tmp_path_for(out), layout, attrs)
        for path in files:
            merged.add(path, settings, expected_in=expected_in)
        merged.finish()
        publish(merged.path, out)
    except BaseException as error:
        failure = merged.abandon() if merged is not None else None
        if merged is None:
            remove_file(tmp_path_for(out))
        if failure is not None and failure is not error:
            raise failure from None  # the cause (errno), not whatever HDF5 made of it
        raise


class MergedFile:
    """A merge being written at ``path``: :meth:`add` copies one file's blocks (renumbered after those before)
    and pooled vectors and keeps its rows; :meth:`finish` writes the tables and closes it. Used whole by
    :func:`write_merged`, or a file at a time as a run commits its segments.

    A run may also write a segment's block straight into it (:meth:`open_block`) and commit the segment with a
    reference to those bytes; from then on (:meth:`hold`) the file is never deleted by :meth:`abandon`, only
    closed: the next run keeps the bytes for the segments (:func:`fpnx.store.early_merge.keep_data_of`).
    """

    def __init__(self, path: Path, layout: schema.Layout, attrs: Mapping[str, Any], *, first_block: int = 1) -> None:
        self.path = path
        self.layout = layout
        self.added: list[Path] = []
        self.held = False
        self._first_block = first_block
        self._target: NewFile | None = NewFile(path, attrs)
        dst = self._target.h5
        self._blocks = dst[schema.BLOCKS]
        self._pooled = {level: pooled_dataset(dst.require_group(schema.IMAGES), level, layout.channels[level])
                        for level in (layout.levels if layout.pool else ())}
        self._stored_in: dict[str, Path] = {}
        self._indexes: list[Index] = []
        self._segments: list[np.ndarray] = []
        self._later: collections.deque[tuple[Path, int, int, str]] = collections.deque()  # levels to copy:
        # (file, its block, block here, level); and the byte runs left of the one being copied
        self._copying: list[ByteRun] = []

    def add(self, path: Path, settings: Mapping[str, Any], *, expected_in: str, in_place: int | None = None,
            copy_later: bool = False) -> None:
        """Add the file at ``path``: its block copied in, or, with ``in_place``, already written here as that
        block by :meth:`open_block` (a segment that holds one block). With ``copy_later`` its rows are added now
        and its blocks numbered, but their bytes are copied by :meth:`copy_later_blocks` (at the latest by
        :meth:`finish`): the file must stay as it is until then."""
        target = self._open_target()
        store, index = load_file(path, settings, expected_in=expected_in)
        try:
            _refuse_duplicates(store.path, index, self._stored_in)
            renumbering = {}
            for old in _block_numbers(store):
                if in_place is not None:
                    number = in_place
                else:
                    number = self._next_block()
                    group = self._blocks.create_group(schema.block_name(number))
                    if copy_later:
                        self._later.extend((path, old, number, level) for level in store.layout.levels)
                    else:
                        _copy_block(store, old, group, target.descriptor)
                renumbering[old] = number
            self._segments.append(_renumber(store, index, renumbering))
            self._indexes.append(index)
            for level, dataset in self._pooled.items():  # streamed: a merge can hold millions of rows
                append_pooled(dataset, store.read_pooled(level))
        finally:
            store.close()
        target.check()  # stop at the first failed write (disk full), not after copying everything
        self.added.append(path)

    def copy_later_blocks(self, budget_bytes: int | None = None) -> bool:
        """Copy the bytes of blocks added with ``copy_later`` until about ``budget_bytes`` are copied (None: all of
        them); True while some are left. A level is planned (its dataset allocated) when its turn comes, then
        copied over as many calls as it takes."""
        target = self._open_target()
        copied = 0
        while (self._copying or self._later) and (budget_bytes is None or copied < budget_bytes):
            if not self._copying:
                self._copying = self._plan_copy(*self._later.popleft())
            self._copying, done = copy_runs(self._copying, target.descriptor,
                                            None if budget_bytes is None else budget_bytes - copied)
            copied += done
            target.check()
        return bool(self._copying or self._later)

    def _plan_copy(self, path: Path, old: int, number: int, level: str) -> list[ByteRun]:
        """The byte runs that copy one level of a block added with ``copy_later``; [] where HDF5 copied it."""
        store = open_checked(path)  # its settings were checked when it was added
        try:
            dataset = store.block_dataset(old, level)
            group = self._blocks[schema.block_name(number)]
            runs = plan_byte_copy(dataset, store.path, group, level)
            if runs is None:
                store.h5.copy(dataset, group, name=level)
            return runs or []
        finally:
            store.close()

    def open_block(self) -> tuple[int, h5py.Group]:
        """A new, empty block for a writer to fill: its number and group."""
        number = self._next_block()
        return number, self._blocks.create_group(schema.block_name(number))

    def drop_block(self, number: int) -> None:
        """Forget a block from :meth:`open_block` whose segment was thrown away (its bytes stay unused)."""
        del self._blocks[schema.block_name(number)]

    def hold(self) -> None:
        """A committed segment now keeps its bytes here: never delete this file (see the class)."""
        self.held = True

    @property
    def failure(self) -> OSError | None:
        return self._target.failure if self._target is not None else None

    def check(self) -> None:
        """Raise the first failed write, if any."""
        self._open_target().check()

    def write_back(self) -> None:
        """Wait until the bytes written so far are on the disk (raising the first failed write): before a segment
        that refers to them is committed, and so that publishing the file later has little left to write."""
        target = self._open_target()
        target.check()
        os.fsync(target.descriptor)

    def finish(self) -> None:
        """Write the ``/images`` and ``/failures`` tables and close the file (to be published by the caller)."""
        self.copy_later_blocks()
        target = self._open_target()
        merged = _concatenate(self._indexes, self._segments, self.layout)
        write_tables(target.h5, self.layout, merged.sources, merged.columns, merged.failures)
        self._target = None
        target.close()

    def abandon(self) -> OSError | None:
        """Close and delete the file (only close it once :meth:`hold` was called); returns its first failed
        write, if any."""
        target, self._target = self._target, None
        if target is not None:
            target.abandon()
        if not self.held:
            remove_file(self.path)
        return target.failure if target is not None else None

    def _next_block(self) -> int:
        return len(self._blocks) + self._first_block

    def _open_target(self) -> NewFile:
        if self._target is None:
            raise StoreError(f"{self.path} is finished or abandoned")
        return self._target


def write_error(target: Path, error: BaseException, kept: str) -> StoreError:
    """The one-line error for a failed write: the reason, what is kept, what to do."""
    reason = describe_os_error(error)
    number = getattr(error, "errno", None)
    full = number in (errno.ENOSPC, errno.EDQUOT) or "space" in reason.lower() or "quota" in reason.lower()
    advice = "free space and run the same command again" if full else "fix that and run the same command again"
    return StoreError(f"cannot write {target}: {reason}; {kept}; {advice}")


def _refuse_duplicates(path: Path, index: Index, stored_in: dict[str, Path]) -> None:
    for source in index.sources:
        earlier = stored_in.get(source)
        if earlier is not None:
            if earlier == path:
                raise StoreError(f"{path} is a damaged fpnx feature file: {source!r} is stored twice")
            raise StoreError(f"{source!r} is stored in both {earlier} and {path}; only disjoint stores can be merged")
        stored_in[source] = path


def _block_numbers(store: StoreFile) -> list[int]:
    numbers = []
    for name in store.block_names():
        if not name.isdigit():
            raise StoreError(f"{store.path} is a damaged fpnx feature file: unexpected block name {name!r}")
        numbers.append(int(name))
    return sorted(numbers)


def _copy_block(store: StoreFile, block: int, target: h5py.Group, target_fd: int) -> None:
    """Copy one block's level datasets, each checked first to be plain data: uncompressed ones byte for byte in
    the kernel (:mod:`fpnx.store.chunkcopy`), others with H5Ocopy (chunks as stored)."""
    for level in store.layout.levels:
        dataset = store.block_dataset(block, level)
        if not copy_dataset_bytes(dataset, store.path, target, level, target_fd):
            store.h5.copy(dataset, target, name=level)


def _renumber(store: StoreFile, index: Index, renumbering: Mapping[int, int]) -> np.ndarray:
    old = index.columns[schema.BLOCK]
    if len(old) == 0 or not store.layout.maps:  # without maps, no image is in a block (the column holds 0)
        return old.astype(np.int32)
    missing = set(np.unique(old).tolist()) - set(renumbering)
    if missing:
        raise StoreError(f"{store.path} is a damaged fpnx feature file: rows point at missing block {min(missing)}")
    lookup = np.zeros(max(renumbering) + 1, dtype=np.int32)
    for before, after in renumbering.items():
        lookup[before] = after
    return lookup[old]


def _concatenate(indexes: Sequence[Index], segments: Sequence[np.ndarray], layout: schema.Layout) -> Index:
    empty = Index.empty(layout)
    sources = [source for index in indexes for source in index.sources]
    columns = {}
    for name, nothing in empty.columns.items():
        parts = list(segments) if name == schema.BLOCK else [index.columns[name] for index in indexes]
        columns[name] = np.concatenate(parts).astype(nothing.dtype) if parts else nothing
    failures = combine_failures([index.failures for index in indexes], set(sources))
    return Index(sources, columns, failures)
