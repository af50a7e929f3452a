"""Progress of a run, reported as it goes: to a callable, or as a tqdm bar (rate, ETA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    done: int
    total: int
    failed: int
    elapsed_s: float


ProgressCallback = Callable[[Progress], None]


def progress_reporter(progress: bool | ProgressCallback, total: int) -> Callable[[Progress | None], None]:
    """A function taking each :class:`Progress` update; ``None`` closes the bar."""
    if callable(progress):
        return lambda update: update is not None and progress(update)
    if not progress:
        return lambda update: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def report(update: Progress | None) -> None:
        if update is None:
            bar.close()
            return
        bar.n = update.done
        bar.set_postfix(failed=update.failed, refresh=False)
        bar.refresh()

    return report
