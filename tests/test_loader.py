"""fpnx.loader: images handed over through shared memory, the host/device split of preprocessing, batch fill."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile_files as hostile
from fpnx.loader import Batches, ImageLoader, LoadedImage, LoadOptions, load_image
from fpnx.loader.slots import SharedSlots
from fpnx.preprocess import DETECTRON2, TORCHVISION, finish_on_device, padded_size, pixels_tensor, prepare_image
from fpnx.run.staging import HostStage
from fpnx.sources import ImageSource, decode_image

SPEC = TORCHVISION.replace(min_size=64, max_size=96)


def shared_blocks() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("fpnx-")} if os.path.isdir("/dev/shm") else set()


@pytest.fixture()
def photos(tmp_path) -> list[ImageSource]:
    sizes = [(48, 64), (60, 40), (33, 77), (48, 64), (100, 30), (64, 64)]
    sources = []
    for k, (height, width) in enumerate(sizes):
        path = hostile.photo(tmp_path / f"{k}.png", height, width, seed=k)
        sources.append(ImageSource(str(path), path.name))
    return sources


@pytest.mark.parametrize("spec", [SPEC, DETECTRON2.replace(min_size=64, max_size=96)], ids=["torchvision", "detectron2"])
def test_device_side_preprocessing_is_the_same_operations(photos, spec):
    """Workers that only decode (for a GPU) plus finish_on_device give bitwise what the CPU path gives."""
    for source in photos:
        finished = load_image(source, LoadOptions(spec))
        decoded_only = load_image(source, LoadOptions(spec, finish_here=False))
        assert decoded_only.pixels.dtype == np.uint8 and decoded_only.pixels.shape[2] == 3
        assert (decoded_only.input_height, decoded_only.input_width) == (finished.input_height, finished.input_width)
        done = finish_on_device(pixels_tensor(decoded_only.pixels), spec, (finished.input_height, finished.input_width))
        assert torch.equal(done, torch.from_numpy(finished.pixels))
        rgb = decode_image(source.path).rgb
        assert torch.equal(done, prepare_image(rgb, spec).tensor)


def test_images_come_through_shared_memory_equal_and_padded(photos):
    before = shared_blocks()
    loader = ImageLoader(photos, LoadOptions(SPEC), workers=2, prefetch=3, slots=8)
    seen = []
    for item in loader:
        reference = load_image(item.origin, LoadOptions(SPEC))
        assert item.slot is not None, "not handed over through a slot"
        assert np.array_equal(item.pixels, reference.pixels)
        height, width = padded_size(item.input_height, item.input_width, 32)
        assert item.padded.shape == (3, height, width)
        assert np.array_equal(item.padded[:, : item.input_height, : item.input_width], reference.pixels)
        assert not item.padded[:, item.input_height :].any() and not item.padded[:, :, item.input_width :].any()
        # channels last in memory, and a batch of one is the slot itself in the layout the CPU network runs
        assert item.padded.transpose(1, 2, 0).flags.c_contiguous
        batch = HostStage(loader, 32, torch.device("cpu")).inputs([item])
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert batch.data_ptr() == item.padded.__array_interface__["data"][0]
        seen.append(item.origin.source)
        loader.release(item)
    assert seen == [source.source for source in photos]
    assert shared_blocks() <= before, "the shared memory block outlived the loader"
    workers = [process.pid for process in multiprocessing.active_children()]
    assert workers  # they began to leave with the last image...
    loader.close()  # ...and close() waits until they are gone
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def test_tasks_of_several_images_come_back_in_order_through_their_slots(photos):
    images = photos * 2 + photos[:1]  # 13 images: the last task holds one
    loader = ImageLoader(images, LoadOptions(SPEC), workers=2, prefetch=8, slots=16, per_task=4)
    seen = []
    for item in loader:
        assert item.slot is not None
        assert np.array_equal(item.pixels, load_image(item.origin, LoadOptions(SPEC)).pixels)
        seen.append(item.origin.source)
        loader.release(item)
    loader.close()
    assert seen == [source.source for source in images]


def test_a_crash_inside_a_task_of_several_images_costs_one_image(tmp_path):
    names = ["a.png", "b.png", "c.png", "crash.png", "e.png", "f.png", "g.png"]
    sources = [ImageSource(str(hostile.photo(tmp_path / name, seed=k)), name) for k, name in enumerate(names)]
    loader = ImageLoader(sources, LoadOptions(SPEC), workers=2, prefetch=6, slots=8, per_task=3,
                         load=hostile.load_or_get_killed)
    loaded = list(loader)
    loader.close()
    assert [item.origin.source for item in loaded] == names  # in order, each once
    assert [item.ok for item in loaded] == [True, True, True, False, True, True, True]
    assert "crashed" in loaded[3].error and loader.crashes == 1
    for item in loaded:
        if item.ok:
            assert np.array_equal(item.pixels, load_image(item.origin, LoadOptions(SPEC)).pixels)


def test_the_first_pool_starts_every_worker_before_the_first_task(tmp_path):
    """A worker still starting when decoding begins takes a core from those decoding: the loader waits until each
    worker has answered a ping, even one that starts late, and pings held by the first do not count twice."""
    from concurrent.futures import ProcessPoolExecutor

    from fpnx.loader.pool import _ping, _wait_for_every_worker

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context, initializer=hostile.start_slowly_unless_first,
                             initargs=(str(tmp_path / "first"),)) as pool:
        pings = [pool.submit(_ping) for _ in range(2)]
        started = {pings[0].result(timeout=120)}
        _wait_for_every_worker(pool, 2, started, pings[1:])
        assert started == set(pool._processes)


def test_close_waits_for_the_executors_own_thread(photos):
    """A process pool's thread still running when Python exits can race its exit handler (a traceback on stderr
    after the run's last line, seen once in 26 interrupted runs): close() leaves none running."""
    from concurrent.futures.process import _ExecutorManagerThread

    def executor_threads() -> set:
        return {thread for thread in threading.enumerate() if isinstance(thread, _ExecutorManagerThread)}

    earlier = executor_threads()
    loader = ImageLoader(photos, LoadOptions(SPEC), workers=2, slots=4)
    assert all(item.ok for item in loader)
    loader.close()
    assert executor_threads() <= earlier


def test_no_more_workers_start_than_there_are_tasks(photos):
    earlier = {process.pid for process in multiprocessing.active_children()}
    loader = ImageLoader(photos[:3], LoadOptions(SPEC), workers=2, slots=4, per_task=8)
    items = iter(loader)
    assert next(items).ok
    assert len({process.pid for process in multiprocessing.active_children()} - earlier) == 1
    assert all(item.ok for item in items)
    loader.close()


def test_ctrl_c_while_the_workers_start_leaves_no_worker_behind(photos, monkeypatch):
    import fpnx.loader.pool as pool_module

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pool_module, "_wait_for_every_worker", interrupted)
    earlier = {process.pid for process in multiprocessing.active_children()}
    loader = ImageLoader(photos, LoadOptions(SPEC), workers=2, slots=4)
    with pytest.raises(KeyboardInterrupt):
        next(iter(loader))
    workers = {process.pid for process in multiprocessing.active_children()} - earlier
    assert len(workers) == 2
    loader.close()
    for pid in workers:  # gone (the executor's own thread may have reaped it: no exit status to read here)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_decoder_that_never_returns_costs_one_image(tmp_path):
    """A worker stuck in a decoder is stopped after ``timeout_s`` per image of its task; the images in flight are
    tried again one at a time, so only the culprit fails, with a reason, and the run goes on in order."""
    names = ["a.png", "b.png", "hang.png", "d.png", "e.png", "f.png", "g.png"]
    sources = [ImageSource(str(hostile.photo(tmp_path / name, seed=k)), name) for k, name in enumerate(names)]
    loader = ImageLoader(sources, LoadOptions(SPEC), workers=2, prefetch=6, slots=8, per_task=2,
                         load=hostile.load_or_hang, timeout_s=1.5)
    started, others = time.monotonic(), set(multiprocessing.active_children())
    loaded = list(loader)
    loader.close()
    assert [item.origin.source for item in loaded] == names  # in order, each once
    assert [item.ok for item in loaded] == [True, True, False, True, True, True, True]
    assert loaded[2].error == "decoding took longer than 1.5 s (its worker was stopped)"
    assert (loader.timeouts, loader.crashes) == (1, 0)
    assert time.monotonic() - started < 60  # two pool restarts and 1.5 s waits, not a hang
    # the stuck worker was killed, not left behind: every worker of this loader has ended (its sentinel is ready;
    # is_alive() may say otherwise for a moment or for good, as the executor's own thread reaps some of them)
    ours = set(multiprocessing.active_children()) - others
    assert not [process for process in ours if not multiprocessing.connection.wait([process.sentinel], timeout=10)]
    for item in loaded:
        if item.ok:
            assert np.array_equal(item.pixels, load_image(item.origin, LoadOptions(SPEC)).pixels)


@pytest.mark.parametrize(("given", "used"), [(None, None), (0, None), (7.5, 7.5)])
def test_extract_gives_its_decode_timeout_to_the_loader(given, used):
    from fpnx.options import ExtractOptions
    from fpnx.run.pipeline import _loader

    loader = _loader([], SPEC, ExtractOptions(decode_timeout_s=given, workers=1), torch.device("cpu"))
    assert loader.timeout_s == used


def test_workers_leave_without_the_interpreters_teardown(photos, tmp_path):
    """A worker told to stop exits at once (the teardown of an interpreter holding torch takes ~0.5 s), after
    every result was sent."""
    loader = ImageLoader(photos, LoadOptions(SPEC), workers=2, prefetch=4,
                         load=hostile.load_and_keep_a_teardown_marker)
    assert [item.origin.source for item in loader] == [source.source for source in photos]
    loader.close()
    assert not (tmp_path / "teardown-ran").exists()


def test_workers_that_only_decode_never_import_torch(photos):
    """A GPU run's workers (decode only) start without torch: seconds of CPU and ~500 MB of memory less each; those
    that resize on the CPU import it once, when they start."""
    for finish_here, expected in ((False, {None}), (True, {"torch is imported in this worker"})):
        loader = ImageLoader(photos, LoadOptions(SPEC, finish_here=finish_here), workers=1,
                             load=hostile.load_unless_torch_is_imported)
        assert {item.error for item in loader} == expected, finish_here
        loader.close()


def test_a_consumer_that_keeps_every_image_never_blocks_the_loader(photos):
    """Slots only speed things up: with too few of them (or none released), images travel pickled."""
    loader = ImageLoader(photos * 3, LoadOptions(SPEC), workers=2, prefetch=4, slots=2)
    kept = list(loader)
    assert len(kept) == 18 and sum(item.slot is not None for item in kept) == 2
    for item in kept:
        assert np.array_equal(item.pixels, load_image(item.origin, LoadOptions(SPEC)).pixels)


def test_an_image_too_large_for_a_slot_travels_pickled(tmp_path):
    path = hostile.photo(tmp_path / "big.png", 300, 400)
    spec = SPEC.replace(min_size=300, max_size=400)
    slots = SharedSlots(1, 1000)  # far too small
    try:
        slot = slots.take()
        from fpnx.loader.slots import write_into_slot

        item = write_into_slot(load_image(ImageSource(str(path), "big.png"), LoadOptions(spec)), slot, 32)
        assert item.slot is None and item.pixels.shape == (3, 300, 400)
    finally:
        slots.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_blocks_of_owners_that_no_longer_exist_are_removed_by_the_next_owner(tmp_path):
    """A kill of a whole process group takes Python's resource tracker too: the next run frees the block."""
    from fpnx.loader.slots import remove_stale_blocks

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = SharedSlots(1, 4096)
    namespace = live._memory.name.split("-")[1]
    dead, other_namespace = f"fpnx-{namespace}-{gone.pid}-0badc0de", f"fpnx-1-{gone.pid}-0badc0de"
    kept = {other_namespace, f"psm-{gone.pid}-0badc0de", live._memory.name}  # not ours to judge, or alive
    try:
        for name in (dead, *kept - {live._memory.name}):
            (Path("/dev/shm") / name).write_bytes(b"x")
        assert remove_stale_blocks() == [dead]
        assert kept <= set(os.listdir("/dev/shm"))
        (Path("/dev/shm") / dead).write_bytes(b"x")
        SharedSlots(1, 4096).close()  # a new block: the stale ones go first
        assert dead not in os.listdir("/dev/shm") and kept <= set(os.listdir("/dev/shm"))
    finally:
        live.close()
        for name in (dead, *kept - {live._memory.name}):
            (Path("/dev/shm") / name).unlink(missing_ok=True)


def fake(height: int, width: int, k: int) -> LoadedImage:
    return LoadedImage(ImageSource(f"{k}.jpg", f"{k}.jpg"), pixels=np.zeros(1), input_height=height,
                       input_width=width)


def test_batches_fill_on_a_coco_like_mix_of_sizes():
    """Resized input sizes of COCO's common shapes at 800/1333 (640x480, 480x640, 640x427, 427x640, 612x612,
    500x375...), drawn with their rough frequencies: the window lets each padded size fill its batches."""
    rng = np.random.default_rng(0)
    shapes = [(800, 1066), (1066, 800), (800, 1199), (1199, 800), (800, 800), (800, 1200), (800, 1333), (1000, 800)]
    weights = np.array([0.45, 0.12, 0.15, 0.06, 0.04, 0.08, 0.05, 0.05])
    picks = rng.choice(len(shapes), size=2000, p=weights / weights.sum())
    failed = []
    batches = Batches((fake(*shapes[k], i) for i, k in enumerate(picks)), 16, 32, failed.append)
    out = list(batches)
    assert sum(len(batch) for batch in out) == 2000 and not failed
    for batch in out:
        assert len({padded_size(item.input_height, item.input_width, 32) for item in batch}) == 1
    assert batches.fill > 0.95, batches.fill
    narrow = Batches((fake(*shapes[k], i) for i, k in enumerate(picks)), 16, 32, failed.append, window=16)
    list(narrow)
    assert narrow.fill < batches.fill  # the old window of one batch fills worse
