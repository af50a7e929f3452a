"""fpnx's network against torchvision's own R50-FPN backbone, in one run, at one input size.

    python benchmarks/bench_model.py --size 800x1216 --rounds 3

Rounds interleave the contestants so that load from other processes hits them alike; each contestant's time
is its median over the rounds. Ratios are throughput of fpnx / throughput of torchvision eager fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

import fpnx
from fpnx.models import cpu_has_native_bf16, forward, optimize_for_inference

GFLOP_800x1216 = 269.0  # the model's cost per 800x1216 image; scales with the pixel count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="800x1216")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    x = torch.randn(args.batch_size, 3, height, width)
    gflop = GFLOP_800x1216 * height * width / (800 * 1216) * args.batch_size

    torchvision_backbone = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval().backbone
    model = optimize_for_inference(fpnx.build_model("random"))
    contestants = {
        "torchvision eager fp32": lambda: torchvision_backbone(x),
        "fpnx fp32": lambda: forward(model, x, "fp32"),
        "fpnx bf16 (autocast)": lambda: forward(model, x, "bf16"),
    }
    times: dict[str, list[float]] = {name: [] for name in contestants}
    with torch.no_grad():
        for run in contestants.values():  # warm-up: oneDNN picks and caches its kernels
            run()
        for _ in range(args.rounds):
            for name, run in contestants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["torchvision eager fp32"])
    print(f"input {args.batch_size}x3x{height}x{width}, {args.threads} threads, {args.rounds} rounds, "
          f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    print(f"{'':26}{'s/batch':>9}{'img/s':>8}{'GFLOP/s':>9}{'vs torchvision':>16}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:26}{median:9.3f}{args.batch_size / median:8.2f}{gflop / median:9.1f}{base / median:15.2f}x")


if __name__ == "__main__":
    main()
