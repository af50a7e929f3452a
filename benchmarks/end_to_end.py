"""End-to-end ``fpnx extract`` of generated 640x480 JPEGs at 800/1333 in float16, per set of levels, against the
raw write speed of the same bytes on the same disk, measured in the same run. The JSON is written after each set
of levels, so a run stopped by a deadline keeps what it measured.

    python benchmarks/end_to_end.py --device cuda --images 1000 --levels p2-p6,p3-p6,p5-p6 --json out.json

For each set of levels: images/s (wall clock, start-up included), the fraction of the wall time spent in the
forward (the ``model`` timing), bytes written per second, and the ratio to ``numpy.tofile`` + fsync of as many
bytes in the output's folder (measured once, right after the extract). Dense sets
can be capped (``--dense-images``) where the disk is small: every image of P2-P6 in float16 is ~36.5 MB, and
the output is written twice (segments, then the final file).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_pipeline import make_jpegs, raw_write_rate  # noqa: E402

import fpnx  # noqa: E402

LEVEL_SETS = {"p2-p6": ["p2", "p3", "p4", "p5", "p6"], "p3-p6": ["p3", "p4", "p5", "p6"], "p5-p6": ["p5", "p6"]}


def run(name: str, paths: list[Path], work: Path, args) -> dict:
    levels = LEVEL_SETS[name]
    out = work / f"{name}.h5"
    start = time.perf_counter()
    summary = fpnx.extract(
        [str(path) for path in paths], out, weights=args.weights, levels=levels, dtype="float16",
        precision=args.precision, batch_size=args.batch_size, device=args.device, workers=args.workers,
        min_size=800, max_size=1333, overwrite=True,
    )
    wall = time.perf_counter() - start
    size = out.stat().st_size
    out.unlink()
    per_image = size / max(1, summary.images_stored)
    raw = [raw_write_rate(work, int(per_image), len(paths))]  # once: a dense set's bytes are many GB
    images_per_s = summary.images_stored / wall
    return {
        "levels": name, "images": summary.images_stored, "failures": len(summary.failures), "wall_s": wall,
        "images_per_s": images_per_s, "forward_fraction": summary.timings["model"] / wall,
        "timings_s": summary.timings, "file_bytes": size, "write_mb_per_s": size / wall / 1e6,
        "mean_batch_fill": summary.mean_batch_fill, "raw_write_images_per_s": raw,
        "ratio_to_raw_write": images_per_s / raw[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--dense-images", type=int, default=None, help="cap for p2-p6 (disk space)")
    parser.add_argument("--levels", default="p2-p6,p3-p6,p5-p6")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results: list[dict] = []
    report = {"device": args.device, "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else
              "cpu", "precision": args.precision, "batch_size": args.batch_size, "torch": torch.__version__,
              "results": results}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        paths = make_jpegs(work / "images", args.images)
        for name in args.levels.split(","):
            count = args.dense_images if name == "p2-p6" and args.dense_images else len(paths)
            result = run(name, paths[:count], work, args)
            results.append(result)
            print(f"{name}: {result['images']} images, {result['images_per_s']:.1f} images/s, forward "
                  f"{result['forward_fraction']:.0%} of wall, {result['write_mb_per_s']:.0f} MB/s written, "
                  f"{result['ratio_to_raw_write']:.2f} of raw write, batch fill {result['mean_batch_fill']:.0%}",
                  flush=True)
            if args.json:  # after each set: a deadline that stops the next keeps this one
                Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
