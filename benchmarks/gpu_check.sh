#!/usr/bin/env bash
# On one H100/H200 (the device tool's machine, or any CUDA box with torch, torchvision, h5py, typer, rich, tqdm,
# pillow, pytest): the CUDA tests, the model benchmark over precisions x batch sizes, and end-to-end extracts.
# Finishes in under 8 minutes there. Results: gpu_check.json (every figure, the tests' summary, the tail of each
# log) and logs.tar.gz in $OUT (or ./gpu-check-results): two files, as the device tool returns at most 8. Exits 1
# if any step failed or timed out, or if torch sees no GPU.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-$PWD/gpu-check-results}"
LOGS="$(mktemp -d /tmp/gpu-check.XXXXXX)"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
failed=""
fail() { failed="$failed;$1"; echo "  FAILED: $1 (see its log)"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 \
    || echo "pip install failed (see install.log); running from the checkout through PYTHONPATH"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "(no nvidia-smi)"; } 2>&1 \
    | tee "$LOGS/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available())" | tee -a "$LOGS/gpu.txt"
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    || { echo "torch sees no CUDA GPU"; rm -rf "$LOGS"; exit 1; }

step() { echo "== $1 ($(date +%T))"; }
# every step stops by the deadline: the whole check stays inside 8 minutes (the device tool's calls end at 10)
DEADLINE=$((SECONDS + 470))
upto() { local left=$((DEADLINE - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

step "CUDA tests"
timeout $(upto 150) python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$LOGS/tests.log" \
    | tail -8 || fail "CUDA tests"

step "model only: fp32 (+ torchvision), bf16, fp16 x batch 1, 8, 32 at 800x1216, channels_last"
for precision in fp32 bf16 fp16; do
    compare=""; [ "$precision" = fp32 ] && compare="--compare torchvision"
    timeout $(upto 120) python3 -m fpnx bench --device cuda --precision "$precision" --batch-size 1,8,32 --size 800x1216 \
        --iters 20 --warmup 5 $compare --json >"$LOGS/bench-$precision.json" 2>"$LOGS/bench-$precision.log" \
        || { fail "bench $precision"; continue; }
    python3 - "$LOGS/bench-$precision.json" <<'PY'
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
    --warmup 5 --compile --json >"$LOGS/bench-compile.json" 2>"$LOGS/bench-compile.log" || fail "bench compile"

step "end to end: 1000 JPEGs 640x480 at 800/1333, float16, bf16, batch 32 (P2-P6 capped at 150 for disk and time)"
# cheapest first; the JSON is rewritten after each set, so the deadline keeps what was measured
timeout -k 10 $(upto 240) python3 benchmarks/end_to_end.py --device cuda --images 1000 --dense-images 150 \
    --levels p5-p6,p3-p6,p2-p6 --precision bf16 --batch-size 32 --json "$LOGS/end_to_end.json" 2>&1 \
    | tee "$LOGS/end_to_end.log" | grep -v Warning || fail "end to end"

python3 - "$LOGS" "$RESULTS" "$failed" <<'PY'
import json, pathlib, sys
logs, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
combined = {"failed": [step for step in sys.argv[3].split(";") if step]}
for path in sorted(logs.glob("*.json")):
    try:
        combined[path.stem] = json.loads(path.read_text())
    except ValueError:
        combined[path.stem] = None
combined["logs"] = {path.name: path.read_text(errors="replace")[-3000:] for path in sorted(logs.glob("*.log"))}
combined["gpu"] = (logs / "gpu.txt").read_text() if (logs / "gpu.txt").exists() else None
(results / "gpu_check.json").write_text(json.dumps(combined, indent=2))
print("results:", results / "gpu_check.json")
PY
tar -czf "$RESULTS/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
if [ -n "$failed" ]; then echo "FAILED: ${failed#;}"; exit 1; fi
echo "every step passed"
