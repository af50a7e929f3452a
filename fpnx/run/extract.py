"""``extract()``: the one entry point; it checks the options once, then runs in one process, as shard I of N, or
as one rank of a torchrun launch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from ..options import ExtractOptions
from .pipeline import extract_one
from .summary import ExtractSummary
from .torchrun import extract_with_torchrun, launched


def extract(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, **options: Any) -> ExtractSummary:
    """Extract P2..P6 (or ``levels``) of every image under ``inputs`` into the HDF5 file ``out``.

    ``options`` are those of :class:`~fpnx.options.ExtractOptions` (the command's options, with underscores).
    Resumes when ``out`` (or its unfinished ``out.parts``) exists with the same settings; ``overwrite`` starts
    anew. Failed images are recorded with a reason and the run goes on, and are tried again by a later run.
    ``progress=True`` shows a tqdm bar; a callable gets :class:`~fpnx.run.progress.Progress` updates instead
    (from the thread that writes, after each image): an exception it raises stops the run and is raised here
    after everything finished is kept, as a failed write would be (``KeyboardInterrupt`` as Ctrl-C).
    Ctrl-C and SIGTERM raise :class:`~fpnx.errors.Interrupted` after keeping everything finished.

    ``shard="I/N"`` extracts only shard I of N into ``OUT.shard-0000I-of-0000N.h5`` (join them with
    :func:`fpnx.merge_shards`). Launched by torchrun, each process extracts its own shard and rank 0 merges
    them into ``out``. See docs/scaling.md. Returns an :class:`ExtractSummary`.
    """
    checked = ExtractOptions(**options)
    launch = launched()
    if launch is None:
        return extract_one(inputs, out, checked)
    if checked.shard is not None:
        raise UsageError("--shard cannot be combined with torchrun: torchrun gives each process its own shard")
    return extract_with_torchrun(inputs, out, checked, launch)
