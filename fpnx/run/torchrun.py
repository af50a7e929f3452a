"""torchrun glue: in each process of a launch, extract shard RANK/WORLD_SIZE on its own device; rank 0 merges.

``torchrun --nproc_per_node N -m fpnx extract INPUT --out OUT.h5`` (or a script calling ``fpnx.extract`` under
torchrun) reaches :func:`extract_with_torchrun`. The shards and their merge are the store's
(:mod:`fpnx.store.shards`); see docs/scaling.md.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import FpnxError, Interrupted, RankFailed, UsageError, first_line
from ..models import resolve_device
from ..models.weights import resolve
from ..options import ExtractOptions
from ..store import Shard, merge_shards
from ..store.shards import shard_paths
from .pipeline import extract_one
from .summary import ExtractSummary, combine_summaries

# Ranks wait for the slowest one at the end; a rerun may leave all remaining work to one rank.
BARRIER_TIMEOUT = datetime.timedelta(days=7)

T = TypeVar("T")


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
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, options: ExtractOptions, launch: Launch
) -> ExtractSummary:
    """``fpnx.extract`` in one process of a torchrun launch: extract shard RANK/WORLD_SIZE, then rank 0 merges.

    Every rank uses its own device (``cuda:LOCAL_RANK``, or the CPU with ``cores / LOCAL_WORLD_SIZE`` threads).
    Ranks only exchange a few small messages (through a gloo process group, also on GPUs: no tensor crosses
    ranks). Rank 0 returns the summary of the whole run, other ranks that of their own shard. An error on any
    rank stops every rank with an error; the finished shards stay, and running the same command again does only
    what is missing.
    """
    started = time.perf_counter()
    options = options.replace(
        device=rank_device(options.device, launch),
        progress=options.progress if launch.rank == 0 else False,  # rank 0 shows its own shard's progress
        shard=launch.shard,
    )
    created = not dist.is_initialized()
    if created:
        _join_process_group()
    try:
        torch_device = _together(True, lambda: resolve_device(options.device))
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        else:  # torchrun sets OMP_NUM_THREADS=1; on the CPU the cores are the compute
            torch.set_num_threads(max(1, _cores() // launch.local_world_size))
        if options.model is None:  # one download per machine, not one per rank
            _together(launch.local_rank == 0, lambda: resolve(options.weights))
        summary = _together(True, lambda: extract_one(inputs, out, options))
        summaries = _all_gather(summary)
        merged = _together(launch.rank == 0, lambda: merge_shards(shard_paths(out, launch.world_size), out=out))
    finally:
        if created:
            dist.destroy_process_group()
    if launch.rank != 0:
        return summary
    return combine_summaries(summaries, str(out), merged, time.perf_counter() - started)


def _join_process_group() -> None:
    try:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    except (ValueError, RuntimeError) as error:  # e.g. RANK/WORLD_SIZE set by hand, no MASTER_ADDR
        raise UsageError(
            f"RANK and WORLD_SIZE are set, but the processes cannot connect ({first_line(error)}); launch with "
            f"torchrun, or unset them for a single-process run"
        ) from None


def _together(active: bool, work: Callable[[], T]) -> T | None:
    """Run ``work`` where ``active``; then every rank learns whether some rank failed, and all stop if one did."""
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
