"""End-to-end: image files -> fpnx extract -> HDF5, against torchvision's own transform + backbone."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from checkpoint_factory import save, torchvision_detector
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms.functional import to_tensor
from typer.testing import CliRunner

import fpnx
from fpnx.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SIZES = {"min_size": 128, "max_size": 224}
TV_NAMES = {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


@pytest.fixture(scope="module")
def detector():
    return torchvision_detector("fasterrcnn", seed=11)


@pytest.fixture(scope="module")
def checkpoint(detector, tmp_path_factory):
    return save(detector.state_dict(), tmp_path_factory.mktemp("weights") / "fasterrcnn.pth")


def torchvision_reference(detector, path: Path, min_size: int, max_size: int) -> tuple[dict, tuple[int, int]]:
    """torchvision's transform + backbone on one image, as a torchvision user computes it."""
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    transform.eval()
    with Image.open(path) as image:
        pixels = to_tensor(image.convert("RGB"))
    with torch.no_grad():
        batch, _ = transform([pixels])
        features = detector.backbone(batch.tensors)
    return features, batch.image_sizes[0]


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def test_end_to_end_parity_with_torchvision(detector, checkpoint, tmp_path):
    out = tmp_path / "feats.h5"
    summary = fpnx.extract([SAMPLES], out, weights=checkpoint, workers=0, device="cpu", **SIZES)
    photos = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    assert summary.images_stored == len(photos) and not summary.failures
    with fpnx.open_features(out) as features:
        assert features.sources == photos
        for name in photos:
            reference, (height, width) = torchvision_reference(detector, SAMPLES / name, **SIZES)
            info = features.info(features.sources.index(name))
            assert (info["input_height"], info["input_width"]) == (height, width)
            stored = features[name]
            for level, tv_name in TV_NAMES.items():
                h, w = math.ceil(height / STRIDES[level]), math.ceil(width / STRIDES[level])
                ref = reference[tv_name][0, :, :h, :w].numpy()
                assert stored[level].shape == ref.shape, (name, level)
                error = relative_error(stored[level], ref)
                assert error <= 1e-3, f"{name} {level}: relative error {error:.2e}"


def write_image(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_features_do_not_depend_on_batch_mates(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    target = write_image(folder / "c_target.png", 100, 150, 0)
    write_image(folder / "a_same_size.png", 100, 150, 1)
    write_image(folder / "b_same_padding.png", 101, 149, 2)  # 128x188 -> padded 128x192, like the target
    write_image(folder / "d_other.png", 150, 100, 3)
    write_image(folder / "e_small.png", 64, 300, 4)
    common = dict(weights="random", workers=0, device="cpu", **SIZES)
    alone = fpnx.extract([target], tmp_path / "alone.h5", **common)
    batched = fpnx.extract([folder], tmp_path / "batched.h5", batch_size=4, **common)
    assert alone.images_stored == 1 and batched.images_stored == 5
    with fpnx.open_features(tmp_path / "alone.h5") as a, fpnx.open_features(tmp_path / "batched.h5") as b:
        for level in a.levels:
            assert relative_error(b["c_target.png"][level], a[0][level]) <= 1e-5, level

    # the check can fail: padding the target further (what naive batching does) changes its features
    model = fpnx.build_model("random")
    prepared = fpnx.preprocess.prepare_image(np.asarray(Image.open(target).convert("RGB")), model.preprocessing.replace(**SIZES))
    h, w = prepared.tensor.shape[-2:]
    with torch.no_grad():
        own = model(fpnx.preprocess.pad_image(prepared.tensor, 128, 192)[None])["p2"][0, :, : h // 4, : w // 4]
        padded = model(fpnx.preprocess.pad_image(prepared.tensor, 192, 320)[None])["p2"][0, :, : h // 4, : w // 4]
    assert relative_error(padded.numpy(), own.numpy()) > 1e-5


def test_round_trip_and_plain_h5py(tmp_path):
    out = tmp_path / "f.h5"
    fpnx.extract([SAMPLES / "rocket.jpg", SAMPLES / "camera.png"], out, weights="random", workers=0,
                 levels=["p3", "p5"], dtype="float16", compression="lzf", **SIZES)
    with fpnx.open_features(out) as features:
        assert len(features) == 2 and features.levels == ["p3", "p5"]
        first = features[0]
        assert set(first) == {"p3", "p5"} and first["p3"].dtype == np.float16
        info = features.info(0)
        assert (info["height"], info["width"]) == (427, 640)
        assert (info["input_height"], info["input_width"]) == (128, 191)
        assert info["scale"] == pytest.approx(128 / 427)
        assert first["p3"].shape == (256, 16, 24)
        metadata = features.attrs["metadata"]
        assert metadata["weights"]["name"] == "random" and metadata["weights"]["trained"] is False
        assert metadata["preprocessing"]["min_size"] == 128
    # plain h5py, as docs/format.md describes
    with h5py.File(out, "r") as file:
        assert file.attrs["format"] == "fpnx-features"
        images = file["images"]
        i = 0
        h, w = math.ceil(images["input_height"][i] / 8), math.ceil(images["input_width"][i] / 8)
        block = file["blocks"][f"{images['segment'][i]:06d}"]["p3"]
        offset = images["offset_p3"][i]
        plain = block[offset : offset + 256 * h * w].reshape(256, h, w)
        assert np.array_equal(plain, first["p3"])


def test_resume_redoes_nothing_and_adds_new_inputs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index in range(3):
        write_image(folder / f"{index}.png", 80, 120, index)
    out = tmp_path / "f.h5"
    common = dict(weights="random", workers=0, **SIZES)
    assert fpnx.extract([folder], out, **common).images_stored == 3
    again = fpnx.extract([folder], out, **common)
    assert again.images_stored == 0 and again.images_already_done == 3
    write_image(folder / "3.png", 80, 120, 3)
    more = fpnx.extract([folder], out, **common)
    assert more.images_stored == 1 and more.images_already_done == 3
    with fpnx.open_features(out) as features:
        assert sorted(features.sources) == ["0.png", "1.png", "2.png", "3.png"]
    with pytest.raises(fpnx.StoreError, match="--overwrite"):
        fpnx.extract([folder], out, weights="random", workers=0, min_size=96, max_size=224)
    assert fpnx.extract([folder], out, weights="random", workers=0, min_size=96, max_size=224, overwrite=True).images_stored == 4


def test_worker_processes_give_the_same_features(tmp_path):
    common = dict(weights="random", **SIZES)
    fpnx.extract([SAMPLES / "chelsea.png"], tmp_path / "a.h5", workers=0, **common)
    fpnx.extract([SAMPLES / "chelsea.png"], tmp_path / "b.h5", workers=2, **common)
    with fpnx.open_features(tmp_path / "a.h5") as a, fpnx.open_features(tmp_path / "b.h5") as b:
        for level in a.levels:  # oneDNN's results vary ~1e-6 with the thread count, nothing more
            assert relative_error(b[0][level], a[0][level]) <= 1e-5, level


def test_bad_images_are_recorded_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "good.png", 80, 120, 0)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    summary = fpnx.extract([folder], tmp_path / "f.h5", weights="random", workers=0, **SIZES)
    assert summary.images_stored == 1
    assert sorted(source for source, _ in summary.failures) == ["empty.jpg", "text.png"]
    with fpnx.open_features(tmp_path / "f.h5") as features:
        assert sorted(source for source, _ in features.failures) == ["empty.jpg", "text.png"]


runner = CliRunner()


def test_cli_extract_and_json(tmp_path):
    out = tmp_path / "f.h5"
    result = runner.invoke(app, ["extract", str(SAMPLES / "rocket.jpg"), "--out", str(out), "--weights", "random",
                                 "--min-size", "96", "--max-size", "160", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images_stored"] == 1 and summary["out"] == str(out)
    assert [level["name"] for level in summary["levels"]] == ["p2", "p3", "p4", "p5", "p6"]
    assert set(summary["timings"]) >= {"decode", "preprocess", "model", "write", "total"}
    assert (summary["preprocessing"]["min_size"], summary["preprocessing"]["max_size"]) == (96, 160)  # this run's
    assert summary["weights"]["preprocessing"]["min_size"] == 800  # what the weights carry
    result = runner.invoke(app, ["extract", str(SAMPLES / "rocket.jpg"), "--out", str(out), "--weights", "random",
                                 "--min-size", "96", "--max-size", "160", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 already done" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing_folder"], "missing_folder: no such file or directory"),
        ([str(SAMPLES), "--levels", "p2,p9"], "unknown level 'p9'"),
        ([str(SAMPLES), "--min-size", "0"], "--min-size"),
        ([str(SAMPLES), "--dtype", "int8"], "--dtype"),
        ([str(SAMPLES), "--precision", "int4"], "--precision must be one of fp32, bf16, fp16"),
        ([str(SAMPLES), "--decode-timeout", "-1"], "--decode-timeout must be 0 (no limit) or more"),
        ([str(SAMPLES), "--weights", "no_such_weights"], "unknown weights"),
        ([str(SAMPLES), "--levels", ""], "--levels names no level"),
        ([str(SAMPLES), "--bn-eps", "-1"], "--bn-eps must be 0 or more, got -1"),
        ([str(SAMPLES), "--bn-eps", "nan"], "--bn-eps must be 0 or more, got nan"),
    ],
)
def test_cli_usage_errors(tmp_path, arguments, message):
    result = runner.invoke(app, ["extract", *arguments, "--out", str(tmp_path / "f.h5")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["extract", str(SAMPLES), "--bogus"], "No such option: --bogus"),
        (["extract", str(SAMPLES)], "Missing option '--out'"),
        (["extract", str(SAMPLES), "--out", "f.h5", "--batch-size", "two"], "Invalid value for '--batch-size'"),
        (["no_such_command"], "No such command 'no_such_command'"),
    ],
)
def test_command_line_mistakes_print_one_line(arguments, message):
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output
    assert "--help'" in result.output  # where to look


def test_an_output_that_is_one_of_the_input_images_is_refused_even_with_overwrite(tmp_path):
    image = shutil.copyfile(SAMPLES / "rocket.jpg", tmp_path / "rocket.jpg")
    before = image.read_bytes()
    result = runner.invoke(app, ["extract", str(tmp_path), "--out", str(image), "--overwrite", "--weights", "random"])
    assert result.exit_code == 2 and "is one of the input images" in result.output, result.output
    assert image.read_bytes() == before


def test_an_empty_folder_says_no_images_were_found(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["extract", str(tmp_path / "empty"), "--out", str(tmp_path / "f.h5"), "--weights",
                                 "random"])
    assert result.exit_code == 0 and "no images found" in result.output, result.output


def test_library_warnings_print_one_line_on_the_command_line(tmp_path):
    from checkpoint_factory import save, torchvision_resnet

    body_only = save(torchvision_resnet(18).state_dict(), tmp_path / "resnet18.pth")
    result = runner.invoke(app, ["extract", str(SAMPLES / "rocket.jpg"), "--out", str(tmp_path / "f.h5"), "--weights",
                                 str(body_only), "--min-size", "64", "--max-size", "96", "--workers", "0"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "holds only the ResNet body" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "UserWarning" not in result.output


def test_cli_output_is_a_folder(tmp_path):
    result = runner.invoke(app, ["extract", str(SAMPLES), "--out", str(tmp_path), "--weights", "random"])
    assert result.exit_code == 2 and "folder" in result.output


@pytest.mark.parametrize("where", ["proc", "file as folder", "device"])
def test_cli_output_where_nothing_can_be_written(tmp_path, where):
    """One line and exit 2, before anything is extracted: a special file system, a file named as a folder."""
    (tmp_path / "notes.txt").write_text("")
    os.mkfifo(tmp_path / "pipe")  # not a regular file, as /dev/null: never removed, even with --overwrite
    out = {"proc": Path("/proc/fpnx-test.h5"), "file as folder": tmp_path / "notes.txt" / "f.h5",
           "device": tmp_path / "pipe"}[where]
    result = runner.invoke(app, ["extract", str(SAMPLES / "rocket.jpg"), "--out", str(out), "--weights", "random",
                                 "--min-size", "64", "--max-size", "96", "--workers", "0", "--overwrite"])
    assert result.exit_code == 2, result.output
    message = {"proc": f"cannot write {out}: ", "file as folder": f"{out}: {out.parent} is a file, not a folder",
               "device": f"{out} is not a regular file"}  # and --overwrite never removes it
    assert result.output.strip().splitlines() == [result.output.strip()] and message[where] in result.output
    assert (tmp_path / "pipe").is_fifo()


def test_real_subprocess(tmp_path):
    out = tmp_path / "f.h5"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([sys.executable, "-m", "fpnx", "extract", str(SAMPLES / "camera.png"), "--out", str(out),
                         "--weights", "random", "--min-size", "64", "--max-size", "96"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "1 images stored" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fpnx", "extract", str(tmp_path / "nope"), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such file or directory"]
    assert shutil.which("fpnx"), "the console script is installed"


def test_float16_output_beyond_its_range_is_clamped_and_counted(tmp_path):
    model = fpnx.build_model("random")
    with torch.no_grad():  # P3 alone overflows float16 (the top-down path feeds P2, not P4)
        model.output_convs["p3"].weight.mul_(1e8)
    summary = fpnx.extract([SAMPLES], tmp_path / "f.h5", model=model, dtype="float16", levels=["p3", "p4"],
                           workers=0, **SIZES)
    assert summary.float16_clamped > 0
    with fpnx.open_features(tmp_path / "f.h5") as reader:
        for i in range(len(reader)):
            p3, p4 = reader[i]["p3"], reader[i]["p4"]
            assert np.isfinite(p3).all() and np.abs(p3).max() == 65504
            assert np.isfinite(p4).all() and np.abs(p4).max() < 100


def test_summary_reports_the_mean_batch_fill(tmp_path):
    summary = fpnx.extract([SAMPLES], tmp_path / "f.h5", weights="random", batch_size=2, workers=0, **SIZES)
    # at 128/224 two photos pad to 128x128 and three to 128x192: batches of 2, 2 and 1
    assert summary.mean_batch_fill == pytest.approx(5 / 6)
    assert summary.to_dict()["mean_batch_fill"] == summary.mean_batch_fill
    assert 0 < summary.timings["finalize"] < summary.timings["total"]  # merging the segments, on its own
