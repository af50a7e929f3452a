"""Merging the shards of one extraction into its output: only complete sets, never part of a shard.

:func:`merge_shards` refuses to merge unless shards 0..N-1 are all present and finished, copies the blocks of an
existing ``OUT.h5`` and of the shards into a new ``OUT.h5`` atomically (the one merge, :func:`merge_into`), and
removes the shard files only after that. The merged file lists the shard files it absorbed, so a merge
interrupted before that removal never counts a shard twice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingFileError, StoreError, UsageError
from . import schema
from .files import fsync_dir, remove_file
from .location import count_images, locate_store, open_checked
from .lock import hold_locks
from .merge import check_output_path, merge_into
from .parts import Manifest, output_for_parts, parts_dir_for
from .shards import (
    MERGED_KEY, SHARD_KEY, Shard, absorbed_parts, find_shards, shard_from_name, shard_path,
)  # fmt: skip


@dataclass
class MergeSummary:
    """What :func:`merge_shards` did; ``to_dict()`` is what ``fpnx merge --json`` prints."""

    out: str
    count: int  # N, the number of shards
    merged: list[str]  # shard files copied into out
    already_merged: list[str]  # shard files out had absorbed before (a merge killed before its cleanup)
    nothing_new: list[str]  # shard files that held no image or failure (out exists, so it is not rewritten for them)
    images: int  # images in out now
    images_added: int
    seconds: float
    nothing_to_do: bool = False  # a rerun after a finished merge: its shards (in already_merged) are long gone

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Found:
    shard: Shard
    path: Path


def merge_shards(shards: Sequence[str | os.PathLike[str]] = (), *, out: str | os.PathLike[str]) -> MergeSummary:
    """Merge the finished shards 0..N-1 (and a finished ``out``, if any) into ``out``; then remove the shard files.

    ``shards`` are shard files (``OUT.shard-0000I-of-0000N.h5``); none means every shard of ``out`` in its folder.
    A shard that is missing, or unfinished (only its ``.parts`` exists, or a run is adding to it), stops the merge
    with a message naming it and saying how to finish it: a merged file never includes part of a shard. The merge
    is atomic (``OUT.h5.tmp``, fsync, rename); the shard files are removed only once the new ``out`` is in place.
    """
    started = time.perf_counter()
    out = Path(out)
    check_output_path(out)
    given = [Path(p) for p in shards]
    available = {} if given else find_shards(out)
    finished = _finished_merge(out) if _all_gone(given, out) and not available and out.exists() else None
    if finished is not None and all(shard_from_name(path)[0].count == finished[0] for path in given):
        # a rerun after a merge that finished (it removed the shards, named or not): nothing to do
        count, images = finished
        absorbed = [str(shard_path(out, Shard(index, count))) for index in range(count)]
        return MergeSummary(out=str(out), count=count, merged=[], already_merged=absorbed, nothing_new=[],
                            images=images, images_added=0, seconds=time.perf_counter() - started, nothing_to_do=True)
    found = _identify(given) if given else _find_for(out, available)
    with hold_locks([out] + [item.path for item in found]):
        _check_all_finished(found)  # under the locks: no run can be adding to them now
        stores = [locate_store(item.path) for item in found]
        previous = locate_store(out) if out.exists() else None
        absorbed_before = absorbed_parts(previous.metadata) if previous is not None else set()
        before = _image_count(out) if previous is not None else 0
        ids = [store.attrs.get(schema.ATTR_PARTS_ID) for store in stores]
        unabsorbed = [i for i, parts_id in enumerate(ids) if parts_id is None or str(parts_id) not in absorbed_before]
        empty = {i for i in unabsorbed if previous is not None and _is_empty(found[i].path)}
        fresh = [i for i in unabsorbed if i not in empty]  # a rerun with nothing new must not rewrite a large file
        if fresh or previous is None:
            first = stores[0]
            metadata = {k: v for k, v in first.metadata.items() if k != SHARD_KEY}
            if isinstance(metadata.get("command"), str):  # the command that adds to the merged file: no --shard
                metadata["command"] = re.sub(r"\s--shard(?:=|\s+)\S+", "", metadata["command"])
            metadata[MERGED_KEY] = {"count": len(found), "absorbed": sorted(str(i) for i in ids if i is not None)}
            attrs = schema.root_attributes(first.layout, first.settings, metadata)
            merging = ([previous] if previous is not None else []) + [stores[i] for i in fresh]
            merge_into(out, merging, first.settings, attrs, expected_in=f"in {first.path}",
                       kept="the shard files and the old output are unchanged")
        for item in found:  # only now: out holds them
            remove_file(item.path)
        fsync_dir(out.parent)
    after = _image_count(out)
    return MergeSummary(
        out=str(out),
        count=len(found),
        merged=[str(found[i].path) for i in fresh],
        already_merged=[str(item.path) for i, item in enumerate(found) if i not in unabsorbed],
        nothing_new=[str(found[i].path) for i in sorted(empty)],
        images=after,
        images_added=after - before,
        seconds=time.perf_counter() - started,
    )


def _all_gone(paths: Sequence[Path], out: Path) -> bool:
    """Whether every path is named as a shard file of ``out`` (``OUT.shard-0000I-of-0000N.h5``) and is gone,
    with its ``.parts`` (true of none)."""
    for path in paths:
        named = shard_from_name(path)
        if named is None or named[1].absolute() != out.absolute() or path.exists() or parts_dir_for(path).exists():
            return False
    return True


def _finished_merge(path: Path) -> tuple[int, int] | None:
    """(shards it was merged from, images) of the finished file ``path``; None if it was not made by a merge."""
    store = open_checked(path)
    try:
        recorded = store.metadata.get(MERGED_KEY)
        if not isinstance(recorded, dict) or "count" not in recorded:
            return None
        return int(recorded["count"]), store.image_count()
    finally:
        store.close()


def _image_count(path: Path) -> int:
    store = open_checked(path)
    try:
        return store.image_count()
    finally:
        store.close()


def _is_empty(path: Path) -> bool:
    store = open_checked(path)
    try:
        sources, failures = store.read_sources()
    finally:
        store.close()
    return not sources and not failures


def _identify(paths: list[Path]) -> list[_Found]:
    """The shard each given path is (its metadata, or its name if it is not finished), all of one split, complete."""
    found: list[_Found] = []
    for path in paths:
        if path.is_dir() and output_for_parts(path) is not None:
            path = output_for_parts(path)
        found.append(_Found(_shard_of_path(path), path))
    counts = sorted({item.shard.count for item in found})
    if len(counts) > 1:
        a = next(item for item in found if item.shard.count == counts[0])
        b = next(item for item in found if item.shard.count == counts[1])
        raise StoreError(f"the shards disagree on the split: {a.path} is shard {a.shard}, {b.path} is shard {b.shard}")
    by_index: dict[int, _Found] = {}
    for item in found:
        other = by_index.setdefault(item.shard.index, item)
        if other is not item and other.path.resolve() != item.path.resolve():
            raise StoreError(f"{other.path} and {item.path} are both shard {item.shard}")
    count = counts[0]
    for index in range(count):
        if index not in by_index:
            named = shard_from_name(found[0].path)  # the missing one is named like the others
            _refuse_absent(Shard(index, count), shard_path(named[1], Shard(index, count)) if named else None)
    return [by_index[index] for index in range(count)]


def _find_for(out: Path, found: dict[int, list[Path]]) -> list[_Found]:
    """Shards 0..N-1 of ``out`` from what :func:`find_shards` found next to it."""
    if not found:
        finished = f" ({out} is a finished file: nothing to merge into it)" if out.is_file() else ""
        raise StoreError(
            f"no shards of {out} found: expected files such as {shard_path(out, Shard(0, 2)).name} in {out.parent} "
            f"(written by fpnx extract --out {out} --shard I/N){finished}"
        )
    if len(found) > 1:
        counts = " and ".join(str(count) for count in found)
        raise StoreError(f"{out.parent} holds shards of {out.name} split {counts} ways; name the shards to merge")
    count = next(iter(found))
    return [_Found(Shard(index, count), shard_path(out, Shard(index, count))) for index in range(count)]


def _shard_of_path(path: Path) -> Shard:
    if path.is_file():
        store = open_checked(path)
        try:
            recorded = store.metadata.get(SHARD_KEY)
        finally:
            store.close()
        if not isinstance(recorded, dict):
            raise StoreError(f"{path} is not a shard (its metadata names no shard); merge shards of one extraction")
        try:
            return Shard(int(recorded["index"]), int(recorded["count"]))
        except (KeyError, TypeError, ValueError, UsageError):
            raise StoreError(f"{path} is a damaged shard: its metadata says shard {recorded!r}") from None
    named = shard_from_name(path)
    if named is None:
        if path.exists():
            raise StoreError(f"{path} is not a shard file")
        raise MissingFileError(f"{path} does not exist")
    _refuse_absent(named[0], path, missing=MissingFileError)  # named on the command line: a usage error
    raise AssertionError("unreachable")


def _refuse_absent(shard: Shard, path: Path | None, missing: type[StoreError] = StoreError) -> None:
    """The error for shard ``shard`` whose finished file ``path`` is not there: unfinished, or ``missing``."""
    if path is not None and parts_dir_for(path).is_dir():
        raise StoreError(f"shard {shard} is unfinished: {_unfinished(shard, path)}")
    where = f"{path} does not exist" if path is not None else "no file was given for it"
    raise missing(f"shard {shard} is missing: {where}; run `fpnx extract ... --shard {shard}` to write it")


def _check_all_finished(found: Sequence[_Found]) -> None:
    """The first shard that is missing or unfinished, and how many others are (a job array may have lost many)."""
    problems: list[tuple[Shard, StoreError]] = []
    for item in found:
        try:
            _check_finished(item)
        except StoreError as error:
            problems.append((item.shard, error))
    if not problems:
        return
    first = problems[0][1]
    if len(problems) == 1:
        raise first
    named = ", ".join(str(shard) for shard, _ in problems[:8]) + (", ..." if len(problems) > 8 else "")
    raise StoreError(f"{first} ({len(problems)} of {len(found)} shards are not ready: {named})")


def _check_finished(item: _Found) -> None:
    if not item.path.exists():
        _refuse_absent(item.shard, item.path)
    if parts_dir_for(item.path).is_dir():  # a later run was adding to this shard and stopped
        raise StoreError(f"shard {item.shard} is unfinished: {_unfinished(item.shard, item.path)}")


def _unfinished(shard: Shard, path: Path) -> str:
    parts = parts_dir_for(path)
    images = count_images(parts)
    held = f"{images} images" if images is not None else "the images done so far"
    command = None
    try:
        command = Manifest.read(parts).metadata.get("command")
    except StoreError:
        pass
    if isinstance(command, str) and "--shard" in command:
        how = f"rerun `{command}` to finish it"
    else:
        how = f"rerun `fpnx extract ... --shard {shard}` (or the same torchrun command) to finish it"
    return f"{parts} holds {held}, {path.name} is not finished; {how}"
