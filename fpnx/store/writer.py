"""Write features crash-safely: committed segments in ``OUT.h5.parts/``, merged into ``OUT.h5`` by finalize.

HDF5 rewrites metadata in place and reuses freed space, so a file killed mid-write can be unreadable. Hence
no HDF5 structure that matters is ever written in place: each segment is written as ``.tmp``, closed, fsynced
and renamed (then never touched again), and ``finalize`` builds the output under a temporary name and renames
it over ``OUT.h5``. A killed run loses at most its open segment; rerunning the same command resumes (see
docs/format.md).

A run that starts a new output begins finalize's merge while it goes on, in ``OUT.h5.merge.tmp``; uncompressed
blocks are written there once, and committed segments refer to them (:mod:`fpnx.store.early_merge`). Only those
chunks' bytes are trusted in that file: written once, fsynced before the segment is committed, never rewritten.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError, UsageError
from . import schema
from .files import fsync_dir, remove_file, remove_tree
from .lock import OutputLock
from .location import locate_store, open_checked
from .early_merge import EarlyMerge, keep_data_of
from .merge import merge_into, write_error
from .parts import (
    Manifest, committed_segments, early_merge_path, leftover_tmp_files, parts_dir_for, remove_all_but_manifest,
    tmp_path_for,
)
from .schema import ImageRecord, Layout
from .segment import OpenSegment
from .settings import check_settings, full_settings

STARTS_ANEW = "--overwrite starts anew"
THIS_RUN = "in this run"


class FeatureWriter:
    """Add images' features to ``path``; resumable, one writer per output.

    ``settings`` (JSON-able) must match on resume; ``metadata`` is stored as given (plus the settings) and not
    compared. Nothing reaches ``path`` before ``finalize()``; ``close()`` and leaving ``with`` commit what is
    pending and keep it in ``path.parts`` for the next run, without finalizing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        settings: Mapping[str, Any],
        metadata: Mapping[str, Any],
        levels: Sequence[str],
        channels: Mapping[str, int],
        strides: Mapping[str, int],
        dtype: str = "float32",
        compression: str = "none",
        overwrite: bool = False,
        commit_every_s: float = 10.0,
        commit_every_bytes: int = 256 << 20,
        pool: str | None = None,
        maps: bool = True,
    ) -> None:
        self.path = Path(path)
        self.parts = parts_dir_for(self.path)
        try:
            self._layout = Layout.checked(levels, channels, strides, dtype, compression, pool, maps)
            self._settings = full_settings(settings, self._layout)
            self._metadata = schema.normalize(dict(metadata))
        except ValueError as error:
            raise UsageError(str(error)) from None
        if self.path.is_dir():
            raise UsageError(f"{self.path} is a folder; --out must be a file path such as features.h5")
        if not self.path.parent.is_dir():
            raise UsageError(f"the folder of {self.path} does not exist; create it first")
        if not (commit_every_s > 0 and commit_every_bytes > 0):
            raise UsageError("commit_every_s and commit_every_bytes must be positive")
        self._commit_every_s = float(commit_every_s)
        self._commit_every_bytes = int(commit_every_bytes)
        self._attrs = schema.root_attributes(self._layout, self._settings, self._metadata)
        self._stored: set[str] = set()
        self._failed: set[str] = set()
        self._in_output = 0  # images safe in OUT.h5 (an earlier finalize)
        self._in_parts = 0  # images safe in committed segments
        self._segment: OpenSegment | None = None
        self._next_segment = 1
        self._closed = False
        self.published = False  # finalize has put the complete output in place (what is left is tidying up)
        self._frozen: tuple[frozenset[str], frozenset[str]] | None = None
        self._early: EarlyMerge | None = None  # finalize's merge, begun as segments are committed
        self._lock = OutputLock(self.path)
        self._lock.acquire()
        try:
            self._open(overwrite)
        except BaseException:
            self._closed = True
            self._lock.release()
            raise

    # -- what is done ---------------------------------------------------------------------------------------

    @property
    def done_sources(self) -> frozenset[str]:
        """Sources stored so far: in OUT.h5, in committed segments, and added by this writer."""
        return self._snapshot()[0]

    @property
    def failed_sources(self) -> frozenset[str]:
        """Sources recorded as failed and not stored since."""
        return self._snapshot()[1]

    @property
    def stored_count(self) -> int:
        return len(self._stored)

    # -- adding ---------------------------------------------------------------------------------------------

    def add(self, record: ImageRecord, features: Mapping[str, np.ndarray],
            pooled: Mapping[str, np.ndarray] | None = None) -> None:
        """Store one image's arrays ``{level: (C, h, w)}`` of the stored dtype (none without maps) and, where the
        store keeps them, its pooled vectors ``{level: (C,)}``; shapes are checked (ValueError)."""
        self._check_open()
        self._check_record(record)
        self._check_features(record, features)
        self._check_pooled(record, pooled)
        segment = self._open_segment()
        try:
            segment.add(record, features, pooled)
        except (OSError, RuntimeError) as error:
            raise self._write_failed(error) from None
        self._stored.add(record.source)
        self._failed.discard(record.source)
        self._frozen = None
        self._commit_if_due()

    def add_failure(self, source: str, reason: str) -> None:
        """Record that ``source`` could not be processed (kept until it is stored by a later run)."""
        self._check_open()
        _check_source(source)
        if source in self._stored:
            raise ValueError(f"{source!r} is already stored in {self.path}; it cannot also have failed")
        segment = self._open_segment()
        segment.add_failure(source, str(reason))
        self._failed.add(source)
        self._frozen = None
        self._commit_if_due()

    def commit(self) -> None:
        """Make everything added so far durable now (a new segment in ``path.parts``); no-op if nothing is pending."""
        self._check_open()
        segment = self._segment
        if segment is None:
            return
        if not segment.consistent:  # an add() was cut short (Ctrl-C): drop this segment rather than trust it
            self._drop_segment()
            return
        try:
            segment.commit()
        except (OSError, RuntimeError) as error:
            raise self._write_failed(error) from None
        self._in_parts += segment.image_count
        self._segment = None
        self._next_segment = segment.number + 1
        self._early_merge().committed(segment.path, segment.data_block)

    def copy_earlier_work(self, budget_bytes: int = 64 << 20) -> bool:
        """A resumed run: copy about ``budget_bytes`` more of the earlier run's work into finalize's file (the
        rest is copied at finalize). For a caller with time to spare; True while some is left."""
        return self._early is not None and self._early.copy_earlier_work(budget_bytes)

    # -- ending ---------------------------------------------------------------------------------------------

    def finalize(self) -> Path:
        """Commit, merge OUT.h5 (if any) and all segments into ``path`` atomically, remove ``path.parts``, close."""
        self.commit()
        try:
            if committed_segments(self.parts) or not self.path.exists():
                stores = [locate_store(path) for path in (self.path, self.parts) if path.exists()]
                kept = f"the {self._in_parts} images in {self.parts} are kept" + (
                    f", and so is the old {self.path.name}" if self._in_output else ""
                )
                merging = self._early_merge().take()
                try:
                    merge_into(self.path, stores, self._settings, self._output_attrs(), expected_in=THIS_RUN,
                               kept=kept, started=merging)
                except BaseException:
                    if merging is not None:  # stopped before the merge took it over (or after: then a no-op)
                        merging.abandon()
                    raise
            self.published = True
            remove_file(early_merge_path(self.path))  # given up while segments referred to it: copied by now
            remove_all_but_manifest(self.parts)
            remove_tree(self.parts)
            fsync_dir(self.path.parent)
        finally:
            self._release()
        return self.path

    def close(self) -> None:
        """Commit what is pending and release the output; do not finalize (the next run resumes)."""
        if self._closed:
            return
        if self._early is not None:
            self._early.stop()  # not finalizing: the last segment is not merged early for nothing
        try:
            self.commit()
        finally:
            self._release()

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # commits even after an error: what was computed is kept; never finalizes

    def __repr__(self) -> str:
        return f"<FeatureWriter {self.path}: {self.stored_count} stored, {len(self.failed_sources)} failed>"

    # -- internals ------------------------------------------------------------------------------------------

    def _open(self, overwrite: bool) -> None:
        remove_file(tmp_path_for(self.path))  # a finalize that was killed; it is redone from the parts
        if overwrite:
            remove_tree(self.parts)
            remove_file(self.path)
            remove_file(early_merge_path(self.path))
            fsync_dir(self.path.parent)
        new_output = not self.path.exists()
        finished_parts_id = self._load_finished_output()
        manifest = self._load_parts(finished_parts_id)
        remove_file(early_merge_path(self.path))  # begun by a run that was killed; what it held is in the parts
        if manifest is None:
            manifest = Manifest(uuid.uuid4().hex, self._settings, self._metadata)
            self.parts.mkdir()
            fsync_dir(self.parts.parent)
            manifest.write(self.parts)
        self._run_id = manifest.run_id
        self._early = EarlyMerge(self.path, self.parts, self._layout, self._settings, self._output_attrs(),
                                 enabled=new_output, expected_in=THIS_RUN)

    def _load_finished_output(self) -> str | None:
        """Load what ``path`` holds (for an incremental run); returns the id of the parts it absorbed."""
        if not self.path.exists():
            return None
        try:
            store = open_checked(self.path)
            try:
                self._refuse_other_settings(self.path, store.settings)
                parts_id = store.attrs.get(schema.ATTR_PARTS_ID)
                sources, failures = store.read_sources()
            finally:
                store.close()
        except StoreError as error:
            message = str(error)
            raise StoreError(message if STARTS_ANEW in message else f"{message}; {STARTS_ANEW}") from None
        self._remember(sources, failures)
        self._in_output = len(sources)
        return parts_id

    def _load_parts(self, finished_parts_id: str | None) -> Manifest | None:
        """Resume from ``path.parts`` if it exists; None if there is nothing to resume."""
        if not self.parts.exists():
            return None
        if not self.parts.is_dir():
            raise StoreError(f"{self.parts} is in the way (not a folder); remove it or use {STARTS_ANEW}")
        for tmp in leftover_tmp_files(self.parts):  # from a killed run: never committed
            remove_file(tmp)
        segments = committed_segments(self.parts)
        try:
            manifest = Manifest.read(self.parts)
        except StoreError:
            if segments:
                raise
            remove_tree(self.parts)  # killed before its manifest was written: it holds nothing
            return None
        if finished_parts_id == manifest.run_id:
            # Killed after OUT.h5 was replaced by a finalize but before the parts were removed: already merged.
            remove_all_but_manifest(self.parts)
            remove_tree(self.parts)
            fsync_dir(self.parts.parent)
            return None
        self._refuse_other_settings(self.parts, manifest.settings)
        self._keep_data(segments, manifest.settings)
        for number, segment in segments:
            try:
                store = open_checked(segment, manifest.settings, expected_in=f"in {self.parts / 'manifest.json'}")
                try:
                    sources, failures = store.read_sources()
                finally:
                    store.close()
            except StoreError as error:
                raise StoreError(f"{error}; {STARTS_ANEW}") from None
            overlap = self._stored.intersection(sources)
            if overlap:
                raise StoreError(
                    f"{segment} repeats {sorted(overlap)[0]!r}, already stored; the parts folder was tampered "
                    f"with; {STARTS_ANEW}"
                )
            self._remember(sources, failures)
            self._in_parts += len(sources)
            self._next_segment = number + 1
        return manifest

    def _remember(self, sources: list[str], failures: list[tuple[str, str]]) -> None:
        self._stored.update(sources)
        self._failed.update(source for source, _ in failures)  # minus stored ones: see _snapshot
        self._frozen = None

    def _refuse_other_settings(self, where: Path, old: Mapping[str, Any]) -> None:
        check_settings(where, old, self._settings, expected_in=THIS_RUN, advice=f"; {STARTS_ANEW} (or choose another --out)")

    def _open_segment(self) -> OpenSegment:
        if self._segment is None:
            data_file = self._early_merge().file_for_segment()
            try:
                self._segment = OpenSegment(self.parts, self._next_segment, self._layout, self._attrs, data_file)
            except (OSError, RuntimeError) as error:
                target = self.parts / f"seg-{self._next_segment:06d}.h5"
                self._release()
                raise write_error(target, error, self._kept_text()) from None
        return self._segment

    def _commit_if_due(self) -> None:
        segment = self._segment
        if segment is not None and (
            segment.nbytes >= self._commit_every_bytes
            or time.monotonic() - segment.opened_at >= self._commit_every_s
        ):
            self.commit()

    def _write_failed(self, error: BaseException) -> StoreError:
        """Drop the open segment (its images are lost, everything committed stays) and release the output."""
        segment = self._segment
        assert segment is not None
        target, error = segment.failure or (segment.path, error)
        self._drop_segment()
        self._release()
        return write_error(target, error, self._kept_text())

    def _drop_segment(self) -> None:
        """Throw the open segment away: its images count as not done, committed work is untouched."""
        segment = self._segment
        assert segment is not None
        segment.discard()
        self._stored.difference_update(segment.sources)
        self._segment = None
        self._frozen = None

    def _output_attrs(self) -> dict[str, Any]:
        return {**self._attrs, schema.ATTR_PARTS_ID: self._run_id}

    def _early_merge(self) -> EarlyMerge:
        assert self._early is not None
        return self._early

    def _keep_data(self, segments: list[tuple[int, Path]], settings: Mapping[str, Any]) -> None:
        """The early merge of a run that did not finalize is about to be deleted: keep what segments refer to."""
        expected_in = f"in {self.parts / 'manifest.json'}"
        try:
            keep_data_of(early_merge_path(self.path), self.parts, segments, self._layout, settings, self._attrs,
                         expected_in=expected_in)
        except StoreError as error:
            raise StoreError(f"{error}; {STARTS_ANEW}") from None
        except OSError as error:
            raise write_error(self.parts, error, self._kept_text()) from None

    def _kept_text(self) -> str:
        return f"the {self._in_output + self._in_parts} images written before are kept"

    def _release(self) -> None:
        if self._segment is not None:  # only after a failure: an unfinished segment is never published
            self._segment.discard()
            self._segment = None
        if self._early is not None:  # not finalized: the next run begins again from the parts
            self._early.abandon()
        self._closed = True
        self._lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the writer of {self.path} is closed")

    def _snapshot(self) -> tuple[frozenset[str], frozenset[str]]:
        if self._frozen is None:  # a source that failed once and was stored later counts as stored only
            self._frozen = (frozenset(self._stored), frozenset(self._failed - self._stored))
        return self._frozen

    def _check_record(self, record: ImageRecord) -> None:
        if not isinstance(record, ImageRecord):
            raise ValueError(f"add() takes an ImageRecord, got {type(record).__name__}")
        _check_source(record.source)
        if record.source in self._stored:
            raise ValueError(f"{record.source!r} is already stored in {self.path}")
        for name in ("height", "width", "input_height", "input_width"):
            value = getattr(record, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} of {record.source!r} must be a positive integer, got {value!r}")
        if not (isinstance(record.scale, (int, float, np.floating)) and math.isfinite(record.scale) and record.scale > 0):
            raise ValueError(f"scale of {record.source!r} must be a positive number, got {record.scale!r}")

    def _check_pooled(self, record: ImageRecord, pooled: Mapping[str, np.ndarray] | None) -> None:
        if self._layout.pool is None:
            if pooled is not None:
                raise ValueError(f"pooled vectors of {record.source!r} given, but the store keeps none")
            return
        if pooled is None or set(pooled) != set(self._layout.levels):
            raise ValueError(f"pooled vectors of {record.source!r} must be given for {list(self._layout.levels)}")
        for level, vector in pooled.items():
            if np.shape(vector) != (self._layout.channels[level],):
                raise ValueError(f"the {level} pooled vector of {record.source!r} has shape {np.shape(vector)}, "
                                 f"expected ({self._layout.channels[level]},)")

    def _check_features(self, record: ImageRecord, features: Mapping[str, np.ndarray]) -> None:
        levels = self._layout.levels if self._layout.maps else ()
        if set(features or ()) != set(levels):
            raise ValueError(f"features of {record.source!r} have levels {sorted(features)}, expected {list(levels)}")
        for level in levels:
            array = features[level]
            expected = self._layout.shape(level, record.input_height, record.input_width)
            if not isinstance(array, np.ndarray):
                raise ValueError(f"{level} of {record.source!r} is a {type(array).__name__}, not a numpy array")
            if array.dtype != np.dtype(self._layout.dtype):
                raise ValueError(f"{level} of {record.source!r} is {array.dtype}, the store holds {self._layout.dtype}")
            if array.shape != expected:
                raise ValueError(
                    f"{level} of {record.source!r} has shape {array.shape}, expected {expected} for an input of "
                    f"{record.input_height}x{record.input_width} at stride {self._layout.strides[level]}"
                )


def _check_source(source: str) -> None:
    if not isinstance(source, str) or not source or "\0" in source:
        raise ValueError(f"a source is a non-empty path string without NUL, got {source!r}")
