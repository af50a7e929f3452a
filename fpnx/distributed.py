"""Many processes, one collection: split the inputs into shards, extract each shard alone, merge the shards.

Two ways in, the same files on disk (see docs/scaling.md):

- ``torchrun --nproc_per_node N -m fpnx extract INPUT --out OUT.h5``: :func:`extract_with_torchrun` (reached through
  ``fpnx.extract``) makes every rank extract shard ``RANK/WORLD_SIZE`` on its own device; rank 0 then merges.
- ``fpnx extract INPUT --out OUT.h5 --shard I/N`` in N independent jobs (Slurm arrays, plain shells, Ray tasks),
  then ``fpnx merge --out OUT.h5`` (:func:`merge_shards`).

An image belongs to shard ``sha1(os.fsencode(source))[:8] mod N`` (:func:`shard_of`): the split does not depend
on the order or number of the other inputs, so adding images never moves finished ones to another shard, and no
image is in two shards. Shard I of N of ``OUT.h5`` is the ordinary fpnx file ``OUT.shard-0000I-of-0000N.h5`` next
to it, with its own ``.parts`` folder and lock, so each shard is crash-safe and resumable exactly like a
single-process run. Its settings are those of a single-process run (the shard is recorded in its metadata only),
so the merged ``OUT.h5`` is indistinguishable from one written by a single process and a later run of either kind
can add to it. Images already in a finished ``OUT.h5`` count as done for every shard.

:func:`merge_shards` refuses to merge unless shards 0..N-1 are all present and finished, copies the blocks of an
existing ``OUT.h5`` and of the shards into a new ``OUT.h5`` atomically, and removes the shard files only after
that. The merged file lists the shard files it absorbed, so a merge interrupted before that removal never counts
a shard twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import FpnxError, StoreError, UsageError
from .store import schema
from .store.files import fsync_dir, remove_file
from .store.inputs import count_images, describe_input, open_checked
from .store.lock import OutputLock
from .store.merge import write_error, write_merged
from .store.parts import Manifest, parts_dir_for
from .store.settings import first_difference

if TYPE_CHECKING:
    from .images import ImageSource
    from .pipeline import ExtractSummary
    from .report import LevelReport

SPLIT = "sha1(os.fsencode(source))[:8] big-endian mod count"
"""How sources are assigned to shards; recorded in each shard's metadata."""

SHARD_KEY = "shard"  # metadata of a shard file: {"index": I, "count": N, "split": SPLIT}
MERGED_KEY = "shards"  # metadata of a merged file: {"count": N, "absorbed": [parts_id of each shard file]}

# Ranks wait for the slowest one at the end; a rerun may leave all remaining work to one rank.
BARRIER_TIMEOUT = datetime.timedelta(days=7)

_SHARD_NAME = re.compile(r"^(?P<stem>.*)\.shard-(?P<index>\d{5,})-of-(?P<count>\d{5,})(?P<suffix>(?:\.[^.]*)?)$")

T = TypeVar("T")


# -- shards ----------------------------------------------------------------------------------------------------


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

    def select(self, images: Sequence["ImageSource"]) -> list["ImageSource"]:
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


def parse_shard_option(text: str | None) -> Shard | None:
    """``--shard`` as given on the command line; refused under torchrun, which gives each process its shard."""
    shard = as_shard(text)
    if shard is not None and launched() is not None:
        raise UsageError("--shard cannot be combined with torchrun: torchrun gives each process its own shard")
    return shard


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


def _shard_from_name(path: Path) -> tuple[Shard, Path] | None:
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
        named = _shard_from_name(entry)
        if named is not None and named[1] == out:
            found.setdefault(named[0].count, set()).add(shard_path(out, named[0]))
    return {count: sorted(paths) for count, paths in sorted(found.items())}


# -- one shard of an extraction ----------------------------------------------------------------------------------


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
        difference = first_difference({k: v for k, v in store.settings.items() if k in settings},
                                       schema.normalize(dict(settings)))
        if difference:
            key, before, now = difference
            raise StoreError(
                f"{out} was made with other settings: {key!r} was {before!r}, now {now!r}; "
                f"--overwrite starts anew (or choose another --out)"
            )
        sources, _ = store.read_sources()
        absorbed = _absorbed(store.metadata)
    finally:
        store.close()
    if target.exists() and absorbed:
        lock = OutputLock(target)
        lock.acquire()
        try:
            if _parts_id(target) in absorbed:  # already merged into out: a merge was killed before removing it
                remove_file(target)
                fsync_dir(target.parent)
        finally:
            lock.release()
    return target, frozenset(sources)  # its failures are tried again, as a single-process run does


def _absorbed(metadata: Mapping[str, Any]) -> set[str]:
    merged = metadata.get(MERGED_KEY)
    if isinstance(merged, dict) and isinstance(merged.get("absorbed"), list):
        return {str(value) for value in merged["absorbed"]}
    return set()


def _parts_id(path: Path) -> str | None:
    store = open_checked(path)
    try:
        value = store.attrs.get(schema.ATTR_PARTS_ID)
    finally:
        store.close()
    return None if value is None else str(value)


# -- merging -----------------------------------------------------------------------------------------------------


@dataclass
class MergeSummary:
    """What :func:`merge_shards` did; ``to_dict()`` is what ``fpnx merge --json`` prints."""

    out: str
    count: int  # N, the number of shards
    merged: list[str]  # shard files copied into out
    already_merged: list[str]  # shard files out had absorbed before (a merge killed before its cleanup)
    images: int  # images in out now
    images_added: int
    seconds: float

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
    if out.is_dir():
        raise UsageError(f"{out} is a folder; --out must be the merged file's path, such as features.h5")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    found = _identify([Path(p) for p in shards]) if shards else _find_for(out)
    count = found[0].shard.count
    locks = [OutputLock(out)] + [OutputLock(item.path) for item in found]
    held: list[OutputLock] = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        for item in found:  # under the locks: no run can be adding to them now
            _check_finished(item)
        described = [describe_input(item.path) for item in found]
        first = described[0]
        for other in described[1:]:
            _check_same_settings(first.path, first.settings, other.path, other.settings)
        previous = describe_input(out) if out.exists() else None
        absorbed_before: set[str] = set()
        before = 0
        if previous is not None:
            _check_same_settings(previous.path, previous.settings, first.path, first.settings)
            absorbed_before = _absorbed(previous.metadata)
            before = _image_count(out)
        ids = [item.attrs.get(schema.ATTR_PARTS_ID) for item in described]
        fresh = [item for item, parts_id in zip(found, ids) if parts_id is None or str(parts_id) not in absorbed_before]
        done_before = [item for item in found if item not in fresh]
        if previous is not None:  # a rerun with nothing new must not rewrite a large file
            fresh = [item for item in fresh if not _is_empty(item.path)]
        if fresh or previous is None:
            metadata = {k: v for k, v in first.metadata.items() if k != SHARD_KEY}
            metadata[MERGED_KEY] = {"count": count, "absorbed": sorted(str(i) for i in ids if i is not None)}
            attrs = schema.root_attributes(first.layout, first.settings, metadata)
            files = ([out] if previous is not None else []) + [item.path for item in fresh]
            try:
                write_merged(files, out, first.layout, first.settings, attrs)
            except OSError as error:
                raise write_error(out, error, "the shard files and the old output are unchanged") from None
        for item in found:  # only now: out holds them
            remove_file(item.path)
        fsync_dir(out.parent)
    finally:
        for lock in reversed(held):
            lock.release()
    after = _image_count(out)
    return MergeSummary(
        out=str(out),
        count=count,
        merged=[str(item.path) for item in fresh],
        already_merged=[str(item.path) for item in done_before],
        images=after,
        images_added=after - before,
        seconds=time.perf_counter() - started,
    )


def _image_count(path: Path) -> int:
    store = open_checked(path)
    try:
        return len(store.h5[schema.IMAGES][schema.SOURCE])
    finally:
        store.close()


def _is_empty(path: Path) -> bool:
    store = open_checked(path)
    try:
        sources, failures = store.read_sources()
    finally:
        store.close()
    return not sources and not failures


def _check_same_settings(first: Path, mine: Mapping[str, Any], other: Path, theirs: Mapping[str, Any]) -> None:
    difference = first_difference(dict(mine), dict(theirs))
    if difference:
        key, a, b = difference
        raise StoreError(f"cannot merge {other} with {first}: setting {key!r} is {b!r} there but {a!r} in {first}")


def _identify(paths: list[Path]) -> list[_Found]:
    """The shard each given path is (its metadata, or its name if it is not finished), all of one split, complete."""
    found: list[_Found] = []
    for path in paths:
        if path.name.endswith(".parts") and path.is_dir():
            path = path.with_name(path.name.removesuffix(".parts"))
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
            named = _shard_from_name(found[0].path)  # the missing one is named like the others
            _refuse_absent(Shard(index, count), shard_path(named[1], Shard(index, count)) if named else None)
    return [by_index[index] for index in range(count)]


def _find_for(out: Path) -> list[_Found]:
    found = find_shards(out)
    if not found:
        raise StoreError(
            f"no shards of {out} found: expected files such as {shard_path(out, Shard(0, 2)).name} in {out.parent} "
            f"(written by fpnx extract --out {out} --shard I/N)"
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
    named = _shard_from_name(path)
    if named is None:
        if path.exists():
            raise StoreError(f"{path} is not a shard file")
        raise StoreError(f"{path} does not exist")
    _refuse_absent(named[0], path)
    raise AssertionError("unreachable")


def _refuse_absent(shard: Shard, path: Path | None) -> None:
    """The error for shard ``shard`` whose finished file ``path`` is not there: unfinished or missing."""
    if path is not None and parts_dir_for(path).is_dir():
        raise StoreError(f"shard {shard} is unfinished: {_unfinished(shard, path)}")
    where = f"{path} does not exist" if path is not None else "no file was given for it"
    raise StoreError(f"shard {shard} is missing: {where}; run `fpnx extract ... --shard {shard}` to write it")


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


# -- torchrun ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun (or any ``env://``-style) launch of more than one process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)


def launched(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun), if more than one process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UsageError(
            f"RANK/WORLD_SIZE/LOCAL_RANK are not numbers ({env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/"
            f"{env.get('LOCAL_RANK')!r}); launch with torchrun or unset them"
        ) from None
    if world < 2:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"RANK is {rank} but WORLD_SIZE is {world}; launch with torchrun or unset them")
    return Launch(rank, world, local_rank, max(1, local_world))


def rank_device(device: str, launch: Launch) -> str:
    """``cuda:LOCAL_RANK`` for ``auto``/``cuda`` where CUDA exists; anything else as given (``auto`` -> CPU/MPS)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise UsageError(
                f"rank {launch.rank} has LOCAL_RANK {launch.local_rank} but this machine has {count} CUDA "
                f"device(s); use --nproc_per_node {count} or fewer"
            )
        return f"cuda:{launch.local_rank}"
    return device


def extract_with_torchrun(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, **options: Any
) -> "ExtractSummary":
    """``fpnx.extract`` in one process of a torchrun launch: extract shard RANK/WORLD_SIZE, then rank 0 merges.

    Every rank uses its own device (``cuda:LOCAL_RANK``, or the CPU with ``cores / LOCAL_WORLD_SIZE`` threads).
    Ranks only exchange a few small messages (through a gloo process group, also on GPUs: no tensor crosses
    ranks). Rank 0 returns the summary of the whole run, other ranks that of their own shard. An error on any
    rank stops every rank with an error; the finished shards stay, and running the same command again does only
    what is missing.
    """
    import torch
    import torch.distributed as dist

    from .pipeline import extract, resolve_device
    from .weights import DEFAULT_WEIGHTS, resolve

    launch = launched()
    if launch is None:
        raise UsageError("not launched by torchrun (RANK and WORLD_SIZE > 1 are not set)")
    started = time.perf_counter()
    device = rank_device(options.pop("device", "auto"), launch)
    progress = options.pop("progress", False)
    progress = progress if launch.rank == 0 else False  # rank 0 shows its own shard's progress
    created = not dist.is_initialized()
    if created:
        try:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        except (ValueError, RuntimeError) as error:  # e.g. RANK/WORLD_SIZE set by hand, no MASTER_ADDR
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(
                f"RANK and WORLD_SIZE are set, but the processes cannot connect ({reason}); launch with torchrun, "
                f"or unset them for a single-process run"
            ) from None
    try:
        torch_device = _together(True, lambda: resolve_device(device))
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        else:  # torchrun sets OMP_NUM_THREADS=1; on the CPU the cores are the compute
            torch.set_num_threads(max(1, _cores() // launch.local_world_size))
        if options.get("model") is None:  # one download per machine, not one per rank
            _together(launch.local_rank == 0, lambda: resolve(options.get("weights", DEFAULT_WEIGHTS)))
        summary = _together(True, lambda: extract(inputs, out, shard=launch.shard, device=device,
                                                  progress=progress, **options))
        summaries = _all_gather(summary)
        merged = _together(launch.rank == 0, lambda: merge_shards(shard_paths(out, launch.world_size), out=out))
    finally:
        if created:
            dist.destroy_process_group()
    if launch.rank != 0:
        return summary
    return combine_summaries(summaries, str(out), merged, time.perf_counter() - started)


class RankFailed(FpnxError):
    """Another rank of a torchrun launch failed; this one stops with it."""


def _together(active: bool, work: Callable[[], T]) -> T | None:
    """Run ``work`` where ``active``; then every rank learns whether some rank failed, and all stop if one did."""
    from .pipeline import Interrupted

    result: T | None = None
    error: FpnxError | None = None
    if active:
        try:
            result = work()
        except Interrupted:  # SIGTERM from torchrun tearing the job down: no one is left to tell
            raise
        except FpnxError as caught:
            error = caught
    outcomes = _all_gather(None if error is None else (str(error), error.exit_code))
    if error is not None:
        raise error
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            failed = RankFailed(f"stopped because rank {rank} failed: {outcome[0]}")
            failed.exit_code = outcome[1]
            raise failed
    return result


def _all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``; a rank that died becomes one line, not a gloo traceback."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(values, value)
    except RuntimeError as error:  # DistBackendError and gloo's "Connection closed by peer"
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0] or type(error).__name__
        raise RankFailed(
            f"lost contact with another rank, which probably died ({reason[:200]}); finished work is kept: "
            f"run the same command again to complete what is missing"
        ) from None
    return values


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def combine_summaries(
    summaries: Sequence["ExtractSummary"], out: str, merged: MergeSummary | None, total_s: float
) -> "ExtractSummary":
    """One summary for a run split into shards: counts and bytes added up, the merge's time included.

    Level sizes: min and max are exact; the median is the median of the shards' medians weighted by their image
    counts. Stage timings are summed over ranks; ``total`` is the wall time of the whole run.
    """
    first = summaries[0]
    stored = [s for s in summaries if s.images_stored]
    levels = [_combine_level([s.levels[k] for s in stored] or [first.levels[k]], [s.images_stored for s in stored])
              for k in range(len(first.levels))]
    stages = ("decode", "preprocess", "model", "write")
    timings = {name: sum(s.timings.get(name, 0.0) for s in summaries) for name in stages}
    timings["merge"] = merged.seconds if merged is not None else 0.0
    timings["total"] = total_s
    devices = [s.device for s in summaries]
    device = f"{len(devices)} x {devices[0]}" if len(set(devices)) == 1 else ", ".join(devices)
    return dataclasses.replace(
        first,
        out=out,
        device=device,
        images_found=sum(s.images_found for s in summaries),
        images_already_done=sum(s.images_already_done for s in summaries),
        images_stored=sum(s.images_stored for s in summaries),
        failures=[failure for s in summaries for failure in s.failures],
        levels=levels,
        timings=timings,
        fp32_fallbacks=sum(s.fp32_fallbacks for s in summaries),
        float16_clamped=sum(s.float16_clamped for s in summaries),
    )


def _combine_level(reports: Sequence["LevelReport"], weights: Sequence[int]) -> "LevelReport":
    def area(hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        return hw[0] * hw[1], tuple(hw)

    first = reports[0]
    if len(reports) == 1:
        return first
    medians = [tuple(r.median_hw) for r, w in zip(reports, weights) for _ in range(w)]
    return dataclasses.replace(
        first,
        min_hw=min((tuple(r.min_hw) for r in reports), key=area),
        max_hw=max((tuple(r.max_hw) for r in reports), key=area),
        median_hw=sorted(medians, key=area)[len(medians) // 2] if medians else tuple(first.median_hw),
        bytes=sum(r.bytes for r in reports),
    )
