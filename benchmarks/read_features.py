"""Random access to stored features: fpnx's reader against a numpy memmap of the same bytes, in one run.

    python benchmarks/read_features.py                       # 240x320 and 800x1067 inputs, float16 and float32
    python benchmarks/read_features.py --cases 800x1067:float16 --rounds 9

For each case it writes a feature file of synthetic P2-P6 maps (256 channels, realistic shapes) with
``fpnx.store.FeatureWriter`` as a run does (blocks committed every 256 MiB, no compression), and a raw file of
the same arrays one after the other. With both in the page cache (read once first), it reads images in a seeded
random order through three paths, taking turns image by image:

- memmap: ``np.array(memmap[a:b]).reshape(shape)`` for each level of the image (the reference);
- fpnx: ``reader[i]``;
- h5py: one slice per level of the already-open block datasets (docs/format.md's recipe, as the reader read
  before issue 11).

It prints images/s and GB/s (median round) and each path's ratio to the memmap (1.0 = as fast). Absolute speed
depends on the machine; the ratios are the result. Only public API is used, so the same script measures older
versions of fpnx (``PYTHONPATH=/path/to/old/checkout python benchmarks/read_features.py``).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import fpnx
from fpnx.store import FeatureWriter, ImageRecord, open_features

LEVELS = ("p2", "p3", "p4", "p5", "p6")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
CHANNELS = 256
DEFAULT_CASES = ("240x320:float16", "240x320:float32", "800x1067:float16", "800x1067:float32")


def shapes(height: int, width: int) -> dict[str, tuple[int, int, int]]:
    return {level: (CHANNELS, math.ceil(height / s), math.ceil(width / s)) for level, s in STRIDES.items()}


def write_files(folder: Path, height: int, width: int, dtype: str, count: int) -> tuple[Path, Path]:
    """An fpnx file of ``count`` images and a raw file of the same arrays in the same order."""
    out, raw = folder / "features.h5", folder / "features.raw"
    level_shapes = shapes(height, width)
    per_image = sum(math.prod(shape) for shape in level_shapes.values())
    pool = np.random.default_rng(0).standard_normal(per_image + 4096 * count, dtype=np.float32).astype(dtype)
    with FeatureWriter(
        out, settings={"benchmark": "read_features"}, metadata={}, levels=LEVELS, channels=dict.fromkeys(LEVELS, CHANNELS),
        strides=STRIDES, dtype=dtype, commit_every_s=3600.0,
    ) as writer, open(raw, "wb") as raw_file:
        for k in range(count):
            flat = pool[4096 * k : 4096 * k + per_image]  # each image a different window of the pool
            arrays, start = {}, 0
            for level, shape in level_shapes.items():
                arrays[level] = flat[start : start + math.prod(shape)].reshape(shape)
                start += math.prod(shape)
            writer.add(ImageRecord(f"images/{k:06d}.jpg", height * 2, width * 2, height, width, 0.5), arrays)
            flat.tofile(raw_file)
        writer.finalize()
    return out, raw


class Memmap:
    def __init__(self, raw: Path, height: int, width: int, dtype: str) -> None:
        self.data = np.memmap(raw, dtype=dtype, mode="r")
        self.shapes = shapes(height, width)
        self.per_image = sum(math.prod(shape) for shape in self.shapes.values())

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        arrays, start = {}, i * self.per_image
        for level, shape in self.shapes.items():
            size = math.prod(shape)
            arrays[level] = np.array(self.data[start : start + size]).reshape(shape)
            start += size
        return arrays


class H5Slices:
    """docs/format.md's recipe with the index in memory and the block datasets kept open."""

    def __init__(self, path: Path) -> None:
        self.file = h5py.File(path, "r", locking=False, rdcc_nbytes=2 << 20)
        images = self.file["images"]
        self.blocks = images["segment"][:]
        self.heights, self.widths = images["input_height"][:], images["input_width"][:]
        self.offsets = {level: images[f"offset_{level}"][:] for level in LEVELS}
        self.datasets: dict[tuple[int, str], h5py.Dataset] = {}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        arrays = {}
        for level, shape in shapes(int(self.heights[i]), int(self.widths[i])).items():
            key = (int(self.blocks[i]), level)
            dataset = self.datasets.get(key)
            if dataset is None:
                dataset = self.datasets[key] = self.file["blocks"][f"{key[0]:06d}"][level]
            start = int(self.offsets[level][i])
            arrays[level] = dataset[start : start + math.prod(shape)].reshape(shape)
        return arrays


def timed_reads(paths: dict[str, object], order: list[int], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of reading ``order`` through each path. The paths take turns image by image (in a
    rotating order), so a burst of load from other processes on the machine hits all of them alike."""
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for j, i in enumerate(order):
            for name in names[j % len(names):] + names[: j % len(names)]:
                start = time.perf_counter()
                paths[name][i]
                spent[name] += time.perf_counter() - start
        for name in names:
            times[name].append(spent[name])
    return times


def run_case(case: str, count: int, reads: int, rounds: int, folder: Path) -> list[str]:
    size, dtype = case.split(":")
    height, width = (int(side) for side in size.split("x"))
    out, raw = write_files(folder, height, width, dtype, count)
    image_bytes = sum(math.prod(shape) for shape in shapes(height, width).values()) * np.dtype(dtype).itemsize
    with open_features(out) as reader:
        paths = {"memmap": Memmap(raw, height, width, dtype), "fpnx": reader, "h5py": H5Slices(out)}
        for i in range(count):  # page cache warm; and every path returns the same arrays
            expected = paths["memmap"][i]
            for name in ("fpnx", "h5py"):
                got = paths[name][i]
                assert all(np.array_equal(got[level], expected[level]) for level in LEVELS), (name, i)
        generator = random.Random(1)
        order = [generator.randrange(count) for _ in range(reads)]
        times = timed_reads(paths, order, rounds)
        paths["h5py"].file.close()
    reference = statistics.median(times["memmap"])
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            f"{size:>9} {dtype:>8} {count:>6} {image_bytes / 1e6:>8.1f} {name:>7} {reads / median:>9.1f} "
            f"{reads * image_bytes / median / 1e9:>7.2f} {reference / median:>6.2f}"
        )
    out.unlink()
    raw.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="HEIGHTxWIDTH:DTYPE of the network input")
    parser.add_argument("--bytes", type=float, default=1.0, help="GB of features per file (default 1)")
    parser.add_argument("--reads", type=float, default=1.0, help="GB read per path per round (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temporary folder)")
    args = parser.parse_args()
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: no such folder")
    print(f"fpnx {fpnx.__version__} from {Path(fpnx.__file__).parent}")
    print(f"{'input':>9} {'dtype':>8} {'images':>6} {'MB/image':>8} {'path':>7} {'images/s':>9} {'GB/s':>7} {'ratio':>6}")
    for case in args.cases:
        size, dtype = case.split(":")
        height, width = (int(side) for side in size.split("x"))
        image_bytes = sum(math.prod(shape) for shape in shapes(height, width).values()) * np.dtype(dtype).itemsize
        count = max(8, int(args.bytes * 1e9 / image_bytes))
        reads = max(16, int(args.reads * 1e9 / image_bytes))
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            for row in run_case(case, count, reads, args.rounds, Path(folder)):
                print(row, flush=True)


if __name__ == "__main__":
    main()
