"""The CUDA stage's bookkeeping on the CPU: CUDA's streams, events and pinned memory replaced by stand-ins.

What a GPU adds (asynchrony, streams) is tested in test_cuda.py on a GPU; here the rest of that path runs in CI:
workers that only decode, uint8 pixels through the staging ring, preprocessing finished by the stage, crops and
pooled vectors copied into the bounded pool of output buffers, and the writer handing them back.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import fpnx
import hostile_files as hostile
from fpnx.loader import slots
from fpnx.run import pipeline
from fpnx.run.staging import CudaStage

SIZES = {"min_size": 64, "max_size": 96}


class StandInStream:
    def wait_stream(self, other: "StandInStream") -> None:
        pass

    def wait_event(self, event: "StandInEvent") -> None:
        assert event.recorded, "waiting for an event never recorded"


class StandInEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.recorded = False

    def record(self, stream: StandInStream | None = None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.recorded, "synchronizing with an event never recorded"


@pytest.fixture()
def cuda_stage_on_the_cpu(monkeypatch):
    """Returns a function that switches extract to the CUDA stage on the CPU, and the list of pinned buffers."""
    pinned: list[torch.Tensor] = []

    def switch() -> None:
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: StandInStream())
        monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: StandInStream())
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
        real_empty = torch.empty

        def empty(*args, pin_memory: bool = False, **kwargs):
            tensor = real_empty(*args, **kwargs)
            if pin_memory:
                pinned.append(tensor)
            return tensor

        monkeypatch.setattr(torch, "empty", empty)
        real_loader, real_stage = pipeline._loader, pipeline.ExtractRun._stage
        # workers that only decode, as for a GPU
        monkeypatch.setattr(pipeline, "_loader",
                            lambda todo, spec, options, device: real_loader(todo, spec, options, torch.device("cuda")))

        def stage(run, loader):
            cpu, run.device = run.device, torch.device("cuda")
            try:
                chosen = real_stage(run, loader)
            finally:
                run.device = cpu
            assert isinstance(chosen, CudaStage)
            chosen.device = cpu
            return chosen

        monkeypatch.setattr(pipeline.ExtractRun, "_stage", stage)

    return switch, pinned


def read_all(path) -> dict:
    with fpnx.open_features(path) as reader:
        stored = {source: {level: array.copy() for level, array in reader[source].items()} for source in reader.sources}
        infos = [reader.info(i) for i in range(len(reader))]
        pooled = {level: reader.pooled(level).copy() for level in reader.levels} if reader.pool else {}
    return {"maps": stored, "infos": infos, "pooled": pooled}


@pytest.mark.parametrize("dtype,pool", [("float16", None), ("float32", "max")])
def test_the_cuda_stage_stores_exactly_what_the_cpu_stage_stores(tmp_path, cuda_stage_on_the_cpu, dtype, pool):
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(48, 64), (64, 48), (48, 64), (30, 90), (48, 64), (90, 30), (64, 64)]
    for k, (height, width) in enumerate(sizes):
        hostile.photo(images / f"{k}.png", height, width, seed=k)
    hostile.photo(images / "tall.jpg", 60, 40, seed=9, orientation=6)  # EXIF-rotated: stored upright either way
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    model = fpnx.build_model("random")
    options = dict(model=model, device="cpu", dtype=dtype, pool=pool, batch_size=2, workers=1, **SIZES)
    reference = fpnx.extract([images], tmp_path / "cpu.h5", **options)
    switch, pinned = cuda_stage_on_the_cpu
    switch()
    staged = fpnx.extract([images], tmp_path / "staged.h5", **options)
    assert (staged.images_stored, len(staged.failures)) == (reference.images_stored, len(reference.failures)) == (8, 1)
    assert staged.mean_batch_fill == reference.mean_batch_fill
    # bitwise: the stage preprocesses with the workers' operations, and the batches are the same
    expected, got = read_all(tmp_path / "cpu.h5"), read_all(tmp_path / "staged.h5")
    assert got["infos"] == expected["infos"]
    for source, levels in expected["maps"].items():
        for level, array in levels.items():
            assert np.array_equal(got["maps"][source][level], array), (source, level)
    for level, vectors in expected["pooled"].items():
        assert np.array_equal(got["pooled"][level], vectors)
    # the staging ring (4 buffers) plus a pool of output buffers allocated as the writer needs them
    outputs = len(pinned) - 4
    assert 0 < outputs <= staged.images_stored


def test_images_larger_than_the_staging_buffers_grow_them(tmp_path, cuda_stage_on_the_cpu, monkeypatch):
    """Photos beyond the slots and the pinned ring (12 MP at most there, by default) go through a ring buffer grown
    to them, never an ordinary copy that would wait for the GPU; features as on the CPU."""
    monkeypatch.setattr(slots, "DEVICE_SLOT_PIXELS", 40 * 40)
    images = tmp_path / "images"
    images.mkdir()
    for k, (height, width) in enumerate([(48, 64), (30, 30), (64, 64), (48, 64)]):
        hostile.photo(images / f"{k}.png", height, width, seed=k)
    options = dict(model=fpnx.build_model("random"), device="cpu", batch_size=2, workers=1, **SIZES)
    fpnx.extract([images], tmp_path / "cpu.h5", **options)
    switch, pinned = cuda_stage_on_the_cpu
    switch()
    fpnx.extract([images], tmp_path / "staged.h5", **options)
    expected, got = read_all(tmp_path / "cpu.h5"), read_all(tmp_path / "staged.h5")
    assert got["infos"] == expected["infos"]
    for source, levels in expected["maps"].items():
        for level, array in levels.items():
            assert np.array_equal(got["maps"][source][level], array), (source, level)
    staging = [tensor.numel() for tensor in pinned if tensor.dtype == torch.uint8 and tensor.dim() == 1]
    assert staging[:4] == [3 * 40 * 40] * 4 and 3 * 64 * 64 in staging[4:]  # the ring, then the grown buffer
