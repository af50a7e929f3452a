"""Reading features back: a reader that travels (pickle, fork, DataLoader workers under every start method),
FeatureDataset and collate_features, and direct reads that equal HDF5's own for every kind of file."""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

import fpnx
from fpnx.errors import StoreError, UsageError
from fpnx.store import FeatureWriter, ImageRecord, open_features
from fpnx.store.chunks import ChunkTable, chunk_addresses

LEVELS = ["p2", "p3", "p6"]
CHANNELS = {"p2": 3, "p3": 4, "p6": 2}
STRIDES = {"p2": 4, "p3": 8, "p6": 64}
SIZES = [(37, 50), (64, 64), (5, 129), (1, 1), (100, 33), (70, 71)]
METADATA = {"weights": {"name": "tiny", "framework": "torchvision"}, "preprocessing": {"resize": "torchvision"}}
START_METHODS = ["fork", "spawn", "forkserver"]


def features(k: int, dtype: str = "float32", channels=CHANNELS, sizes=SIZES) -> tuple[ImageRecord, dict]:
    height, width = sizes[k % len(sizes)]
    rng = np.random.default_rng(k)
    arrays = {
        level: rng.standard_normal((channels[level], math.ceil(height / s), math.ceil(width / s))).astype(dtype)
        for level, s in STRIDES.items()
    }
    return ImageRecord(f"img/{k:03d}.jpg", 2 * height, 2 * width + 1, height, width, 2.0), arrays


def write(path: Path, count: int, *, finalize=True, commit_every=0, channels=CHANNELS, sizes=SIZES, **options) -> Path:
    """``count`` images; with ``commit_every``, a segment per that many images (several blocks)."""
    w = FeatureWriter(path, settings={"t": 1}, metadata=METADATA, levels=LEVELS, channels=channels, strides=STRIDES,
                      commit_every_s=3600.0, commit_every_bytes=1 << 40, **options)
    for k in range(count):
        w.add(*features(k, options.get("dtype", "float32"), channels, sizes))
        if commit_every and (k + 1) % commit_every == 0:
            w.commit()
    if finalize:
        w.finalize()
    else:
        w.close()
    return path


def assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for level in expected:
        np.testing.assert_array_equal(np.asarray(got[level]), np.asarray(expected[level]))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("small") / "f.h5", 6, commit_every=4)


# -- a reader that travels -------------------------------------------------------------------------------------


def test_reader_pickles_as_its_path_and_reopens_lazily(small):
    with open_features(small) as reader:
        expected = [reader[i] for i in range(len(reader))]
        data = pickle.dumps(reader)
    assert b"img/000.jpg" not in data and len(data) < 4096  # no index, no arrays: the path and identities
    copy = pickle.loads(data)
    assert copy._handles is None and copy._index is None  # nothing opened until used
    assert len(copy) == 6 and copy.sources[2] == "img/002.jpg" and copy.levels == LEVELS
    for i, arrays in enumerate(expected):
        assert_same(copy[i], arrays)
    assert copy.info(5) == {"source": "img/005.jpg", "height": 140, "width": 143, "input_height": 70,
                            "input_width": 71, "scale": 2.0}
    copy.close()


def test_a_replaced_file_is_refused(tmp_path):
    path = write(tmp_path / "f.h5", 3)
    data = pickle.dumps(open_features(path))
    replacement = write(tmp_path / "other.h5", 3)
    os.replace(replacement, path)
    with pytest.raises(StoreError, match=r"f\.h5 was replaced or removed since it was opened; open it again"):
        pickle.loads(data)[0]
    path.unlink()
    with pytest.raises(StoreError, match="replaced or removed"):
        len(pickle.loads(data))


def test_a_reader_opened_by_a_relative_path_survives_a_change_of_folder(small, monkeypatch):
    monkeypatch.chdir(small.parent)
    reader = open_features(small.name)
    expected = reader[1]
    travelled = pickle.dumps(reader)
    reader.close()
    monkeypatch.chdir(small.parent.parent)  # as Hydra does; DataLoader workers unpickle the reader there
    assert_same(reader[1], expected)
    assert_same(pickle.loads(travelled)[1], expected)
    assert str(reader.path) == small.name  # messages keep the path as given


def test_a_reader_and_plain_h5py_share_a_file_in_one_process(small):
    with open_features(small) as reader:  # then the user's own h5py.File, as docs/format.md shows
        expected = reader[0]
        with h5py.File(small, "r") as h5:
            assert h5.attrs["format"] == reader.attrs["format"]
    for options in ({}, {"locking": False}, {"locking": True}):  # the other way round, any locking setting
        with h5py.File(small, "r", **options) as h5, open_features(small) as reader:
            assert_same(reader[0], expected)
            assert len(h5["images"]["source"]) == len(reader)


def _child_reads(reader, inherited, queue) -> None:
    arrays = reader[4]
    queue.put({
        "arrays": {level: array.tolist() for level, array in arrays.items()},
        "handles_pid": reader._handles.pid,
        "inherited_closed": all(not store.h5.id.valid for store in inherited),
    })


def test_a_forked_child_opens_its_own_handles(small):
    reader = open_features(small)
    expected = reader[4]
    inherited = list(reader._handles._files.values())
    assert inherited and all(store.h5.id.valid for store in inherited)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(reader, inherited, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert result["handles_pid"] == child.pid and result["inherited_closed"]
    assert_same({k: np.array(v, np.float32) for k, v in result["arrays"].items()}, expected)
    assert all(store.h5.id.valid for store in inherited)  # the parent's are untouched
    assert_same(reader[4], expected)
    reader.close()


# -- DataLoader workers under every start method ---------------------------------------------------------------


class ReaderDataset(Dataset):
    """What a user writes: a reader opened in __init__, numpy arrays out."""

    def __init__(self, path: Path) -> None:
        self.reader = fpnx.open_features(path)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        arrays = self.reader[i]
        return {"pid": os.getpid(), "handles_pid": self.reader._handles.pid, **arrays}


@pytest.mark.parametrize("method", START_METHODS)
def test_dataloader_workers(small, method):
    """Two workers read a FeatureDataset and a hand-written dataset (one DataLoader over both: a worker start
    costs seconds under spawn); every item equals a single-process read, read with the worker's own handles."""
    features, handwritten = fpnx.FeatureDataset(small), ReaderDataset(small)
    expected = [features[i] for i in range(len(features))] + [handwritten[i] for i in range(len(handwritten))]
    both = ConcatDataset([features, handwritten])
    loader = DataLoader(both, batch_size=2, shuffle=False, num_workers=2,
                        multiprocessing_context=multiprocessing.get_context(method), collate_fn=list)
    seen = [item for batch in loader for item in batch]
    assert len(seen) == len(expected) == 12
    for got, want in zip(seen[:6], expected[:6]):
        assert got["source"] == want["source"] and got["info"] == want["info"]
        for level in LEVELS:
            assert torch.equal(got[level], want[level])
    for got, want in zip(seen[6:], expected[6:]):
        assert got["pid"] != os.getpid() and got["handles_pid"] == got["pid"]  # each worker's own handles
        assert_same({level: got[level] for level in LEVELS}, {level: want[level] for level in LEVELS})


# -- FeatureDataset and collate_features -----------------------------------------------------------------------


def test_dataset_items_and_collate(tmp_path):
    path = write(tmp_path / "f.h5", 4, dtype="float16")
    dataset = fpnx.FeatureDataset(path, levels=["p3", "p2"])
    item = dataset[1]
    assert list(item) == ["source", "info", "p3", "p2"]
    assert item["source"] == "img/001.jpg"
    assert item["info"] == {"height": 128, "width": 129, "input_height": 64, "input_width": 64, "scale": 2.0}
    assert item["p2"].dtype == torch.float32 and item["p2"].shape == (3, 16, 16)
    assert torch.equal(item["p2"], torch.from_numpy(features(1, "float16")[1]["p2"]).float())
    assert fpnx.FeatureDataset(path, dtype=None)[0]["p6"].dtype == torch.float16

    batch = fpnx.collate_features([dataset[i] for i in range(3)])  # 37x50, 64x64, 5x129 inputs
    assert batch["source"] == ["img/000.jpg", "img/001.jpg", "img/002.jpg"]
    assert batch["info"]["input_height"].tolist() == [37, 64, 5] and batch["info"]["scale"].dtype == torch.float64
    assert batch["p2"].shape == (3, 3, 16, 33) and batch["p3"].shape == (3, 4, 8, 17)
    assert batch["sizes"]["p2"].tolist() == [[10, 13], [16, 16], [2, 33]]
    for b in range(3):
        h, w = batch["sizes"]["p2"][b].tolist()
        assert torch.equal(batch["p2"][b, :, :h, :w], dataset[b]["p2"])
        assert batch["masks"]["p2"][b].sum() == h * w and batch["masks"]["p2"][b, :h, :w].all()
        assert not batch["p2"][b][:, ~batch["masks"]["p2"][b]].any()  # zeros outside
    with pytest.raises(UsageError, match="stores no level 'p4'"):
        fpnx.FeatureDataset(path, levels=["p4"])
    with pytest.raises(UsageError, match="needs at least one item"):
        fpnx.collate_features([])
    with pytest.raises(UsageError, match="different levels"):
        fpnx.collate_features([dataset[0], fpnx.FeatureDataset(path)[1]])


# -- direct reads equal HDF5's, whatever the file ---------------------------------------------------------------


def _with_userblock(source: Path, target: Path) -> Path:
    with h5py.File(source, "r") as src, h5py.File(target, "w", userblock_size=512, libver=("v108", "v108")) as dst:
        for name in src:
            src.copy(src[name], dst, name)
        dst.attrs.update(src.attrs)
    return target


def _with_contiguous_block(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        data = f["blocks/000001/p2"][...]
        del f["blocks/000001/p2"]
        f.create_dataset("blocks/000001/p2", data=data)  # no chunks: HDF5's contiguous layout
    return target


BIG_CHANNELS = {"p2": 64, "p3": 64, "p6": 2}  # p2 spans ~5 chunks of 1 MiB per block, shared by images
BIG_SIZES = [(300, 200), (200, 333), (150, 150)]


def _parts_holding_their_blocks(path: Path) -> Path:
    """The parts of an incremental run (an output exists already): segments that hold their own blocks."""
    write(path, 0, channels=BIG_CHANNELS)
    write(path, 7, commit_every=5, finalize=False, channels=BIG_CHANNELS, sizes=BIG_SIZES)
    return path.with_name(path.name + ".parts")


@pytest.mark.parametrize("kind", ["finished", "parts", "referring parts", "lzf", "userblock", "contiguous"])
def test_direct_reads_equal_hdf5(tmp_path, kind):
    base = write(tmp_path / "base.h5", 7, commit_every=5, finalize="parts" not in kind, channels=BIG_CHANNELS,
                 sizes=BIG_SIZES, compression="lzf" if kind == "lzf" else "none")
    path = {"parts": lambda: _parts_holding_their_blocks(tmp_path / "incremental.h5"),
            "referring parts": lambda: tmp_path / "base.h5.parts",  # blocks in the run's early merge
            "userblock": lambda: _with_userblock(base, tmp_path / "userblock.h5"),
            "contiguous": lambda: _with_contiguous_block(base, tmp_path / "contiguous.h5")}.get(kind, lambda: base)()
    with open_features(path) as reader:
        for i in range(len(reader)):
            assert_same(reader[i], features(i, channels=BIG_CHANNELS, sizes=BIG_SIZES)[1])
        tables = reader._handles._tables
        if kind in ("lzf", "userblock", "referring parts"):
            assert not tables  # HDF5 reads these
        else:
            assert len(tables) == 6  # two blocks of three levels, all read directly
        if kind == "finished":  # chunks of the levels interleave as written: copies go chunk run by chunk run
            assert any(not table.consecutive for table in tables.values())
        if kind == "contiguous":
            assert tables[(0, 1, "p2")].chunk == tables[(0, 1, "p2")].length


def test_chunk_runs_are_copied_in_order():
    """A table whose chunks lie out of order: every range reads the right elements."""
    chunk, item = 4, 4
    order = [2, 0, 3, 1, 4]  # chunk j lies at slot order[j]; chunks 3 and 4 are consecutive in the file
    values = np.arange(chunk * len(order), dtype=np.float32)
    data = np.zeros(chunk * len(order) * item + 3, np.uint8)  # 3 bytes of header: unaligned addresses
    for j, slot in enumerate(order):
        data[3 + slot * chunk * item : 3 + (slot + 1) * chunk * item] = values[j * chunk : (j + 1) * chunk].view(np.uint8)
    addresses = np.array([3 + slot * chunk * item for slot in order], np.int64)
    table = ChunkTable(len(values), chunk, item, addresses, consecutive=False)
    for start in range(len(values)):
        for stop in range(start + 1, len(values) + 1):
            out = np.empty(stop - start, np.float32)
            table.copy_into(data, start, out)
            np.testing.assert_array_equal(out, values[start:stop])


def test_chunk_addresses_without_chunk_iter(tmp_path):
    """HDF5 before 1.12.3 has no chunk_iter: the table comes from one get_chunk_info call per chunk, the same."""
    path = write(tmp_path / "f.h5", 7, channels=BIG_CHANNELS, sizes=BIG_SIZES)
    with h5py.File(path, "r") as f:
        dataset = f["blocks/000001/p2"]

        class OldHDF5:  # the DatasetID of an older HDF5: no chunk_iter
            def get_num_chunks(self):
                return dataset.id.get_num_chunks()

            def get_chunk_info(self, index):
                return dataset.id.get_chunk_info(index)

        chunk = dataset.chunks[0]
        count = -(-dataset.shape[0] // chunk)
        old = chunk_addresses(OldHDF5(), chunk, chunk * 4, count)
        new = chunk_addresses(dataset.id, chunk, chunk * 4, count)
        assert count > 3 and old is not None and np.array_equal(old, new)
        assert chunk_addresses(object(), chunk, chunk * 4, count) is None  # HDF5 before 1.10.5: HDF5 reads
