"""The host side of ``fpnx.extract`` alone: everything but the network, against the limits of this machine.

    python benchmarks/host_pipeline.py --images 96 --small-images 2000 --repeat 3

Rates run from the first stored image to the end of the run (finalize included, start-up not); the page cache
is written back and dropped before each measurement where allowed (root).
The network is replaced by a stub (a real fpnx model, passed through the public ``model=`` argument, whose
forward returns preallocated outputs of the right shapes and memory layout at once), so what is timed is
decoding, resizing, batching, cropping, casting and writing. Each configuration (float16 P2-P6: dense output,
disk-bound; float16 P5-P6: small output, CPU-bound) is compared with limits measured in the same run, on the same
files and disk:

- one-core JPEG decode rate and one-core resize rate (the torchvision rule, 640x480 -> 800x1066, as fpnx runs
  it), and from them the CPU limit of decode+resize on all cores: ``cores / (decode s + resize s per image)``;
  also the same limit with torchvision's own preprocessing (``GeneralizedRCNNTransform``) in place of fpnx's.
  They are measured at the start, after the loader alone and after each extract, and the fastest of these is
  the limit: a slow moment of a shared machine must not raise the ratios;
- decode+resize run on every core at once (one process per core, each over its share of the run's files, no
  pipeline around it), measured right before and right after each extract; the mean of the two is the measured
  CPU limit. This is the reference that needs no assumption: on a shared VM two cores busy at once do not each
  run at the one-core rate (two at once gave from 0.66 to 1.2 times twice one, minutes apart), so the limit
  extrapolated from one core is reported beside it, not instead;
- raw sequential write + fsync of the same bytes (``numpy.tofile``) in the output's folder, measured before and
  after each extract (page-cache state moves it a lot on a shared VM; the mean of the two is the reference);
- the run's own loader alone (same workers, tasks and shared-memory slots, consumed by a loop that does nothing
  else) against decode+resize on every core at once, measured right before and right after it: the ceiling that
  the rest of the run (crops, writes, finalize) can only lower;
- what feeds a GPU: the loader a CUDA run builds (workers only decode; no GPU is needed to build it) against
  decoding alone on every core at once, measured the same way.

The reference processes run as fpnx's workers do: one thread each, with the workers' allocator settings.

Besides the rate to the end of the run, each result gives the rate before finalize (what finalize does is part
of the cost of each image, not a fixed cost), and how many bytes the run sent to the disk per byte of the
output file (``/proc/self/io``): 1.0 means each byte was written once, 2.0 that it was also copied.

Ratios are the result; absolute rates on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fpnx
from fpnx.models import FeaturePyramid
from fpnx.preprocess import padded_size, prepare_image, resized_size

try:  # also runs against older fpnx checkouts, for before/after figures
    from fpnx.models.weights import random_weights
    from fpnx.sources import decode_image
except ImportError:
    from fpnx.images import decode_image
    from fpnx.weights import random_weights
try:
    from fpnx.store.files import WRITEBACK_EVERY, start_writeback
except ImportError:
    WRITEBACK_EVERY, start_writeback = None, None


def map_size(height: int, width: int, stride: int) -> tuple[int, int]:
    return math.ceil(height / stride), math.ceil(width / stride)

CONFIGS = {"dense": ("p2", "p3", "p4", "p5", "p6"), "small": ("p5", "p6")}


class StubPyramid(FeaturePyramid):
    """An fpnx model whose forward returns preallocated outputs of the right shapes: the network costs nothing."""

    def __init__(self) -> None:
        super().__init__(random_weights())
        self.eval().requires_grad_(False)
        self._outputs: dict[tuple, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (x.shape[0], x.shape[2], x.shape[3], x.device)
        if key not in self._outputs:
            generator = torch.Generator().manual_seed(0)
            # in the memory layout the real network gives: channels_last once extract has optimized the model
            layout = torch.channels_last if self._channels_last() else torch.contiguous_format
            self._outputs[key] = {
                name: torch.randn(x.shape[0], info.channels, *map_size(x.shape[2], x.shape[3], info.stride),
                                  generator=generator).to(x.device).contiguous(memory_format=layout)
                for name, info in self.output_shape().items()
            }
        return self._outputs[key]

    def _channels_last(self) -> bool:
        weight = next(parameter for parameter in self.parameters() if parameter.dim() == 4)
        return not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def make_jpegs(folder: Path, count: int) -> list[Path]:
    """640x480 JPEGs of smooth random content (quality 90), distinct per file."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for index in range(count):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        pixels = np.stack([np.sin(rows * a + cols * b), np.cos(cols * c), np.sin((rows + cols) * a * b * 40)], -1)
        noise = rng.normal(0, 0.08, pixels.shape)
        image = ((pixels + noise + 1.2) * 100).clip(0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def one_core_rates(paths: list[Path], spec) -> tuple[float, float, float]:
    """Images/s on one thread, over every file: decode, fpnx's resize (``prepare_image``), and torchvision's own
    preprocessing of the decoded image (``to_tensor`` + ``GeneralizedRCNNTransform``: normalise, resize, pad)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.transforms.functional import to_tensor

    transform = GeneralizedRCNNTransform(spec.min_size, spec.max_size, list(spec.mean), list(spec.std)).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_s, resize_s, torchvision_s = [], [], []
        for path in paths:
            start = time.perf_counter()
            rgb = decode_image(str(path)).rgb
            decoded = time.perf_counter()
            prepare_image(rgb, spec)
            resized = time.perf_counter()
            with torch.no_grad():
                transform([to_tensor(rgb)])
            decode_s.append(decoded - start)
            resize_s.append(resized - decoded)
            torchvision_s.append(time.perf_counter() - resized)
    finally:
        torch.set_num_threads(threads)
    return tuple(1 / statistics.median(times) for times in (decode_s, resize_s, torchvision_s))


def _reference_worker() -> None:
    """A reference process runs as fpnx's workers do: one thread, and (where this checkout has them) their
    allocator settings, without which a freed image's pages are faulted in again for the next one (measured here:
    decoding alone ran at half speed in some processes)."""
    torch.set_num_threads(1)
    try:
        from fpnx.loader.pool import _keep_freed_memory
    except ImportError:
        return
    _keep_freed_memory()


def _decode_and_resize(paths: list[Path], spec, resize: bool = True) -> int:
    for path in paths:
        rgb = decode_image(str(path)).rgb
        if resize:
            prepare_image(rgb, spec)
    return len(paths)


CPU_LIMIT_IMAGES = 1000  # files decoded and resized for each measurement of the all-cores limit (~4 s here)


def all_cores_rate(paths: list[Path], spec, cores: int, resize: bool = True) -> float:
    """Images/s of decode + fpnx's resize (or decode alone) in ``cores`` processes at once, each over its share
    of ``paths`` (wall time of the slowest; the processes are started and warmed up first)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(cores, initializer=_reference_worker) as pool:
        pool.starmap(_decode_and_resize, [(paths[:4], spec, resize)] * cores)  # imports, first-call costs
        shares = [(paths[index::cores], spec, resize) for index in range(cores)]
        start = time.perf_counter()
        pool.starmap(_decode_and_resize, shares, chunksize=1)
        return len(paths) / (time.perf_counter() - start)


def loader_alone_rate(paths: list[Path], spec, args, device: str = "cpu") -> float | None:
    """Images/s of the loader ``fpnx.extract`` would build for ``device`` (for "cuda": workers that only decode;
    no GPU is needed to build it), from a tenth of the images to the last; None for checkouts whose pipeline
    builds it otherwise."""
    try:
        from fpnx.options import ExtractOptions
        from fpnx.run.pipeline import _loader
        from fpnx.sources import ImageSource

        options = ExtractOptions(workers=args.workers, batch_size=args.batch_size, min_size=args.min_size,
                                 max_size=args.max_size)
        loader = _loader([ImageSource(str(path), path.name) for path in paths], spec, options, torch.device(device))
    except (ImportError, TypeError):
        return None
    start_at = max(1, len(paths) // 10)
    try:
        for count, item in enumerate(loader, 1):
            assert item.ok, item.error
            loader.release(item)
            if count == start_at:
                started = time.perf_counter()
        return (len(paths) - start_at) / (time.perf_counter() - started)
    finally:
        loader.close()


LOADERS = {  # device -> what its workers do, the reference they run against, its JSON keys
    "cpu": ("workers decode and resize", "decode+resize", "loader_alone_images_per_s",
            "all_cores_decode_resize_around_loader_images_per_s", "loader_ratio_to_all_cores_decode_resize"),
    "cuda": ("workers only decode", "decoding", "gpu_loader_images_per_s", "all_cores_decode_images_per_s",
             "gpu_loader_ratio_to_all_cores_decode"),
}


def loader_figures(paths: list[Path], spec, args, cores: int, device: str) -> dict:
    """The loader a run on ``device`` builds, consumed by a loop that does nothing else (for "cuda", workers only
    decode; no GPU is needed to build it), against what its workers do run on every core at once, measured right
    before and right after it: the most any run on that device can reach."""
    does, reference_name, rate_key, reference_key, ratio_key = LOADERS[device]
    settle_page_cache(paths)
    before = all_cores_rate(paths[:CPU_LIMIT_IMAGES], spec, cores, resize=device == "cpu")
    rate = loader_alone_rate(paths, spec, args, device=device)
    after = all_cores_rate(paths[:CPU_LIMIT_IMAGES], spec, cores, resize=device == "cpu")
    reference = statistics.mean([before, after])
    if rate is not None:
        print(f"the loader a {device.upper()} run builds ({does}), alone: {rate:.1f} images/s -> "
              f"{rate / reference:.2f} of {reference_name} on all {cores} cores at once, {reference:.1f} images/s "
              f"({before:.1f} / {after:.1f})", flush=True)
    return {rate_key: rate, reference_key: [before, after], ratio_key: None if rate is None else rate / reference}


def raw_write_rate(folder: Path, bytes_per_image: int, count: int, streaming: bool = False) -> float:
    """Images/s of writing ``count`` images' bytes sequentially with numpy.tofile, then fsync, in ``folder``;
    ``streaming``: also asking the kernel to start writing back every ``WRITEBACK_EVERY`` bytes, as fpnx does (the
    disk then works while the writer writes, where plain writes wait for the final fsync to reach it)."""
    block = np.random.default_rng(1).integers(0, 255, bytes_per_image, dtype=np.uint8)
    path = folder / "raw-write.bin"
    start = time.perf_counter()
    with open(path, "wb") as file:
        pending = 0
        for _ in range(count):
            block.tofile(file)
            pending += block.nbytes
            if streaming and pending >= WRITEBACK_EVERY:
                file.flush()
                start_writeback(file.fileno())
                pending = 0
        file.flush()
        os.fsync(file.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return count / seconds


def bytes_sent_to_storage() -> int | None:
    """Bytes this process has caused to be written to storage, less those dropped before writeback (Linux
    ``/proc/self/io``); None where the kernel does not tell."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def settle_page_cache(inputs: list[Path]) -> None:
    """Write back and drop the page cache where allowed (root on Linux), so that every measurement starts from the
    same memory state (on a shared VM, how much the cache holds moves write speed by several times), then read
    the input images back in: the CPU limits are measured on cached files, and so is the pipeline."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3")
    except OSError:
        pass
    for path in inputs:
        path.read_bytes()


def timed_extract(paths: list[Path], out: Path, levels, args) -> tuple[float, object]:
    """Images/s from the moment a tenth of the images are stored to the end of the run (finalize included; the
    start-up of the model and of every worker process not), and the summary."""
    first: list[float] = []
    start_at = max(1, len(paths) // 10)

    def progress(state) -> None:
        if state.done >= start_at and not first:
            first.append(time.perf_counter())

    summary = fpnx.extract(
        [str(path) for path in paths], out, model=StubPyramid(), levels=list(levels), dtype="float16",
        min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size, workers=args.workers,
        device="cpu", overwrite=True, progress=progress,
    )
    assert summary.images_stored == len(paths), summary.failures
    return (len(paths) - start_at) / (time.perf_counter() - first[0]), summary, first[0]


def run_config(name: str, levels, paths: list[Path], work: Path, args, bytes_per_image: int, spec) -> dict:
    out = work / f"{name}.h5"
    cores = args.workers
    streaming = []  # the raw write with writeback hints, where this checkout has them
    settle_page_cache(paths)
    before = raw_write_rate(work, bytes_per_image, len(paths))
    if start_writeback is not None:
        settle_page_cache(paths)
        streaming.append(raw_write_rate(work, bytes_per_image, len(paths), streaming=True))
    settle_page_cache(paths)
    cpu_before = all_cores_rate(paths[:CPU_LIMIT_IMAGES], spec, cores)
    sent_before = bytes_sent_to_storage()
    rate, summary, first = timed_extract(paths, out, levels, args)
    ended = time.perf_counter()
    sent_after = bytes_sent_to_storage()
    size = out.stat().st_size
    # how many times each byte of the output reached the disk (segments, copies): 1.0 is the least possible
    written_per_stored = None if sent_before is None else (sent_after - sent_before) / size
    out.unlink()
    settle_page_cache(paths)
    cpu_after = all_cores_rate(paths[:CPU_LIMIT_IMAGES], spec, cores)
    after = raw_write_rate(work, bytes_per_image, len(paths))
    if start_writeback is not None:
        settle_page_cache(paths)
        streaming.append(raw_write_rate(work, bytes_per_image, len(paths), streaming=True))
    count = len(paths)
    before_finalize = (count - max(1, count // 10)) / (ended - first - summary.timings.get("finalize", 0.0))
    per_image = {stage: 1000 * summary.timings.get(stage, 0.0) / count
                 for stage in ("decode", "preprocess", "model", "write", "finalize")}
    return {
        "config": name, "levels": list(levels), "images": count, "images_per_s": rate,
        "images_per_s_with_start": summary.images_per_s, "images_per_s_before_finalize": before_finalize,
        "file_bytes": size, "disk_bytes_per_stored_byte": written_per_stored,
        "write_mb_per_s": rate * size / count / 1e6, "ms_per_image": per_image, "timings_s": summary.timings,
        "raw_write_images_per_s": [before, after], "streaming_raw_write_images_per_s": streaming,
        "all_cores_decode_resize_images_per_s": [cpu_before, cpu_after],
        "mean_batch_fill": getattr(summary, "mean_batch_fill", None),
    }


def streaming_text(result: dict) -> str:
    rates = result["streaming_raw_write_images_per_s"]
    if not rates:
        return ""
    return (f", {result['ratio_to_streaming_raw_write']:.2f} of raw write with writeback hints "
            f"({' / '.join(f'{r:.2f}' for r in rates)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="images for the dense configuration")
    parser.add_argument("--small-images", type=int, default=2000,
                        help="images for the small (P5-P6) one (fewer: the first use of each shared-memory slot, a "
                             "fixed cost, weighs on the rate)")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: one per core: the stub network leaves the cores free)")
    parser.add_argument("--configs", default="dense,small")
    parser.add_argument("--workdir", default=None, help="folder on the disk to measure (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--repeat", type=int, default=1, help="measure each configuration this many times")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        folder = work / "images"
        folder.mkdir()
        paths = make_jpegs(folder, max(args.images, args.small_images))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.workers = cores if args.workers is None else args.workers
        spec = StubPyramid().preprocessing.replace(min_size=args.min_size, max_size=args.max_size)
        height, width, _ = resized_size(480, 640, spec)
        measured = [one_core_rates(paths[:64], spec)]

        def limits() -> tuple[float, float, float, float, float]:
            """The fastest one-core rates measured so far, and the limits on every core with fpnx's and with
            torchvision's preprocessing."""
            decode, resize, torchvision_rate = (max(rates[k] for rates in measured) for k in range(3))
            return (decode, resize, torchvision_rate, cores / (1 / decode + 1 / resize),
                    cores / (1 / decode + 1 / torchvision_rate))

        decode_rate, resize_rate, torchvision_rate, cpu_limit, torchvision_limit = limits()
        print(f"JPEGs 640x480 -> {height}x{width} (padded {'x'.join(map(str, padded_size(height, width, 32)))}); "
              f"one core: decode {1000 / decode_rate:.1f} ms, resize {1000 / resize_rate:.1f} ms per image "
              f"(torchvision's preprocessing {1000 / torchvision_rate:.1f} ms); CPU limit on {cores} cores "
              f"{cpu_limit:.1f} images/s ({torchvision_limit:.1f} with torchvision's)", flush=True)
        loaders = {**loader_figures(paths[: args.small_images], spec, args, cores, "cpu"),
                   **loader_figures(paths[: args.small_images], spec, args, cores, "cuda")}
        measured.append(one_core_rates(paths[:64], spec))
        results = []
        for name in [name for name in args.configs.split(",") for _ in range(args.repeat)]:
            levels = CONFIGS[name]
            bytes_per_image = sum(256 * np.prod(map_size(height, width, 2 ** int(level[1]))) * 2 for level in levels)
            count = args.images if name == "dense" else args.small_images
            result = run_config(name, levels, paths[:count], work, args, int(bytes_per_image), spec)
            measured.append(one_core_rates(paths[:64], spec))
            *_, cpu_limit, torchvision_limit = limits()
            raw = statistics.mean(result["raw_write_images_per_s"])
            streaming = result["streaming_raw_write_images_per_s"]
            streaming_raw = statistics.mean(streaming) if streaming else None
            both_cpu = result["all_cores_decode_resize_images_per_s"]
            all_cores = statistics.mean(both_cpu)
            result.update(all_cores_limit_images_per_s=all_cores,
                          ratio_to_all_cores_limit=result["images_per_s"] / all_cores,
                          bytes_per_image=int(bytes_per_image), raw_write_images_per_s_mean=raw,
                          ratio_to_raw_write=result["images_per_s"] / raw,
                          ratio_to_streaming_raw_write=streaming_raw and result["images_per_s"] / streaming_raw,
                          cpu_limit_images_per_s=cpu_limit,
                          ratio_to_cpu_limit=result["images_per_s"] / cpu_limit,
                          ratio_to_cpu_limit_before_finalize=result["images_per_s_before_finalize"] / cpu_limit,
                          ratio_to_torchvision_cpu_limit=result["images_per_s"] / torchvision_limit)
            results.append(result)
            stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in result["ms_per_image"].items())
            print(f"{name:5s} {'-'.join(levels)} float16, {count} images, {bytes_per_image / 1e6:.1f} MB/image: "
                  f"{result['images_per_s']:.2f} images/s ({result['images_per_s_with_start']:.2f} with "
                  f"start-up), {result['write_mb_per_s']:.0f} MB/s written "
                  f"({result['disk_bytes_per_stored_byte'] or float('nan'):.2f} disk bytes per stored byte); "
                  f"ms/image {stages}; raw write {raw:.2f} images/s "
                  f"({' / '.join(f'{r:.2f}' for r in result['raw_write_images_per_s'])}) -> "
                  f"{result['ratio_to_raw_write']:.2f} of raw write{streaming_text(result)}; "
                  f"decode+resize on all {args.workers} cores at "
                  f"once {all_cores:.1f} images/s ({' / '.join(f'{r:.1f}' for r in both_cpu)}) "
                  f"-> {result['ratio_to_all_cores_limit']:.2f} of it; {result['ratio_to_cpu_limit']:.2f} of the limit "
                  f"from one core {cpu_limit:.1f} ({result['ratio_to_cpu_limit_before_finalize']:.2f} before finalize; "
                  f"{result['ratio_to_torchvision_cpu_limit']:.2f} of the limit with torchvision's preprocessing)",
                  flush=True)
    decode_rate, resize_rate, torchvision_rate, cpu_limit, torchvision_limit = limits()
    report = {"decode_images_per_s_one_core": decode_rate, "resize_images_per_s_one_core": resize_rate,
              "torchvision_preprocessing_images_per_s_one_core": torchvision_rate,
              "torchvision_cpu_limit_images_per_s": torchvision_limit,
              "cores": cores, "cpu_limit_images_per_s": cpu_limit, **loaders,
              "one_core_measurements": measured, "results": results,
              "torch": torch.__version__, "python": sys.version.split()[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
