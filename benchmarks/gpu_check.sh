#!/usr/bin/env bash
# On one H100/H200 (the device tool's machine, or any CUDA box with torch, torchvision, h5py, typer, rich, tqdm,
# pillow, pytest): the CUDA tests, the model benchmark over precisions x batch sizes, and end-to-end extracts.
# Finishes in under 8 minutes there. Results: $OUT/gpu_check.json (or ./gpu_check.json) and the logs beside it.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-$PWD/gpu-check-results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$RESULTS/install.log" 2>&1 \
    || echo "pip install failed (see install.log); running from the checkout through PYTHONPATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$RESULTS/gpu.txt"

step() { echo "== $1 ($(date +%T))"; }
# every step stops by the deadline: the whole check stays inside 8 minutes (the device tool's calls end at 10)
DEADLINE=$((SECONDS + 470))
upto() { local left=$((DEADLINE - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

step "CUDA tests"
timeout $(upto 150) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$RESULTS/tests.log" | tail -5

step "model only: fp32 (+ torchvision), bf16, fp16 x batch 1, 8, 32 at 800x1216, channels_last"
for precision in fp32 bf16 fp16; do
    compare=""; [ "$precision" = fp32 ] && compare="--compare torchvision"
    timeout $(upto 120) python3 -m fpnx bench --device cuda --precision "$precision" --batch-size 1,8,32 --size 800x1216 \
        --iters 20 --warmup 5 $compare --json >"$RESULTS/bench-$precision.json" 2>"$RESULTS/bench-$precision.log" \
        && python3 - "$RESULTS/bench-$precision.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for row in report["rows"]:
    ratio = f", {row['ratio']:.2f}x torchvision" if row["ratio"] else ""
    print(f"  {report['precision']} batch {row['batch_size']}: {row['fpnx']['images_per_s']:.0f} images/s, "
          f"{row['fpnx']['gflop_per_s'] / 1000:.0f} TFLOP/s{ratio}")
PY
done

step "model only: torch.compile, bf16, batch 32"
timeout $(upto 150) python3 -m fpnx bench --device cuda --precision bf16 --batch-size 32 --size 800x1216 --iters 20 \
    --warmup 5 --compile --json >"$RESULTS/bench-compile.json" 2>"$RESULTS/bench-compile.log" \
    || echo "  compile run failed or timed out (see bench-compile.log)"

step "end to end: 1000 JPEGs 640x480 at 800/1333, float16, bf16, batch 32 (P2-P6 capped at 300 for disk space)"
timeout $(upto 240) python3 benchmarks/end_to_end.py --device cuda --images 1000 --dense-images 300 --precision bf16 \
    --batch-size 32 --json "$RESULTS/end_to_end.json" 2>&1 | tee "$RESULTS/end_to_end.log" | grep -v Warning

python3 - "$RESULTS" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
combined = {}
for path in sorted(results.glob("*.json")):
    if path.name != "gpu_check.json":
        try:
            combined[path.stem] = json.loads(path.read_text())
        except ValueError:
            combined[path.stem] = None
combined["tests"] = (results / "tests.log").read_text()[-2000:] if (results / "tests.log").exists() else None
(results / "gpu_check.json").write_text(json.dumps(combined, indent=2))
print("results:", results / "gpu_check.json")
PY
