"""fpnx.store: round trips, the documented plain-h5py recipe, crash safety (real SIGKILLs), locking, errors."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import pickle
import re
import resource
import shutil
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fpnx.errors import StoreError, UsageError
from fpnx.store import FORMAT_VERSION, FeatureReader, FeatureWriter, ImageRecord, merge_stores, open_features
from fpnx.store import merge as merge_module
from fpnx.store import segment as segment_module
from fpnx.store.chunks import external_storage

LEVELS = ["p2", "p3", "p6"]
CHANNELS = {"p2": 3, "p3": 4, "p6": 2}
STRIDES = {"p2": 4, "p3": 8, "p6": 64}
SETTINGS = {"weights": {"name": "tiny", "sha256": "ab" * 32}, "preprocessing": {"mean": [0.5, 0.5, 0.5]}}
METADATA = {"fpnx_version": "0.1.0", "weights": {"name": "tiny", "sha256": "ab" * 32, "trained": True}, "command": "t"}
SIZES = [(37, 50), (64, 64), (5, 129), (1, 1), (100, 33), (70, 71), (8, 9), (250, 3)]
FORK = multiprocessing.get_context("fork")
REPO = Path(__file__).resolve().parents[1]


def writer(path: Path, **overrides) -> FeatureWriter:
    options = dict(
        settings=SETTINGS, metadata=METADATA, levels=LEVELS, channels=CHANNELS, strides=STRIDES,
        commit_every_s=3600.0, commit_every_bytes=1 << 40,
    )
    options.update(overrides)
    return FeatureWriter(path, **options)


def image(k: int, dtype: str = "float32", source: str | None = None) -> tuple[ImageRecord, dict[str, np.ndarray]]:
    """Image number k: a deterministic record and feature arrays of the right shapes."""
    height, width = SIZES[k % len(SIZES)]
    record = ImageRecord(source or f"img/{k:03d}.jpg", height * 2, width * 2 + 1, height, width, 0.5 + k / 1000)
    rng = np.random.default_rng(k)
    features = {
        level: rng.standard_normal(
            (CHANNELS[level], math.ceil(height / STRIDES[level]), math.ceil(width / STRIDES[level]))
        ).astype(dtype)
        for level in LEVELS
    }
    return record, features


def add_images(w: FeatureWriter, numbers, dtype: str = "float32") -> None:
    for k in numbers:
        w.add(*image(k, dtype))


def contents(path: Path) -> dict:
    """Everything a reader sees, for comparing stores independently of how they were cut into blocks."""
    with open_features(path) as reader:
        return {
            "sources": reader.sources,
            "info": [reader.info(i) for i in range(len(reader))],
            "arrays": [{level: array.tolist() for level, array in reader[i].items()} for i in range(len(reader))],
            "failures": reader.failures,
            "settings": reader.attrs["settings"],
        }


def expect_images(reader: FeatureReader, numbers, dtype: str = "float32") -> None:
    assert len(reader) == len(numbers)
    for i, k in enumerate(numbers):
        record, features = image(k, dtype)
        assert reader.sources[i] == record.source
        assert reader.info(i) == {
            "source": record.source, "height": record.height, "width": record.width,
            "input_height": record.input_height, "input_width": record.input_width, "scale": record.scale,
        }
        got = reader[record.source]
        assert list(got) == LEVELS
        for level in LEVELS:
            assert got[level].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got[level], features[level])


# -- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_round_trip(tmp_path, dtype, compression):
    out = tmp_path / "out.h5"
    with writer(out, dtype=dtype, compression=compression) as w:
        add_images(w, range(5), dtype)
        w.commit()
        add_images(w, range(5, 8), dtype)
        w.add_failure("img/broken.jpg", "cannot decode: truncated JPEG")
        assert w.stored_count == 8
        assert w.failed_sources == {"img/broken.jpg"}
        assert w.finalize() == out
    assert not (tmp_path / "out.h5.parts").exists() and not (tmp_path / "out.h5.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]

    with open_features(out) as reader:
        expect_images(reader, range(8), dtype)
        assert reader[-1].keys() == reader[7].keys()
        assert reader.failures == [("img/broken.jpg", "cannot decode: truncated JPEG")]
        assert reader.levels == LEVELS
        assert reader.index_of("img/003.jpg") == 3
        assert "img/003.jpg" in reader and "nope" not in reader
        assert reader.attrs["format"] == "fpnx-features" and reader.attrs["format_version"] == FORMAT_VERSION
        assert reader.attrs["dtype"] == dtype and reader.attrs["compression"] == compression
        assert reader.attrs["strides"] == [4, 8, 64] and reader.attrs["channels"] == [3, 4, 2]
        assert reader.metadata["command"] == "t" and reader.metadata["weights"]["trained"] is True
        assert reader.attrs["settings"]["dtype"] == dtype
        with pytest.raises(KeyError):
            reader["nope"]
        with pytest.raises(IndexError):
            reader[8]

    with h5py.File(out, "r") as f:  # the layout docs/format.md promises
        assert f.attrs["format"] == "fpnx-features" and f.attrs["format_version"] == 1
        assert json.loads(f.attrs["metadata"])["fpnx_version"] == "0.1.0"
        assert f.attrs["weights"] == f"tiny (sha256 {'ab' * 32})"
        assert sorted(f["blocks"]) == ["000001", "000002"]
        assert f["images/segment"][:].tolist() == [1] * 5 + [2] * 3
        assert f["images/scale"].dtype == np.float64 and f["images/offset_p2"].dtype == np.int64
        for name in f["images"]:
            assert f["images"][name].maxshape == (None,) and f["images"][name].chunks
        dataset = f["blocks/000001/p2"]
        assert dataset.dtype == np.dtype(dtype) and dataset.ndim == 1
        assert dataset.chunks == dataset.shape  # a block smaller than 1 MiB is one chunk of its size
        assert dataset.compression == (None if compression == "none" else compression)


def test_big_blocks_have_1_mib_chunks(tmp_path):
    out = tmp_path / "out.h5"
    side = 1264  # p2 of one image: 3 x 316 x 316 float32 = 1.2 MB
    rng = np.random.default_rng(0)
    records = [ImageRecord(f"big{k}.jpg", side, side, side, side - k, 1.0) for k in range(3)]
    arrays = [
        {level: rng.standard_normal((CHANNELS[level], math.ceil(side / STRIDES[level]),
                                     math.ceil((side - k) / STRIDES[level]))).astype("float32") for level in LEVELS}
        for k in range(3)
    ]
    with writer(out, compression="lzf") as w:
        for record, features in zip(records, arrays):
            w.add(record, features)
        w.finalize()
    with h5py.File(out, "r") as f:
        assert f["blocks/000001/p2"].chunks == ((1 << 20) // 4,)
    with open_features(out) as reader:
        for k, features in enumerate(arrays):
            for level in LEVELS:
                np.testing.assert_array_equal(reader[k][level], features[level])


def test_docs_recipe_runs_literally(tmp_path, monkeypatch):
    """The plain-h5py recipe of docs/format.md, executed as written, reads what the reader reads."""
    text = (REPO / "docs" / "format.md").read_text()
    section = text.split("### Reading one image with plain h5py", 1)[1]
    recipe = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    odd = os.fsdecode(b"caf\xe9 #1/../x.jpg")  # Latin-1 bytes: not UTF-8
    with writer(tmp_path / "features.h5", dtype="float16", compression="gzip") as w:
        record, features = image(2, "float16", source=odd)
        w.add(record, features)
        add_images(w, [3], "float16")
        w.finalize()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(recipe, "docs/format.md", "exec"), namespace)
    assert namespace["source"] == odd
    assert list(namespace["features"]) == LEVELS
    for level in LEVELS:
        np.testing.assert_array_equal(namespace["features"][level], features[level])


def test_odd_sources_survive(tmp_path):
    sources = [
        os.fsdecode(b"\xff\xfe not utf8.jpg"),
        "a/b/../c.jpg",
        "/abs/path with space/#hash.png",
        "..",
        "/",
        "日本語/写真.jpg",
        "name\nwith newline.jpg",
    ]
    out = tmp_path / "out.h5"
    with writer(out) as w:
        for k, source in enumerate(sources):
            w.add(*image(k, source=source))
        bad = os.fsdecode(b"bad\x80.jpg")
        w.add_failure(bad, f"cannot open {bad}")
        w.finalize()
    with open_features(out) as reader:
        assert reader.sources == sources
        for k, source in enumerate(sources):
            np.testing.assert_array_equal(reader[source]["p3"], image(k)[1]["p3"])
        [(failed, reason)] = reader.failures
        assert failed == os.fsdecode(b"bad\x80.jpg") and reason.startswith("cannot open bad")
    with h5py.File(out, "r") as f:
        assert list(f["images/source"][:]) == [os.fsencode(s) for s in sources]
        assert f["images/source"][0].decode("utf-8", "surrogateescape") == sources[0]
    with FeatureWriter(out, settings=SETTINGS, metadata=METADATA, levels=LEVELS, channels=CHANNELS,
                       strides=STRIDES) as w:  # resume matches undecodable names exactly
        assert w.done_sources == set(sources)


# -- resuming ----------------------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(tmp_path):
    whole = tmp_path / "whole.h5"
    with writer(whole) as w:
        add_images(w, range(8))
        w.add_failure("img/x.jpg", "bad")
        w.finalize()

    out = tmp_path / "out.h5"
    with writer(out) as w:
        add_images(w, range(3))
        w.commit()
        add_images(w, range(3, 5))
        w.add_failure("img/x.jpg", "bad")
    # closed without finalize: the work is in the parts, committed
    assert not out.exists()
    with writer(out) as w:
        assert w.done_sources == {image(k)[0].source for k in range(5)}
        assert w.failed_sources == {"img/x.jpg"}
        with pytest.raises(ValueError, match="already stored"):
            w.add(*image(1))
        add_images(w, range(5, 8))
        w.finalize()
    assert contents(out) == contents(whole)


def _write_then_hang(out: Path, committed: int, pending: int, ready) -> None:
    w = writer(out)
    add_images(w, range(committed))
    w.commit()
    add_images(w, range(committed, committed + pending))  # in seg-000002.h5.tmp, never committed
    ready.set()
    time.sleep(60)


def _kill_child(target, *args) -> None:
    ready = FORK.Event()
    child = FORK.Process(target=target, args=(*args, ready))
    child.start()
    assert ready.wait(20), "the child never got ready"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL


def test_killed_writer_resumes(tmp_path):
    whole = tmp_path / "whole.h5"
    with writer(whole) as w:
        add_images(w, range(8))
        w.finalize()

    out = tmp_path / "out.h5"
    _kill_child(_write_then_hang, out, 4, 3)
    parts = tmp_path / "out.h5.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "seg-000001.h5", "seg-000002.h5.tmp"]
    assert (tmp_path / "out.h5.lock").exists()  # stale, but the dead process holds no lock

    with open_features(parts) as reader:  # what survived is readable while unfinished
        expect_images(reader, range(4))
    with writer(out) as w:
        assert not (parts / "seg-000002.h5.tmp").exists()
        assert w.done_sources == {image(k)[0].source for k in range(4)}
        add_images(w, sorted(set(range(8)) - {int(s[4:7]) for s in w.done_sources}))
        w.finalize()
    assert contents(out) == contents(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "whole.h5"]


def _finalize_killed_at(out: Path, where: str, ready) -> None:
    import fpnx.store.writer as writer_module
    import fpnx.store.merge as merge_module

    def die(*args, **kwargs):
        ready.set()
        time.sleep(60)

    w = writer(out)
    add_images(w, range(4, 6))
    if where.startswith("before rename"):
        monkey = merge_module.publish
        finishing = {"out.h5.tmp", "out.h5.merge.tmp"}
        merge_module.publish = lambda tmp, final: die() if tmp.name in finishing else monkey(tmp, final)
    else:
        writer_module.remove_tree = die
    w.finalize()


@pytest.mark.parametrize("where", ["before rename", "after rename", "before rename, new output"])
def test_killed_finalize_resumes(tmp_path, where):
    out = tmp_path / "out.h5"
    new_output = where.endswith("new output")
    if new_output:  # finalize finishes OUT.h5.merge.tmp, which holds the segments' blocks, and renames it
        with writer(out) as w:
            add_images(w, range(4))
    else:
        with writer(out) as w:  # an earlier, finished run: the kill must never hurt it
            add_images(w, range(4))
            w.finalize()
    _kill_child(_finalize_killed_at, out, where)
    assert (tmp_path / "out.h5.parts").is_dir()
    if new_output:
        assert not out.exists() and (tmp_path / "out.h5.merge.tmp").exists()
    else:
        with open_features(out) as reader:
            assert len(reader) == (4 if where == "before rename" else 6)
    with writer(out) as w:
        assert w.done_sources == {image(k)[0].source for k in (range(6))}
        assert not (tmp_path / "out.h5.tmp").exists() and not (tmp_path / "out.h5.merge.tmp").exists()
        add_images(w, [6])
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(7))


def test_incremental_finalize(tmp_path):
    out = tmp_path / "out.h5"
    with writer(out, compression="gzip") as w:
        add_images(w, range(3))
        w.add_failure("img/006.jpg", "timeout")
        w.finalize()
    with writer(out, compression="gzip") as w:
        assert w.done_sources == {image(k)[0].source for k in range(3)}
        assert w.failed_sources == {"img/006.jpg"}
        add_images(w, range(3, 7))  # including the source that failed before
    with writer(out, compression="gzip") as w:  # resumed: the stored row outranks the old failure
        assert w.failed_sources == frozenset()
        assert w.done_sources == {image(k)[0].source for k in range(7)}
        add_images(w, [7])
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(8))
        assert reader.failures == []
    with h5py.File(out, "r") as f:
        assert sorted(f["blocks"]) == ["000001", "000002", "000003"]
    with writer(out, compression="gzip") as w:  # nothing new: finalize keeps the file as it is
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(8))


def test_automatic_commits(tmp_path):
    out = tmp_path / "out.h5"
    with writer(out, commit_every_bytes=1) as w:
        add_images(w, range(3))
        assert len(list((tmp_path / "out.h5.parts").glob("seg-*.h5"))) == 3
    with writer(out, commit_every_s=1e-9) as w:
        add_images(w, [3])
    assert len(list((tmp_path / "out.h5.parts").glob("seg-*.h5"))) == 4


# -- refusing --------------------------------------------------------------------------------------------------


def test_settings_mismatch_and_overwrite(tmp_path):
    out = tmp_path / "out.h5"
    with writer(out) as w:
        add_images(w, range(2))
    other = {**SETTINGS, "preprocessing": {"mean": [0.1, 0.5, 0.5]}}
    with pytest.raises(StoreError, match=r"'preprocessing\.mean' is \[0\.5, 0\.5, 0\.5\] there, \[0\.1, 0\.5, 0\.5\] in this run.*--overwrite starts anew"):
        writer(out, settings=other)
    with pytest.raises(StoreError, match="'dtype' is 'float32' there, 'float16' in this run"):
        writer(out, dtype="float16")
    with writer(out) as w:  # the refusals changed nothing
        assert w.stored_count == 2
        w.finalize()
    with pytest.raises(StoreError, match=r"out\.h5 was made with other settings: 'compression'"):
        writer(out, compression="lzf")
    with writer(out, dtype="float16", overwrite=True) as w:
        assert w.done_sources == frozenset()
        add_images(w, [5], "float16")
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, [5], "float16")


def test_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="folder"):
        writer(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        writer(tmp_path / "missing" / "out.h5")
    with pytest.raises(UsageError, match="dtype"):
        writer(tmp_path / "out.h5", dtype="float64")
    with pytest.raises(UsageError, match="compression"):
        writer(tmp_path / "out.h5", compression="zstd")
    with pytest.raises(UsageError, match="strides"):
        writer(tmp_path / "out.h5", strides={"p2": 4})
    with pytest.raises(UsageError, match="dtype"):
        writer(tmp_path / "out.h5", settings={"dtype": "float16"})  # settings contradict the arguments
    assert list(tmp_path.iterdir()) == []

    with writer(tmp_path / "out.h5") as w:
        record, features = image(0)
        with pytest.raises(ValueError, match="shape"):
            w.add(record, {**features, "p3": features["p3"][:, :-1]})
        with pytest.raises(ValueError, match="float16"):
            w.add(record, {level: a.astype("float16") for level, a in features.items()})
        with pytest.raises(ValueError, match="levels"):
            w.add(record, {"p2": features["p2"]})
        w.add(record, features)
        with pytest.raises(ValueError, match="already stored"):
            w.add(record, features)
        with pytest.raises(ValueError, match="already stored"):
            w.add_failure(record.source, "x")
    with pytest.raises(ValueError, match="closed"):
        w.add(*image(1))


def _hold_writer(out: Path, ready) -> None:
    writer(out)
    ready.set()
    time.sleep(60)


def test_second_writer_refused(tmp_path):
    out = tmp_path / "out.h5"
    ready = FORK.Event()
    child = FORK.Process(target=_hold_writer, args=(out, ready))
    child.start()
    try:
        assert ready.wait(20)
        with pytest.raises(StoreError, match=rf"out\.h5 is being written by another fpnx run \(pid {child.pid} on .+\); wait for it or choose another --out"):
            writer(out)
        with pytest.raises(StoreError, match="being written"):
            merge_stores([tmp_path / "out.h5.parts"], out, overwrite=True)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    with writer(out) as first:  # the dead holder's lock went with it
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
            writer(out)  # a second writer in the same process is refused too
        first.add(*image(0))
    assert not (tmp_path / "out.h5.lock").exists()


# -- damaged and unfinished files ------------------------------------------------------------------------------


def _finished(path: Path, numbers=range(3), **options) -> Path:
    with writer(path, **options) as w:
        add_images(w, numbers)
        w.finalize()
    return path


def test_damaged_files_give_one_line_errors(tmp_path):
    good = _finished(tmp_path / "good.h5")
    cases = {}
    cases["random.h5"] = lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000))
    cases["empty.h5"] = lambda p: p.write_bytes(b"")
    cases["truncated.h5"] = lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    def no_format(p):
        with h5py.File(p, "w") as f:
            f["x"] = 1

    def newer(p):
        shutil.copy(good, p)
        with h5py.File(p, "r+") as f:
            f.attrs["format_version"] = FORMAT_VERSION + 1

    def soft_link(p):
        shutil.copy(good, p)
        with h5py.File(p, "r+") as f:
            del f["images/height"]
            f["images/height"] = h5py.SoftLink("/images/width")

    def external_link(p):
        shutil.copy(good, p)
        with h5py.File(p, "r+") as f:
            del f["blocks/000001/p2"]
            f["blocks/000001/p2"] = h5py.ExternalLink(str(good), "/blocks/000001/p2")

    def external_storage(p):
        shutil.copy(good, p)
        (tmp_path / "secret.bin").write_bytes(b"\x01" * 4096)
        with h5py.File(p, "r+") as f:
            size = f["blocks/000001/p3"].shape[0]
            del f["blocks/000001/p3"]
            f.create_dataset("blocks/000001/p3", shape=(size,), dtype="float32",
                             external=[(str(tmp_path / "secret.bin"), 0, h5py.h5f.UNLIMITED)])

    def virtual(p):
        shutil.copy(good, p)
        with h5py.File(p, "r+") as f:
            size = f["blocks/000001/p6"].shape[0]
            layout = h5py.VirtualLayout(shape=(size,), dtype="float32")
            layout[:] = h5py.VirtualSource(str(good), "blocks/000001/p6", shape=(size,))
            del f["blocks/000001/p6"]
            f.create_virtual_dataset("blocks/000001/p6", layout)

    def short_block(p):
        shutil.copy(good, p)
        with h5py.File(p, "r+") as f:
            f["images/offset_p3"][-1] = 10**9

    cases.update({"no_format.h5": no_format, "newer.h5": newer, "soft_link.h5": soft_link,
                  "external_link.h5": external_link, "external_storage.h5": external_storage,
                  "virtual.h5": virtual, "short_block.h5": short_block})
    expected = {
        "random.h5": r"not an fpnx feature file \(not HDF5\)", "empty.h5": "not HDF5",
        "truncated.h5": "damaged", "no_format.h5": "has no 'format' attribute",
        "newer.h5": f"newer fpnx \\(format_version {FORMAT_VERSION + 1}", "soft_link.h5": "SoftLink",
        "external_link.h5": "ExternalLink", "external_storage.h5": "reads data from other files",
        "virtual.h5": "reads data from other files", "short_block.h5": "past the end",
    }
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(StoreError, match=expected[name]) as caught:
            with open_features(path) as reader:
                for i in range(len(reader)):
                    reader[i]
        message = str(caught.value)
        assert name in message and "\n" not in message, message
    with pytest.raises(StoreError, match="does not exist") as missing:
        open_features(tmp_path / "nothing.h5")
    assert isinstance(missing.value, FileNotFoundError)  # what `except FileNotFoundError` expects to catch
    with pytest.raises(StoreError, match="--overwrite starts anew"):
        writer(tmp_path / "random.h5")  # a damaged output is never silently replaced


def test_unfinished_output_and_live_parts_view(tmp_path):
    out = tmp_path / "out.h5"
    w = writer(out)
    add_images(w, range(3))
    w.commit()
    add_images(w, [3])  # pending: not visible yet
    with pytest.raises(StoreError, match=r"out\.h5 is not finished: an interrupted or running extract left 3 images in .*out\.h5\.parts; run the same command again to resume, or open .*out\.h5\.parts to read what is done"):
        open_features(out)
    reader = open_features(tmp_path / "out.h5.parts")  # while the writer is still running
    expect_images(reader, range(3))
    assert reader.attrs["settings"] == json.loads(json.dumps(reader.attrs["settings"]))
    assert reader.levels == LEVELS
    w.close()
    with pytest.raises(StoreError, match="left 4 images"):
        open_features(out)
    reader.close()
    expect_images(reader, range(3))  # still usable after close: files reopen on demand


@pytest.mark.parametrize("earlier_output", [False, True])
def test_a_parts_reader_says_when_its_run_has_finished(tmp_path, earlier_output):
    out = tmp_path / "out.h5"
    if earlier_output:
        _finished(out, [100])  # an incremental run: out.h5 exists while the run goes on
    w = writer(out)
    add_images(w, range(3))
    w.commit()
    add_images(w, range(3, 5))
    w.commit()
    reader = open_features(tmp_path / "out.h5.parts")
    expect_images(reader, range(5))
    travelled = pickle.loads(pickle.dumps(reader))
    w.finalize()
    finished = r"out\.h5\.parts changed while being read: its run has finished; open the output .*out\.h5$"
    for position in (0, -1):
        with pytest.raises(StoreError, match=finished):  # reopens the segments: gone
            travelled[position]
    if earlier_output:  # segments that hold their blocks: the open ones still read as they were
        expect_images(reader, range(5))
    else:  # their blocks were in the early merge, which is now out.h5
        with pytest.raises(StoreError, match=finished):
            reader[0]
    reader.close()


def test_write_error_keeps_committed_segments(tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    w = writer(out)
    add_images(w, range(3))
    w.commit()
    add_images(w, range(3, 5))
    real_publish = segment_module.publish

    def disk_full(tmp, final):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segment_module, "publish", disk_full)
    with pytest.raises(StoreError) as caught:
        w.commit()
    assert str(caught.value) == (
        f"cannot write {tmp_path / 'out.h5.parts' / 'seg-000002.h5'}: No space left on device; the 3 images "
        "written before are kept; free space and run the same command again"
    )
    monkeypatch.setattr(segment_module, "publish", real_publish)
    assert sorted(p.name for p in (tmp_path / "out.h5.parts").iterdir()) == ["manifest.json", "seg-000001.h5"]
    assert not (tmp_path / "out.h5.lock").exists()
    with open_features(tmp_path / "out.h5.parts") as reader:
        expect_images(reader, range(3))
    with writer(out) as w:
        assert w.stored_count == 3
        add_images(w, range(3, 8))
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(8))


def _fill_until_too_large(out: Path, result) -> None:
    """A real failed write: the file size limit makes the kernel refuse it (EFBIG), as a full disk would."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    w = writer(out)
    add_images(w, range(2))
    w.commit()
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    try:
        for k in range(2, 200):
            w.add(*image(k % 8, source=f"big/{k}.jpg"))
        w.commit()
        result.put("no error")
    except StoreError as error:
        result.put(str(error))
    open_features(out.with_name("out.h5.parts")).close()  # HDF5 is still healthy after the failure
    result.put("healthy")


def _in_child(target, out: Path) -> tuple[multiprocessing.Process, multiprocessing.Queue, str]:
    """Run ``target(out, queue)`` in a forked child; returns it, its queue, and the first message it sent."""
    result = FORK.Queue()
    child = FORK.Process(target=target, args=(out, result))
    child.start()
    return child, result, result.get(timeout=60)


def test_real_write_failure_in_child(tmp_path):
    out = tmp_path / "out.h5"
    child, result, message = _in_child(_fill_until_too_large, out)
    assert result.get(timeout=30) == "healthy"
    child.join(10)
    assert child.exitcode == 0
    # the file that grew too large: a new output's blocks go to OUT.h5.merge.tmp, which the segments refer to
    assert re.fullmatch(r"cannot write .*/out\.h5\.merge\.tmp: File too large; the 2 images written before are kept; .*",
                        message)
    assert (tmp_path / "out.h5.merge.tmp").exists()
    assert sorted(p.name for p in (tmp_path / "out.h5.parts").iterdir()) == ["manifest.json", "seg-000001.h5"]
    with open_features(tmp_path / "out.h5.parts") as reader:
        expect_images(reader, range(2))


def test_interrupted_add_drops_only_the_open_segment(tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    w = writer(out)
    add_images(w, range(3))
    w.commit()
    add_images(w, [3])
    real_append = segment_module._LevelData.append

    def interrupted(self, flat):
        if self._level == "p3":
            raise KeyboardInterrupt  # Ctrl-C between two levels of one image
        return real_append(self, flat)

    monkeypatch.setattr(segment_module._LevelData, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with w:
            w.add(*image(4))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out.h5.parts").iterdir()) == ["manifest.json", "seg-000001.h5"]
    with writer(out) as w:
        assert w.done_sources == {image(k)[0].source for k in range(3)}
        add_images(w, range(3, 6))
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(6))


def test_a_dropped_segment_leaves_no_block_in_the_output(tmp_path, monkeypatch):
    """A segment thrown away mid-run (an add cut short) had begun its block in the early merge: that block is
    removed, so the output holds exactly the blocks its rows point at."""
    out = tmp_path / "out.h5"
    w = writer(out)
    add_images(w, range(3))
    w.commit()
    w.add(*_big_image(1))  # whole chunks of the dropped block reach the early merge
    real_append = segment_module._LevelData.append

    def interrupted(self, flat):
        if self._level == "p3":
            raise KeyboardInterrupt
        return real_append(self, flat)

    with monkeypatch.context() as patched:
        patched.setattr(segment_module._LevelData, "append", interrupted)
        with pytest.raises(KeyboardInterrupt):
            w.add(*image(4))
    w.commit()  # drops the interrupted segment
    add_images(w, range(5, 7))
    w.finalize()
    with h5py.File(out, "r") as f:
        assert sorted(f["blocks"]) == sorted({f"{block:06d}" for block in f["images/segment"][:].tolist()})
    with open_features(out) as reader:
        expect_images(reader, [0, 1, 2, 5, 6])


# -- merging -----------------------------------------------------------------------------------------------------


def test_merge_two_stores(tmp_path):
    a = _finished(tmp_path / "a.h5", range(3), compression="gzip")
    with writer(tmp_path / "b.h5", compression="gzip") as w:  # b stays unfinished: merge its parts folder
        add_images(w, range(3, 6))
        w.add_failure("img/001.jpg", "failed here, stored in a")
        w.add_failure("img/009.jpg", "really failed")
    merged = merge_stores([a, tmp_path / "b.h5.parts"], tmp_path / "merged.h5")
    assert merged == tmp_path / "merged.h5"
    with open_features(merged) as reader:
        expect_images(reader, range(6))
        assert reader.failures == [("img/009.jpg", "really failed")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5.parts", "merged.h5"]

    with pytest.raises(UsageError, match="already exists"):
        merge_stores([a], merged)
    with pytest.raises(StoreError, match=r"'img/000\.jpg' is stored in both"):
        merge_stores([a, merged], tmp_path / "dup.h5")
    c = _finished(tmp_path / "c.h5", [7], compression="lzf")
    with pytest.raises(StoreError, match=r"c\.h5 was made with other settings: 'compression' is 'lzf' there, 'gzip' in .*a\.h5"):
        merge_stores([a, c], tmp_path / "mixed.h5")
    assert not (tmp_path / "dup.h5").exists() and not (tmp_path / "mixed.h5").exists()
    merge_stores([merged], merged, overwrite=True)  # the output may be an input: it is replaced atomically
    with open_features(merged) as reader:
        expect_images(reader, range(6))


def test_background_writer_gives_buffers_back_after_an_error():
    """A producer may be waiting for those buffers (the CUDA path's pinned pool): they come back, written or not."""
    from fpnx.store.background import BackgroundWriter

    queued = threading.Event()

    class Failing:
        def add(self, record, features, pooled=None):
            queued.wait(10)  # all three are in the queue when the first write fails
            raise OSError(28, "No space left on device")

    returned = []
    background = BackgroundWriter(Failing(), on_written=lambda: None)
    for k in range(3):
        background.add(image(k)[0], {}, done=lambda k=k: returned.append(k))
    queued.set()
    with pytest.raises(OSError, match="No space"):
        background.stop()
    assert returned == [0, 1, 2]


def test_background_writer_does_idle_work_between_images_and_stops_promptly():
    """``idle`` runs only while nothing is queued, a piece per call; stop() ends it even while work is left."""
    from fpnx.store.background import BackgroundWriter

    written, pieces = [], []

    class Recording:
        def add(self, record, features, pooled=None):
            written.append(record.source)

    def idle() -> bool:
        pieces.append(len(written))
        time.sleep(0.01)
        return True  # never done

    background = BackgroundWriter(Recording(), on_written=lambda: None, idle=idle)
    time.sleep(0.2)
    for k in range(3):
        background.add(image(k)[0], {})
    time.sleep(0.2)
    started = time.monotonic()
    background.stop()
    assert time.monotonic() - started < 5
    assert written == [image(k)[0].source for k in range(3)]
    assert pieces[0] == 0 and pieces[-1] == 3  # before the images came, and after they were written


def test_background_writer_queues_small_images_while_a_commit_holds_the_thread():
    """A commit's fsync holds the writer thread for tenths of a second: small images keep being queued meanwhile
    (up to ``max_bytes``), large ones stop the producer after ``depth`` images (backpressure)."""
    from fpnx.store.background import BackgroundWriter

    held = threading.Event()
    written = []

    class Held:
        def add(self, record, features, pooled=None):
            held.wait(10)
            written.append(record.source)

    def add_in_thread(background, count, nbytes, view_of=None):
        added = []

        def produce():
            for k in range(count):
                array = np.zeros(nbytes, np.uint8) if view_of is None else view_of[:nbytes]
                background.add(image(k)[0], {"p5": array})
                added.append(k)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        producer.join(1.0)
        return added, producer

    small = BackgroundWriter(Held(), on_written=lambda: None, depth=2, max_bytes=10_000)
    added, _ = add_in_thread(small, 20, 100)
    assert len(added) == 20  # 2 KB in all: none waits
    held.set()
    small.stop()
    assert len(written) == 20

    held.clear()
    large = BackgroundWriter(Held(), on_written=lambda: None, depth=2, max_bytes=10_000)
    added, producer = add_in_thread(large, 6, 8_000)
    assert len(added) == 3  # one in the thread's hands, two queued; the fourth waits for room
    held.set()
    producer.join(10)
    large.stop()
    assert len(written) == 20 + 6

    # small views of large buffers (the CPU path's crops of the model's outputs) count as those buffers
    held.clear()
    views = BackgroundWriter(Held(), on_written=lambda: None, depth=2, max_bytes=10_000)
    added, producer = add_in_thread(views, 6, 100, view_of=torch.zeros(8_000, dtype=torch.uint8).numpy())
    assert len(added) == 3
    held.set()
    producer.join(10)
    views.stop()
    assert len(written) == 20 + 6 + 6


def test_written_bytes_are_sent_to_the_disk_as_they_come(tmp_path, monkeypatch):
    """New files ask the kernel to start writing back every ``WRITEBACK_EVERY`` bytes, so a commit's fsync finds
    little left to write; the hint is harmless where the system has none."""
    from fpnx.store import files

    hints = []
    monkeypatch.setattr(files, "WRITEBACK_EVERY", 1 << 20)
    monkeypatch.setattr(files, "start_writeback", lambda descriptor: hints.append(descriptor))
    target = files.FailSafeFile(tmp_path / "new.bin")
    for _ in range(5):
        target.write(np.zeros(700_000, np.uint8))
    assert hints == [target.descriptor, target.descriptor]  # after 1.4 MB and after 2.8 MB
    target.close()
    monkeypatch.undo()

    with open(tmp_path / "new.bin", "ab") as handle:
        files.start_writeback(handle.fileno())  # the real call (Linux), or nothing
    monkeypatch.setattr(files, "_sync_file_range", lambda: None)
    with open(tmp_path / "new.bin", "ab") as handle:
        files.start_writeback(handle.fileno())
    assert (tmp_path / "new.bin").stat().st_size == 3_500_000


# -- finalize and merge copy uncompressed blocks by their bytes ---------------------------------------------------


def _block_layouts(path: Path) -> list[tuple]:
    with h5py.File(path, "r") as f:
        return [(level, d.shape, d.chunks, d.maxshape, d.compression)
                for _, block in sorted(f["blocks"].items()) for level, d in block.items()]


def _spy_on_byte_copies(monkeypatch) -> list[bool]:
    results: list[bool] = []
    real = merge_module.copy_dataset_bytes

    def spy(*args):
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(merge_module, "copy_dataset_bytes", spy)
    return results


def _big_image(k: int) -> tuple[ImageRecord, dict[str, np.ndarray]]:
    """p2 of 3 x 316 x (316 - k) float32: more than one 1 MiB chunk."""
    side = 1264
    rng = np.random.default_rng(100 + k)
    record = ImageRecord(f"big/{k}.jpg", side, side, side, side - 4 * k, 1.0)
    return record, {level: rng.standard_normal((CHANNELS[level], math.ceil(side / STRIDES[level]),
                                                math.ceil((side - 4 * k) / STRIDES[level]))).astype("float32")
                    for level in LEVELS}


def _full_chunk_offsets(path: Path) -> list[int]:
    """File offsets of every 1 MiB block chunk."""
    with h5py.File(path, "r") as f:
        return [info.byte_offset for _, block in f["blocks"].items() for dataset in block.values()
                for info in map(dataset.id.get_chunk_info, range(dataset.id.get_num_chunks()))
                if info.size == 1 << 20]


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "read-write"])
def test_finalize_copies_uncompressed_blocks_byte_for_byte(tmp_path, monkeypatch, kernel):
    copies = _spy_on_byte_copies(monkeypatch)
    if not kernel:  # a file system (or kernel) that refuses copy_file_range: plain reads and writes do it
        def refused(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        monkeypatch.setattr(os, "copy_file_range", refused)
    out = tmp_path / "out.h5"
    _finished(out, [100])  # an incremental run: its segments hold their blocks, finalize copies them
    expected = {image(100)[0].source: image(100)[1]}
    old = _block_layouts(out)
    copies.clear()
    with writer(out) as w:
        for k in range(9):
            record, features = _big_image(k) if k % 3 == 1 else image(k)
            w.add(record, features)
            expected[record.source] = features
            if k % 3 == 2:
                w.commit()
        parts = [tmp_path / "out.h5.parts" / f"seg-{number:06d}.h5" for number in (1, 2, 3)]
        segments = [layout for part in parts for layout in _block_layouts(part)]
        segment_offsets = [offset for part in parts for offset in _full_chunk_offsets(part)]
        w.finalize()
    # whole chunks start at multiples of 4 KiB in both files: reflink-capable file systems share them
    offsets = _full_chunk_offsets(out)
    assert len(offsets) == len(segment_offsets) > 3 and not [at for at in offsets + segment_offsets if at % 4096]
    assert copies == [True] * 12  # the old file's block and three new ones, none through HDF5's object copy
    assert _block_layouts(out) == old + segments  # same shapes, chunks (1 MiB or the block's size) and maxshape
    assert max(chunks[0] for _, _, chunks, _, _ in segments) == (1 << 20) // 4
    with open_features(out) as reader:
        assert reader.sources == list(expected)
        for source, features in expected.items():
            for level in LEVELS:
                np.testing.assert_array_equal(reader[source][level], features[level])


def _data_files(segment: Path) -> set[bytes]:
    """The files a segment's blocks keep their bytes in, besides itself (HDF5 external storage)."""
    with h5py.File(segment, "r") as f:
        return {name for _, block in f["blocks"].items() for dataset in block.values()
                for name, _, _ in external_storage(dataset)}


def _segments_of(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".parts").glob("seg-*.h5"))


def test_a_new_output_writes_each_block_once(tmp_path, monkeypatch):
    """A new uncompressed output: blocks are written straight into the early merge and each committed segment
    refers to its bytes there (readable as it is); finalize copies nothing, only adds the tables; the file is
    the one a merge at the end gives, in whole 4 KiB-aligned chunks."""
    copies = _spy_on_byte_copies(monkeypatch)
    out, whole = tmp_path / "out.h5", tmp_path / "whole.h5"
    early = tmp_path / "out.h5.merge.tmp"
    images = [_big_image(k) if k % 3 == 1 else image(k) for k in range(9)]
    with writer(out) as w:
        for k, (record, features) in enumerate(images):
            w.add(record, features)
            if k % 3 == 2:
                w.commit()
        assert [_data_files(segment) for segment in _segments_of(out)] == [{os.fsencode(os.path.realpath(early))}] * 3
        with open_features(tmp_path / "out.h5.parts") as reader:  # a run's parts are readable while it goes on
            assert reader.sources == [record.source for record, _ in images]
            for record, features in images:
                np.testing.assert_array_equal(reader[record.source]["p2"], features["p2"])
        w.finalize()
    assert copies == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    offsets = _full_chunk_offsets(out)
    assert len(offsets) > 3 and not [at for at in offsets if at % 4096]
    _finished(whole, [0])  # merged at the end: an old output comes first, so nothing is begun early
    with writer(whole) as w:
        for k, (record, features) in enumerate(images[1:], 1):
            w.add(record, features)
            if k % 3 == 2:
                w.commit()
        w.finalize()
    assert contents(out) == contents(whole)


def test_a_closed_run_keeps_its_early_merge_until_the_next_run_keeps_the_bytes(tmp_path):
    """Closed without finalize, a run leaves its segments referring to the early merge: the parts folder reads
    and merges (bytes copied, never references); the next run keeps the bytes in the parts folder first."""
    out = tmp_path / "out.h5"
    early = tmp_path / "out.h5.merge.tmp"
    with writer(out) as w:
        w.add(*_big_image(1))
        add_images(w, range(2, 4))
        w.commit()
        add_images(w, range(4, 6))
    assert early.exists() and all(_data_files(segment) for segment in _segments_of(out))
    copied = merge_stores([tmp_path / "out.h5.parts"], tmp_path / "copied.h5")
    assert _data_files(copied) == set()
    outside = tmp_path / "elsewhere" / "seg-000001.h5"  # the same segment anywhere else is not trusted
    outside.parent.mkdir()
    shutil.copy(_segments_of(out)[0], outside)
    with open_features(outside) as reader, pytest.raises(StoreError, match="reads data from other files"):
        reader[0]
    with writer(out) as w:  # the bytes kept under another name (a hard link), the segments renamed to it
        kept = tmp_path / "out.h5.parts" / "data-000001.bin"
        assert not early.exists() and kept.exists()
        assert [_data_files(segment) for segment in _segments_of(out)] == [{os.fsencode(os.path.realpath(kept))}] * 2
        w.finalize()
    assert contents(out) == contents(copied)
    with open_features(out) as reader:
        assert len(reader) == 5
        np.testing.assert_array_equal(reader["big/1.jpg"]["p2"], _big_image(1)[1]["p2"])


def test_a_resumed_run_writes_at_once_and_copies_earlier_work_while_idle(tmp_path, monkeypatch):
    """The earlier run's blocks are numbered first but copied later: the first new block is opened before any
    byte of them is copied; the writer's spare time copies them a piece of any size at a time, finalize the
    rest."""
    out = tmp_path / "out.h5"
    with writer(out) as w:
        add_images(w, range(3))
        w.commit()
        add_images(w, range(3, 5))
    events: list[str] = []
    real_plan, real_copy = merge_module.plan_byte_copy, merge_module.copy_runs
    real_open = merge_module.MergedFile.open_block
    monkeypatch.setattr(merge_module, "plan_byte_copy", lambda *a: events.append("plan") or real_plan(*a))
    monkeypatch.setattr(merge_module, "copy_runs", lambda *a, **k: events.append("copy") or real_copy(*a, **k))
    monkeypatch.setattr(merge_module.MergedFile, "open_block", lambda self: events.append("open") or real_open(self))
    with writer(out) as w:
        assert not w.copy_earlier_work()  # nothing to copy before the first new block
        add_images(w, [5])
        assert events == ["open"]
        assert w.copy_earlier_work(budget_bytes=1)  # one level planned, one byte of it copied
        assert events == ["open", "plan", "copy"]
        pieces = 0
        while w.copy_earlier_work(budget_bytes=256):  # runs split anywhere, levels planned as they come
            pieces += 1
        earlier = sum(array.nbytes for k in range(5) for array in image(k)[1].values())
        assert pieces >= earlier // 256 - 1 and events.count("plan") == 2 * len(LEVELS)
        add_images(w, [6])
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(7))


def _resume_copy_part_then_hang(out: Path, ready) -> None:
    w = writer(out)
    add_images(w, [5])
    w.commit()  # refers to this run's early merge, which now also holds part of the earlier run's blocks
    assert w.copy_earlier_work(budget_bytes=1)
    ready.set()
    time.sleep(60)


def test_a_kill_while_earlier_work_is_copied_loses_nothing(tmp_path):
    out = tmp_path / "out.h5"
    with writer(out) as w:
        add_images(w, range(3))
        w.commit()
        add_images(w, range(3, 5))
    _kill_child(_resume_copy_part_then_hang, out)
    parts = tmp_path / "out.h5.parts"
    writer(out).finalize()  # the killed run's early merge kept too; the earlier bytes copied from where they are
    assert not parts.exists() and not (tmp_path / "out.h5.merge.tmp").exists()
    with open_features(out) as reader:
        expect_images(reader, range(6))


def test_a_moved_unfinished_run_resumes_where_it_is_now(tmp_path):
    """Segments name their data files by absolute path; a folder moved between two runs is found again."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    with writer(first / "out.h5") as w:
        add_images(w, range(3))
        w.commit()
        add_images(w, range(3, 5))
    with writer(first / "out.h5") as w:  # keeps that run's early merge as data-000001.bin, has its own
        add_images(w, range(5, 7))
    first.rename(second)
    out = second / "out.h5"
    with open_features(second / "out.h5.parts") as reader, pytest.raises(StoreError, match="folder moved"):
        reader[0]  # readers take the names as they are; the next run renames them
    with writer(out) as w:
        named = set().union(*map(_data_files, _segments_of(out)))
        assert named and all(os.fsdecode(name).startswith(os.path.realpath(second)) for name in named)
        assert sorted(p.name for p in (second / "out.h5.parts").glob("data-*")) == ["data-000001.bin",
                                                                                    "data-000003.bin"]
        add_images(w, [7])
        w.finalize()
    assert sorted(p.name for p in second.iterdir()) == ["out.h5"]
    with open_features(out) as reader:
        expect_images(reader, range(8))


def test_without_hard_links_the_bytes_are_copied_back_into_the_segments(tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    with writer(out) as w:
        w.add(*_big_image(1))
        add_images(w, range(2, 4))
    with open_features(tmp_path / "out.h5.parts") as reader:
        before = [reader[i] for i in range(len(reader))]

    def refused(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", refused)  # a file system without hard links
    writer(out).close()
    assert not (tmp_path / "out.h5.merge.tmp").exists() and not list((tmp_path / "out.h5.parts").glob("data-*"))
    assert [_data_files(segment) for segment in _segments_of(out)] == [set()]  # the segment holds its block
    with open_features(tmp_path / "out.h5.parts") as reader:
        for i, arrays in enumerate(before):
            for level in LEVELS:
                np.testing.assert_array_equal(reader[i][level], arrays[level])


def test_segments_whose_early_merge_is_gone_are_a_clear_error(tmp_path):
    out = tmp_path / "out.h5"
    with writer(out) as w:
        add_images(w, range(2))
    (tmp_path / "out.h5.merge.tmp").unlink()  # deleted by hand: the segments' bytes are gone
    with pytest.raises(StoreError) as caught:
        writer(out)
    message = str(caught.value)
    assert "seg-000001.h5 keeps its data in" in message and "out.h5.merge.tmp, which is missing" in message
    assert message.endswith("--overwrite starts anew") and "\n" not in message
    with writer(out, overwrite=True) as w:
        add_images(w, range(2))
        w.finalize()
    with open_features(out) as reader:
        expect_images(reader, range(2))


def test_a_new_compressed_output_is_merged_as_segments_are_committed(tmp_path, monkeypatch):
    """Compressed blocks cannot be written in place: finalize's copy begins at each commit (beside OUT.h5, never
    in the parts), so finalize itself copies only the segment it commits; the file is the one a merge at the end
    gives. Closing without finalize, or a kill, leaves no early merge behind once the next writer opened."""
    copies = _spy_on_byte_copies(monkeypatch)
    early = tmp_path / "out.h5.merge.tmp"
    whole = tmp_path / "whole.h5"
    with writer(whole, compression="lzf") as w:  # merged at the end: an old output comes first
        add_images(w, range(2))
        w.finalize()
    with writer(whole, compression="lzf") as w:
        add_images(w, range(2, 6))
        w.commit()
        assert not (tmp_path / "whole.h5.merge.tmp").exists()
        w.finalize()
    out = tmp_path / "out.h5"
    copies.clear()
    with writer(out, compression="lzf") as w:
        for k in range(6):
            w.add(*image(k))
            if k % 2:
                w.commit()
        assert early.exists() and len(copies) == 3 * len(LEVELS) and copies == [False] * len(copies)
        add_images(w, range(6, 8))  # reopened, resumed, committed and merged by finalize
    assert not early.exists()
    copies.clear()
    with writer(out, compression="lzf") as w:  # resumed: its first commit merges the 4 segments so far and its own
        add_images(w, [8])
        w.commit()
        assert len(copies) == 5 * len(LEVELS)
        add_images(w, [9])
        copies.clear()
        w.finalize()
    assert len(copies) == len(LEVELS)  # finalize copied only the segment it committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "whole.h5"]
    with writer(whole, compression="lzf") as w:
        add_images(w, range(6, 10))
        w.finalize()
    assert contents(out) == contents(whole)
    with open_features(out) as reader:
        expect_images(reader, range(10))


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_a_finalize_stopped_early_keeps_only_what_segments_refer_to(tmp_path, monkeypatch, compression):
    out = tmp_path / "out.h5"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(merge_module, "write_merged", interrupted)
        w = writer(out, compression=compression)
        add_images(w, range(3))
        w.commit()
        assert (tmp_path / "out.h5.merge.tmp").exists()
        with pytest.raises(KeyboardInterrupt):
            w.finalize()
    # uncompressed, the segments refer to the early merge's bytes: kept for the next run; otherwise deleted
    kept = ["out.h5.merge.tmp"] if compression == "none" else []
    assert sorted(p.name for p in tmp_path.iterdir()) == [*kept, "out.h5.parts"]
    with writer(out, compression=compression) as w:
        add_images(w, range(3, 5))
        w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with open_features(out) as reader:
        expect_images(reader, range(5))


def test_an_early_merge_left_by_a_kill_is_kept_in_the_parts_and_deleted_by_finalize(tmp_path):
    out = tmp_path / "out.h5"
    _kill_child(_write_then_hang, out, 4, 3)
    early = tmp_path / "out.h5.merge.tmp"
    assert _data_files(_segments_of(out)[0]) == {os.fsencode(os.path.realpath(early))}
    with writer(out) as w:
        kept = tmp_path / "out.h5.parts" / "data-000001.bin"
        assert not early.exists() and _data_files(_segments_of(out)[0]) == {os.fsencode(os.path.realpath(kept))}
        add_images(w, range(4, 8))
        w.close()  # closed this time: its own early merge is kept as well
    with writer(out) as w:
        assert sorted(p.name for p in (tmp_path / "out.h5.parts").glob("data-*")) == ["data-000001.bin",
                                                                                      "data-000002.bin"]
        w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with open_features(out) as reader:
        expect_images(reader, range(8))


def test_compressed_and_contiguous_blocks_are_merged_too(tmp_path, monkeypatch):
    copies = _spy_on_byte_copies(monkeypatch)
    compressed = _finished(tmp_path / "lzf.h5", range(3), compression="lzf")
    first, second = _finished(tmp_path / "first.h5", range(3)), _finished(tmp_path / "second.h5", range(3, 6))
    copies.clear()
    merge_stores([compressed], tmp_path / "lzf-merged.h5")
    assert copies == [False] * 3  # HDF5 moves compressed chunks as stored
    assert [layout[-1] for layout in _block_layouts(tmp_path / "lzf-merged.h5")] == ["lzf"] * 3
    with h5py.File(second, "r+") as f:  # another program's way of writing a block: HDF5's contiguous layout
        data = f["blocks/000001/p2"][...]
        del f["blocks/000001/p2"]
        f.create_dataset("blocks/000001/p2", data=data)
    copies.clear()
    merged = merge_stores([first, second], tmp_path / "merged.h5")
    assert copies == [True] * 6
    with h5py.File(merged, "r") as f:
        assert f["blocks/000002/p2"].chunks is None and f["blocks/000002/p3"].chunks is not None
    with open_features(merged) as reader:
        expect_images(reader, range(6))


def _finalize_beyond_size_limit(out: Path, result) -> None:
    """A real failed write during finalize's byte copies: the file size limit refuses it (EFBIG), as a full disk
    would."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    w = writer(out)
    for k in range(4):
        w.add(*_big_image(k))
    w.commit()
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))  # the output needs ~5 MB
    try:
        w.finalize()
        result.put("no error")
    except StoreError as error:
        result.put(str(error))


def test_a_failed_byte_copy_keeps_the_parts_and_says_so(tmp_path):
    out = tmp_path / "out.h5"
    child, _, message = _in_child(_finalize_beyond_size_limit, out)
    child.join(10)
    assert message == (f"cannot write {out}: File too large; the 4 images in {tmp_path / 'out.h5.parts'} are kept; "
                       "fix that and run the same command again")
    assert not out.exists() and not (tmp_path / "out.h5.tmp").exists()
    with writer(out) as w:
        assert w.stored_count == 4
        w.finalize()
    with open_features(out) as reader:
        for k in range(4):
            record, features = _big_image(k)
            np.testing.assert_array_equal(reader[record.source]["p2"], features["p2"])


def test_uncompressed_segments_hold_whole_chunks_written_as_they_are(tmp_path, monkeypatch):
    """Chunks go to the file without HDF5's chunk cache: each is stored at its full size, the last one included."""
    out = _finished(tmp_path / "out.h5", [100])  # an incremental run: its segments hold their blocks
    images = [_big_image(0), image(1), _big_image(2), image(3)]
    with writer(out) as w:
        with monkeypatch.context() as patched:
            real_setitem = h5py.Dataset.__setitem__

            def through_hdf5(dataset, *args):
                if dataset.name.startswith("/blocks/"):
                    raise AssertionError(f"{dataset.name} was written through HDF5's selection and chunk cache")
                return real_setitem(dataset, *args)

            patched.setattr(h5py.Dataset, "__setitem__", through_hdf5)
            for record, features in images:
                w.add(record, features)
            w.commit()
        with h5py.File(tmp_path / "out.h5.parts" / "seg-000001.h5", "r") as f:
            for level in LEVELS:
                dataset = f[f"blocks/000001/{level}"]
                total = sum(features[level].size for _, features in images)
                chunk = dataset.chunks[0]
                assert dataset.shape == (total,) and chunk == min(total, (1 << 20) // 4)
                infos = [dataset.id.get_chunk_info(j) for j in range(dataset.id.get_num_chunks())]
                assert len(infos) == -(-total // chunk) and {info.size for info in infos} == {chunk * 4}
        w.finalize()
    with open_features(out) as reader:
        for record, features in images:
            for level in LEVELS:
                np.testing.assert_array_equal(reader[record.source][level], features[level])
