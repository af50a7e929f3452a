"""End-to-end ``fpnx.extract`` throughput against model-only throughput on the same padded size, in one run.

    python benchmarks/bench_extract.py --images 24 --min-size 400 --max-size 667

Makes 640x480 JPEGs from the sample photos, times the model alone on the padded input size, then a full extract
(decode, resize, model, write to HDF5). Efficiency = extract images/s / model-only images/s; decoding, resizing
and writing are hidden behind the model when it is near 1. Steady state excludes the model build and worker
start (the time to the first stored image).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import fpnx
from fpnx.models import forward, optimize_for_inference
from fpnx.preprocess import padded_size, resized_size

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def make_jpegs(folder: Path, count: int) -> list[Path]:
    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    paths = []
    for index in range(count):
        with Image.open(photos[index % len(photos)]) as photo:
            image = photo.convert("RGB").resize((640, 480), Image.Resampling.BILINEAR)
        if index >= len(photos):  # distinct content per file
            image = image.rotate(index * 7, expand=False)
        path = folder / f"{index:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--min-size", type=int, default=400)
    parser.add_argument("--max-size", type=int, default=667)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_jpegs(folder, args.images)
        model = fpnx.build_model(args.weights)
        spec = model.preprocessing.replace(min_size=args.min_size, max_size=args.max_size)
        height, width, _ = resized_size(480, 640, spec)
        padded = padded_size(height, width, model.size_divisibility)

        fast = optimize_for_inference(fpnx.build_model(args.weights))
        x = torch.randn(1, 3, *padded)
        forward(fast, x)  # warm-up
        model_times = []
        for _ in range(max(3, args.images // 4)):
            start = time.perf_counter()
            forward(fast, x)
            model_times.append(time.perf_counter() - start)
        model_rate = 1 / statistics.median(model_times)

        stamps: list[float] = []
        started = time.perf_counter()
        summary = fpnx.extract(
            [folder], Path(tmp) / "features.h5", model=model, min_size=args.min_size, max_size=args.max_size,
            dtype=args.dtype, workers=args.workers, device="cpu",
            progress=lambda update: stamps.append(time.perf_counter()),
        )
        wall = time.perf_counter() - started

    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    print(f"{args.images} JPEGs 640x480 -> {height}x{width} (padded {padded[0]}x{padded[1]}), "
          f"{torch.get_num_threads()} threads, stored {args.dtype}")
    print(f"model only          {model_rate:6.3f} img/s  (median of {len(model_times)})")
    print(f"extract steady      {steady:6.3f} img/s  efficiency {steady / model_rate:.2f}")
    print(f"extract wall clock  {summary.images_stored / wall:6.3f} img/s  efficiency {summary.images_stored / wall / model_rate:.2f}"
          f"  (includes {stamps[0] - started:.1f} s to the first image)")
    print("extract timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in summary.timings.items()))


if __name__ == "__main__":
    main()
