"""Shards: one collection split into N files by a hash of each image's source, written apart, merged later.

An image belongs to shard ``sha1(os.fsencode(source))[:8] mod N`` (:func:`shard_of`): the split does not depend
on the order or number of the other inputs, so adding images never moves finished ones to another shard, and no
image is in two shards. Shard I of N of ``OUT.h5`` is the ordinary fpnx file ``OUT.shard-0000I-of-0000N.h5`` next
to it, with its own ``.parts`` folder and lock, so each shard is crash-safe and resumable exactly like a
single-process run. Its settings are those of a single-process run (the shard is recorded in its metadata only),
so the merged ``OUT.h5`` (:mod:`fpnx.store.shard_merge`) is indistinguishable from one written by a single
process and a later run of either kind can add to it. Images already in a finished ``OUT.h5`` count as done for
every shard. See docs/scaling.md.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import StoreError, UsageError
from .files import fsync_dir, remove_file
from .location import open_checked
from .lock import OutputLock
from .parts import parts_dir_for
from .schema import normalize
from .settings import check_settings

SPLIT = "sha1(os.fsencode(source))[:8] big-endian mod count"
"""How sources are assigned to shards; recorded in each shard's metadata."""

SHARD_KEY = "shard"  # metadata of a shard file: {"index": I, "count": N, "split": SPLIT}
MERGED_KEY = "shards"  # metadata of a merged file: {"count": N, "absorbed": [parts_id of each shard file]}

_SHARD_NAME = re.compile(r"^(?P<stem>.*)\.shard-(?P<index>\d{5,})-of-(?P<count>\d{5,})(?P<suffix>(?:\.[^.]*)?)$")


class HasSource(Protocol):
    source: str


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.index, self.count))
        if not (valid and 0 <= self.index < self.count):
            raise UsageError(f"a shard is I/N with 0 <= I < N, e.g. 0/4; got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` as typed after ``--shard``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match:
            raise UsageError(f"--shard must be I/N with 0 <= I < N, e.g. --shard 0/4; got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if not 0 <= index < count:
            raise UsageError(f"--shard must be I/N with 0 <= I < N, e.g. --shard 0/4; got {text!r}")
        return cls(index, count)

    def owns(self, source: str) -> bool:
        return shard_of(source, self.count) == self.index

    def select(self, images: Sequence[HasSource]) -> list[Any]:
        return [image for image in images if self.owns(image.source)]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "split": SPLIT}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def as_shard(value: "Shard | str | tuple[int, int] | None") -> Shard | None:
    """A :class:`Shard` from ``"I/N"``, ``(I, N)`` or a Shard; None stays None."""
    if value is None or isinstance(value, Shard):
        return value
    if isinstance(value, str):
        return Shard.parse(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Shard(*value)
    raise UsageError(f"a shard is 'I/N' or (I, N), got {value!r}")


def shard_of(source: str, count: int) -> int:
    """The shard (0..count-1) a source belongs to: stable across runs, machines and Python versions."""
    digest = hashlib.sha1(os.fsencode(source)).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_path(out: str | os.PathLike[str], shard: Shard) -> Path:
    """Where shard I of N of ``OUT.h5`` is written: ``OUT.shard-0000I-of-0000N.h5`` in the same folder."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{shard.index:05d}-of-{shard.count:05d}{out.suffix}")


def shard_paths(out: str | os.PathLike[str], count: int) -> list[Path]:
    return [shard_path(out, Shard(index, count)) for index in range(count)]


def shard_from_name(path: Path) -> tuple[Shard, Path] | None:
    """(shard, the output it belongs to) from a shard file's name, or None if the name is not one."""
    name = path.name.removesuffix(".parts")
    match = _SHARD_NAME.match(name)
    if not match:
        return None
    try:
        shard = Shard(int(match.group("index")), int(match.group("count")))
    except UsageError:
        return None
    return shard, path.with_name(match.group("stem") + match.group("suffix"))


def find_shards(out: str | os.PathLike[str]) -> dict[int, list[Path]]:
    """Shard files and ``.parts`` folders of ``out`` in its folder, as {count: [paths]} (each shard once)."""
    out = Path(out)
    found: dict[int, set[Path]] = {}
    if not out.parent.is_dir():
        return {}
    for entry in out.parent.iterdir():
        named = shard_from_name(entry)
        if named is not None and named[1] == out:
            found.setdefault(named[0].count, set()).add(shard_path(out, named[0]))
    return {count: sorted(paths) for count, paths in sorted(found.items())}


def prepare_shard(
    out: Path, shard: Shard, settings: Mapping[str, Any], *, overwrite: bool = False
) -> tuple[Path, frozenset[str]]:
    """Before shard ``shard`` of ``out`` is extracted: its file, and the sources a finished ``out`` already stores.

    Refuses an unfinished single-process run of ``out`` (its ``.parts``), shards of ``out`` split another number
    of ways, and a finished ``out`` made with other ``settings``. Removes this shard's file if ``out`` already
    absorbed it (a merge killed before its cleanup). ``overwrite`` removes ``out`` too: the run starts anew.
    """
    target = shard_path(out, shard)
    parts = parts_dir_for(out)
    if parts.exists():
        raise StoreError(
            f"{parts} holds an unfinished run without shards; finish it first (run its command again without "
            f"--shard) or remove {parts}"
        )
    for count, paths in find_shards(out).items():
        if count != shard.count:
            raise StoreError(
                f"{paths[0]} is from a run split {count} ways, this one is split {shard.count} ways; "
                f"finish and merge that run first, or remove its shard files"
            )
    if overwrite:
        remove_file(out)
        fsync_dir(out.parent)
        return target, frozenset()
    if not out.exists():
        return target, frozenset()
    store = open_checked(out)
    try:
        check_settings(out, {k: v for k, v in store.settings.items() if k in settings}, normalize(dict(settings)),
                       expected_in="in this run", advice="; --overwrite starts anew (or choose another --out)")
        sources, _ = store.read_sources()
        absorbed = absorbed_parts(store.metadata)
    finally:
        store.close()
    if target.exists() and absorbed:
        lock = OutputLock(target)
        lock.acquire()
        try:
            if parts_id_of(target) in absorbed:  # already merged into out: a merge was killed before removing it
                remove_file(target)
                fsync_dir(target.parent)
        finally:
            lock.release()
    return target, frozenset(sources)  # its failures are tried again, as a single-process run does


def absorbed_parts(metadata: Mapping[str, Any]) -> set[str]:
    merged = metadata.get(MERGED_KEY)
    if isinstance(merged, dict) and isinstance(merged.get("absorbed"), list):
        return {str(value) for value in merged["absorbed"]}
    return set()


def parts_id_of(path: Path) -> str | None:
    """The ``parts_id`` of a finished file: which run (or shard) it absorbed last."""
    store = open_checked(path)
    try:
        return store.parts_id
    finally:
        store.close()
