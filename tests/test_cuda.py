"""On a CUDA GPU (skipped without one): the GPU path gives the CPU's features, in every precision, batch-invariant.

Run on a GPU machine by benchmarks/gpu_check.sh. The CPU reference is fpnx's own CPU path, which the parity tests
tie to torchvision; tolerances are relative to the largest value of each level.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fpnx
from fpnx.cli import app
from fpnx.preprocess import DETECTRON2, TORCHVISION, finish_on_device, pixels_tensor, resize_on_host
from fpnx.sources import decode_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SIZES = {"min_size": 320, "max_size": 512}


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def extract(tmp_path: Path, name: str, **options) -> dict[str, dict[str, np.ndarray]]:
    out = tmp_path / f"{name}.h5"
    summary = fpnx.extract([SAMPLES], out, weights="random", overwrite=True, **{**SIZES, **options})
    assert summary.images_stored == 5 and not summary.failures
    with fpnx.open_features(out) as reader:
        return {source: {level: array.astype(np.float64) for level, array in reader[source].items()}
                for source in reader.sources}


@pytest.fixture(scope="module")
def cpu_features(tmp_path_factory):
    return extract(tmp_path_factory.mktemp("cpu"), "cpu", device="cpu", workers=0)


def worst(features, reference) -> float:
    return max(relative_error(features[source][level], reference[source][level])
               for source in reference for level in reference[source])


def test_gpu_fp32_equals_the_cpu_with_tf32_off(tmp_path, cpu_features):
    gpu = extract(tmp_path, "gpu", device="cuda", workers=2)
    assert worst(gpu, cpu_features) < 1e-4  # TF32 would give ~1e-3
    tf32 = extract(tmp_path, "tf32", device="cuda", precision="tf32")
    assert worst(tf32, cpu_features) < 1e-2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_the_gpu_is_finite_and_close(tmp_path, cpu_features, precision):
    gpu = extract(tmp_path, precision, device="cuda", precision=precision, dtype="float16")
    for source in gpu:
        for level, array in gpu[source].items():
            assert np.isfinite(array).all()
    assert worst(gpu, cpu_features) < 0.05


def test_batches_and_workers_do_not_change_gpu_features(tmp_path):
    one = extract(tmp_path, "one", device="cuda", batch_size=1, workers=0)
    many = extract(tmp_path, "many", device="cuda", batch_size=4, workers=2)
    assert worst(many, one) < 1e-5


@pytest.mark.parametrize("spec", [TORCHVISION, DETECTRON2], ids=["torchvision", "detectron2"])
def test_preprocessing_on_the_gpu_matches_the_cpu(spec):
    spec = spec.replace(**SIZES)
    for path in sorted(SAMPLES.glob("*.png")):
        pixels, height, width, _ = resize_on_host(decode_image(str(path)).rgb, spec)
        on_cpu = finish_on_device(pixels_tensor(pixels), spec, (height, width))
        on_gpu = finish_on_device(pixels_tensor(pixels).cuda(), spec, (height, width)).cpu()
        assert on_gpu.shape == on_cpu.shape
        assert (on_gpu - on_cpu).abs().max() <= 1e-5 * on_cpu.abs().max()


def stdout_runner() -> CliRunner:
    """A runner whose ``stdout`` is stdout alone: Click before 8.2 mixes stderr into it unless told not to (the GPU
    machine's image brings its own Click); 8.2 keeps them apart and has no such option."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def test_bench_on_the_gpu_reports_its_fields():
    result = stdout_runner().invoke(app, ["bench", "--device", "cuda", "--size", "256x384", "--batch-size", "1,2",
                                      "--iters", "3", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device"].startswith("cuda") and report["timer"] == "cuda events"
    assert report["peak_memory_kind"] == "cuda max allocated"
    for row in report["rows"]:
        assert row["fpnx"]["images_per_s"] > 0 and row["fpnx"]["peak_memory_added_bytes"] > 0
        assert [stage["name"] for stage in row["stages"]][0] == "stem"
