"""Batches of images of one padded size, filled from a window of images waiting for mates.

Only images of one padded size share a batch, so an image's features never depend on its batch mates (extra
padding would change the features near its border). Images of the same size are rarely next to each other, so
up to ``window`` loaded images wait in one bucket per padded size; a bucket leaves as a batch when it is full,
and when the window is full the fullest bucket leaves as it is. A larger window fills more batches on mixed
sizes at the cost of memory (each waiting image holds its pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ..preprocess import padded_size
from .load import LoadedImage


class Batches:
    """Iterates batches of :class:`LoadedImage` from ``loaded``; failed images go to ``on_failure``.

    ``fill`` is the mean share of ``batch_size`` the batches so far used (1.0: every batch was full).
    """

    def __init__(
        self,
        loaded: Iterable[LoadedImage],
        batch_size: int,
        divisibility: int,
        on_failure: Callable[[LoadedImage], None],
        window: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.batch_size = batch_size
        self.divisibility = divisibility
        self.on_failure = on_failure
        self.window = max(batch_size, window if window is not None else default_window(batch_size))
        self.count = 0
        self.images = 0

    @property
    def fill(self) -> float:
        return self.images / (self.count * self.batch_size) if self.count else 1.0

    def __iter__(self) -> Iterator[list[LoadedImage]]:
        waiting: dict[tuple[int, int], list[LoadedImage]] = {}
        held = 0
        for item in self.loaded:
            if not item.ok:
                self.on_failure(item)
                continue
            key = padded_size(item.input_height, item.input_width, self.divisibility)
            bucket = waiting.setdefault(key, [])
            bucket.append(item)
            held += 1
            if len(bucket) == self.batch_size:
                held -= len(waiting.pop(key))
                yield self._counted(bucket)
            elif held >= self.window:  # bound memory: the fullest bucket goes now
                bucket = waiting.pop(max(waiting, key=lambda k: len(waiting[k])))
                held -= len(bucket)
                yield self._counted(bucket)
        for bucket in waiting.values():
            yield self._counted(bucket)

    def _counted(self, batch: list[LoadedImage]) -> list[LoadedImage]:
        self.count += 1
        self.images += len(batch)
        return batch


def default_window(batch_size: int) -> int:
    """Images that may wait for batch mates: 8 batches' worth (a batch of one never waits)."""
    return 8 * batch_size if batch_size > 1 else 1
