"""fpnx inspect: summary and level tables, --images/--image, --stats against numpy, --json fields, --plot, errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import fpnx
from fpnx.report import statistics as statistics_module
from fpnx.cli import app
from fpnx.report.plot import BAR, MISSING, VIRIDIS, colormap
from fpnx.store import FeatureWriter, ImageRecord, open_features

DOCS = Path(__file__).resolve().parents[1] / "docs" / "inspect-bench.md"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def error_line(result) -> str:
    """The one line a failed command prints; fails the test if there is more, or a traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    rows, cols = np.mgrid[0:96, 0:128]
    red = np.stack([200 + rows % 50, cols, 40 + (rows * cols) % 30], axis=-1).astype(np.uint8)
    Image.fromarray(red).save(folder / "a.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)).save(folder / "sub" / "b.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def features(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "feats.h5"
    fpnx.extract([str(photos)], out, weights="random", min_size=64, max_size=96, workers=0,
                 command=f"fpnx extract {photos} --out {out} --weights random")
    return out


def write_synthetic(path: Path, arrays: list[dict[str, np.ndarray]], *, finalize: bool = True) -> Path:
    """A small fpnx file (or, unfinalized, a .parts folder) holding exactly ``arrays``; sources do not exist."""
    levels = list(arrays[0])
    channels = {name: arrays[0][name].shape[0] for name in levels}
    strides = {name: 4 * 2**k for k, name in enumerate(levels)}
    writer = FeatureWriter(path, settings={"weights": {"name": "tiny"}},
                           metadata={"weights": {"name": "tiny", "trained": True}, "command": "test"},
                           levels=levels, channels=channels, strides=strides)
    for k, features in enumerate(arrays):
        height, width = (features[levels[0]].shape[1] * 4, features[levels[0]].shape[2] * 4)
        writer.add(ImageRecord(f"nowhere/{k}.png", height, width, height, width, 1.0), features)
    if finalize:
        writer.finalize()
    else:
        writer.close()
    return path


def numpy_reference(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {
        "count": values.size, "mean": finite.mean(), "std": finite.std(), "min": finite.min(), "max": finite.max(),
        "zero_fraction": np.count_nonzero(values == 0) / values.size,
        "nan_count": int(np.isnan(values).sum()), "inf_count": int(np.isinf(values).sum()),
    }


def assert_stats_match(stats: list[dict], expected: dict[str, np.ndarray]) -> None:
    assert [row["name"] for row in stats] == list(expected)
    for row in stats:
        reference = numpy_reference(expected[row["name"]].astype(np.float64))
        for key, value in reference.items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (row["name"], key)


def documented_fields(section: str) -> set[str]:
    text = re.sub(r"```.*?```", "", DOCS.read_text(), flags=re.S)
    start = text.index(section)
    spans = re.findall(r"`([^`]+)`", text[start:])
    return {word for span in spans for word in re.findall(r"[a-z_0-9]+", span)}


def all_keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in all_keys(item)}
    if isinstance(value, list):
        return {key for item in value for key in all_keys(item)}
    return set()


# -- the summary ----------------------------------------------------------------------------------------------


def test_summary_and_level_table(features):
    result = invoke("inspect", features)
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"{features}: 2 images stored, 1 failed" in text
    assert "random (untrained" in text and "ResNet-50" in text
    assert "RGB 0-1, mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225" in text and "min 64 / max 96" in text
    assert "float32, compression none, computed in fp32" in text
    size = os.path.getsize(features)
    assert f"{size / 1e6:.1f} MB on disk" in text
    assert "broken.png" in text  # the failures table
    with open_features(features) as reader:
        infos = [reader.info(i) for i in range(len(reader))]
    for name, stride in zip(("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64)):
        sizes = sorted((math.ceil(i["input_height"] / stride), math.ceil(i["input_width"] / stride)) for i in infos)
        row = next(line for line in text.splitlines() if re.match(rf"\W*{name}\W", line))
        cells = [cell.strip() for cell in re.split(r"[│|]", row) if cell.strip()]
        assert cells[:3] == [name, str(stride), "256"]
        assert cells[3] == f"{sizes[0][0]}x{sizes[0][1]}" and cells[5] == f"{sizes[-1][0]}x{sizes[-1][1]}"


def test_json_fields_are_the_documented_ones(features):
    result = invoke("inspect", features, "--json", "--images", "--stats")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {
        "path", "kind", "format_version", "images", "failures", "weights", "trained", "preprocessing", "precision",
        "dtype", "compression", "pool", "maps", "levels", "size_on_disk", "files", "created", "fpnx_version", "command", "device",
        "links", "selected", "stats", "plot",
    }
    assert data["kind"] == "file" and data["images"] == 2 and data["files"] == 1
    assert data["failures"][0]["source"] == "broken.png" and data["failures"][0]["reason"]
    assert data["weights"]["name"] == "random" and data["trained"] is False
    assert data["preprocessing"]["min_size"] == 64 and data["preprocessing"]["max_size"] == 96
    assert data["dtype"] == "float32" and data["size_on_disk"] == os.path.getsize(features)
    assert data["links"] == [] and data["plot"] is None
    with open_features(features) as reader:
        assert [row["source"] for row in data["selected"]] == reader.sources == ["a.png", "sub/b.png"]
        for row in data["selected"]:
            info = reader.info(row["index"])
            assert {key: row[key] for key in info} == info
        for level in data["levels"]:
            stride = level["stride"]
            expected = sum(256 * math.ceil(reader.info(i)["input_height"] / stride)
                           * math.ceil(reader.info(i)["input_width"] / stride) * 4 for i in range(len(reader)))
            assert level["bytes"] == expected and level["stored_bytes"] > 0
    # every field, nested ones included, is documented in docs/inspect-bench.md
    data_with_plot = json.loads(invoke("inspect", features, "--json", "--plot", features.parent / "x.png").stdout)
    keys = all_keys(data) | all_keys(data_with_plot)
    missing = keys - documented_fields("## `fpnx inspect")
    assert not missing, f"undocumented inspect --json fields: {sorted(missing)}"


# -- images ---------------------------------------------------------------------------------------------------


def test_images_table_and_one_image(features):
    result = invoke("inspect", features, "--images")
    assert result.exit_code == 0, result.output
    assert re.search(r"0\W+a\.png\W+96x128\W+64x85", result.output), result.output
    assert re.search(r"1\W+sub/b\.png\W+120x80\W+96x64", result.output), result.output

    by_source = json.loads(invoke("inspect", features, "--image", "sub/b.png", "--json").stdout)
    by_index = json.loads(invoke("inspect", features, "--image", "-1", "--json").stdout)
    assert by_source["selected"] == by_index["selected"]
    assert [row["source"] for row in by_source["selected"]] == ["sub/b.png"]

    for bad in ("7", "nope.png"):
        result = invoke("inspect", features, "--image", bad)
        assert result.exit_code == 2, result.output
        assert ("out of range" if bad == "7" else "no image 'nope.png'") in error_line(result)


# -- statistics -----------------------------------------------------------------------------------------------


def test_stats_match_numpy(features):
    result = invoke("inspect", features, "--stats", "--json")
    assert result.exit_code == 0, result.output
    with open_features(features) as reader:
        everything = {level: np.concatenate([reader[i][level].ravel() for i in range(len(reader))])
                      for level in reader.levels}
        second = {level: array.ravel() for level, array in reader[1].items()}
    assert_stats_match(json.loads(result.stdout)["stats"], everything)
    one = json.loads(invoke("inspect", features, "--stats", "--image", "1", "--json").stdout)
    assert_stats_match(one["stats"], second)
    table = invoke("inspect", features, "--stats")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if re.match(r"\W*p3\W", line) and "%" in line)
    assert f"{everything['p3'].astype(np.float64).mean():.4g}" in row


def test_stats_count_zeros_nan_inf_and_stream_in_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = []
    for k in range(3):
        p2 = rng.standard_normal((3, 4 + k, 5)).astype(np.float32) * 10 + 1000  # a large offset tests the merge
        p3 = rng.standard_normal((2, math.ceil((4 + k) / 2), 3)).astype(np.float32)
        p2.flat[[0, 7]] = 0.0
        p3.flat[1] = np.nan
        p3.flat[2] = np.inf if k else -np.inf
        arrays.append({"p2": p2, "p3": p3})
    path = write_synthetic(tmp_path / "odd.h5", arrays)
    expected = {level: np.concatenate([a[level].ravel() for a in arrays]) for level in ("p2", "p3")}
    monkeypatch.setattr(statistics_module, "STATS_CHUNK", 7)  # many chunks per image, merged pairwise
    result = invoke("inspect", path, "--stats", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert_stats_match(stats, expected)
    assert stats[1]["nan_count"] == 3 and stats[1]["inf_count"] == 3 and stats[0]["zero_fraction"] > 0


# -- the plot -------------------------------------------------------------------------------------------------


def panel_pixels(png: np.ndarray, panel: dict) -> np.ndarray:
    left, top, right, bottom = panel["box"]
    return png[top:bottom, left:right].reshape(-1, 3)


def test_plot_has_the_panels_and_is_not_blank(features, photos, tmp_path):
    out = tmp_path / "fig.png"
    result = invoke("inspect", features, "--plot", out, "--image", "sub/b.png", "--json")
    assert result.exit_code == 0, result.output
    plot = json.loads(result.stdout)["plot"]
    assert plot["source"] == "sub/b.png" and plot["index"] == 1
    assert Path(plot["image_path"]).resolve() == (photos / "sub" / "b.png").resolve()  # found through the command
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (plot["height"], plot["width"], 3)
    levels = ["p2", "p3", "p4", "p5", "p6"]
    assert [p["name"] for p in plot["panels"]] == ["input", "info", *[n for l in levels for n in (l, f"{l} histogram")]]
    viridis = {tuple(c) for c in VIRIDIS}
    with open_features(features) as reader:
        arrays = reader[1]
    for panel in plot["panels"]:
        pixels = panel_pixels(png, panel)
        colours = {tuple(p) for p in pixels}
        assert len(colours) > 1, panel["name"]  # not blank
        if panel["kind"] == "map":
            level = panel["name"]
            h, w = arrays[level].shape[1:]
            assert f"{h}x{w}" in panel["title"]
            expected, _, _ = colormap(arrays[level].astype(np.float64).mean(axis=0))
            assert colours <= viridis and colours == {tuple(c) for c in expected.reshape(-1, 3)}, level
        elif panel["kind"] == "histogram":
            assert (pixels == BAR).all(axis=1).sum() > 50, panel["name"]
        elif panel["kind"] == "image":
            source = np.asarray(Image.open(photos / "sub" / "b.png").convert("RGB"), dtype=np.float64)
            drawn = pixels[~(pixels == MISSING).all(axis=1)]  # the image, centred on a grey panel
            assert len(drawn) > 0.3 * len(pixels)
            assert np.abs(drawn.mean(axis=0) - source.reshape(-1, 3).mean(axis=0)).max() < 12
    assert "plot: wrote" in invoke("inspect", features, "--plot", out).output


def test_plot_without_the_input_image_says_so(tmp_path):
    rng = np.random.default_rng(3)
    path = write_synthetic(tmp_path / "far.h5", [{"p2": rng.standard_normal((4, 6, 8)).astype(np.float32),
                                                  "p3": rng.standard_normal((4, 3, 4)).astype(np.float32)}])
    out = tmp_path / "fig.png"
    result = invoke("inspect", path, "--plot", out, "--image-root", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    plot = json.loads(result.stdout)["plot"]
    assert plot["image_path"] is None
    png = np.asarray(Image.open(out).convert("RGB"))
    panel = next(p for p in plot["panels"] if p["name"] == "input")
    pixels = panel_pixels(png, panel)
    grey = (pixels == MISSING).all(axis=1).mean()
    assert 0.5 < grey < 1.0  # a grey panel with text on it
    assert "not found" in invoke("inspect", path, "--plot", out).output
    result = invoke("inspect", path, "--plot", tmp_path / "fig.jpg")
    assert result.exit_code == 2 and ".png" in error_line(result)
    result = invoke("inspect", path, "--plot", tmp_path / "typo" / "fig.png")
    assert result.exit_code == 2 and "does not exist" in error_line(result) and not (tmp_path / "typo").exists()
    result = invoke("inspect", path, "--plot", out, "--image-root", tmp_path / "typo")  # not every image missing
    assert result.exit_code == 2 and error_line(result) == f"error: --image-root {tmp_path / 'typo'}: not a folder"


def test_plot_finds_the_input_from_another_folder_after_shards_and_a_merge(photos, tmp_path, monkeypatch):
    """A relative input folder, --shard 0/1, merge, then the plot from inside the output's folder."""
    work = tmp_path / "work"
    shutil.copytree(photos, work / "images")
    (work / "out").mkdir()
    monkeypatch.chdir(work)
    extracted = invoke("extract", "images", "--out", "out/s.h5", "--weights", "random", "--min-size", "32",
                       "--max-size", "48", "--levels", "p5,p6", "--shard", "0/1", "--workers", "0")
    assert extracted.exit_code == 0, extracted.output
    assert invoke("merge", "--out", "out/s.h5").exit_code == 0
    monkeypatch.chdir(work / "out")
    result = invoke("inspect", "s.h5", "--plot", "p.png", "--image", "sub/b.png", "--json")
    assert result.exit_code == 0, result.output
    plot = json.loads(result.stdout)["plot"]
    assert plot["image_path"] is not None, "input image not found"
    assert Path(plot["image_path"]).resolve() == (work / "images" / "sub" / "b.png").resolve()
    with open_features("s.h5") as reader:
        assert reader.metadata["inputs"] == [str(work / "images")] and reader.metadata["working_dir"] == str(work)


def test_a_file_written_before_inputs_were_recorded_still_plots(tmp_path, monkeypatch):
    """fpnx 0.1 recorded only the command line: its input folders are found as before, from the run's folder."""
    old = Path(__file__).parent / "data" / "written-by-fpnx-0.1.h5"
    shutil.copy(old, tmp_path / "s.h5")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        tmp_path / "images" / "a.png")
    monkeypatch.chdir(tmp_path)
    with open_features("s.h5") as reader:
        assert "inputs" not in reader.metadata and reader.sources == ["a.png"]
    result = invoke("inspect", "s.h5", "--plot", "p.png", "--json")
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["plot"]["image_path"]).resolve() == (tmp_path / "images" / "a.png").resolve()


# -- unfinished runs ------------------------------------------------------------------------------------------


def test_parts_folder_of_an_unfinished_run(tmp_path):
    rng = np.random.default_rng(4)
    arrays = [{"p2": rng.standard_normal((2, 3, 3)).astype(np.float32)} for _ in range(3)]
    out = write_synthetic(tmp_path / "run.h5", arrays, finalize=False)
    parts = Path(f"{out}.parts")
    assert parts.is_dir() and not out.exists()
    result = invoke("inspect", parts, "--json", "--stats")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "parts" and data["images"] == 3 and data["files"] >= 1
    # the blocks of a new output are in the run's early merge, which the segments refer to: counted, not links
    early = tmp_path / "run.h5.merge.tmp"
    assert data["size_on_disk"] == sum(os.path.getsize(p) for p in [*parts.iterdir(), early] if p.is_file())
    assert early.is_file() and data["links"] == []
    assert_stats_match(data["stats"], {"p2": np.concatenate([a["p2"].ravel() for a in arrays])})
    assert invoke("inspect", parts).exit_code == 0

    result = invoke("inspect", out)
    assert result.exit_code == 1
    line = error_line(result)
    assert "is not finished" in line and "3 images" in line and ".parts" in line


# -- errors ---------------------------------------------------------------------------------------------------


def test_missing_non_hdf5_and_corrupted_files(features, tmp_path):
    result = invoke("inspect", tmp_path / "missing.h5")
    assert result.exit_code == 2 and "does not exist" in error_line(result)  # a usage error, as for extract

    text = tmp_path / "notes.h5"
    text.write_text("hello, not HDF5\n")
    result = invoke("inspect", text)
    assert result.exit_code == 1 and "not HDF5" in error_line(result)

    truncated = tmp_path / "truncated.h5"
    data = features.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    result = invoke("inspect", truncated, "--stats")
    assert result.exit_code == 1 and str(truncated) in error_line(result)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["x"] = np.arange(3)
    result = invoke("inspect", other)
    assert result.exit_code == 1 and "not an fpnx feature file" in error_line(result)


def test_links_are_listed_not_followed(features, tmp_path):
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as h5:
        h5["data"] = np.arange(5)

    # a link where the reader looks: refused, and named in the one error line
    untrusted = tmp_path / "untrusted.h5"
    shutil.copy(features, untrusted)
    with h5py.File(untrusted, "r+") as h5:
        del h5["failures/reason"]
        h5["failures/reason"] = h5py.ExternalLink(str(secret), "/data")
    result = invoke("inspect", untrusted)
    assert result.exit_code == 1
    line = error_line(result)
    assert "not a trusted" in line and f"/failures/reason -> {secret}:/data (external link)" in line

    # links where the reader never looks: the file is shown, the links listed
    extra = tmp_path / "extra.h5"
    shutil.copy(features, extra)
    with h5py.File(extra, "r+") as h5:
        h5["elsewhere"] = h5py.SoftLink("/images")
        h5["outside"] = h5py.ExternalLink(str(secret), "/data")
    result = invoke("inspect", extra, "--json")
    assert result.exit_code == 0, result.output
    links = {(link["path"], link["kind"], link["target"]) for link in json.loads(result.stdout)["links"]}
    assert links == {("/elsewhere", "soft link", "/images"), ("/outside", "external link", f"{secret}:/data")}
    result = invoke("inspect", extra)
    assert result.exit_code == 0 and "not followed" in result.output and "/outside" in result.output


def test_level_reports_from_counts_equal_those_from_every_image():
    """A run keeps how many images had each input size; min, median (by area) and bytes are those of the list."""
    import collections
    import random

    from fpnx.models.shapes import map_size
    from fpnx.report.levels import level_reports

    strides, channels = {"p2": 4, "p3": 8, "p6": 64}, {"p2": 3, "p3": 4, "p6": 2}
    rng = random.Random(0)
    for _ in range(200):
        sizes = [(rng.randint(1, 200), rng.randint(1, 200)) for _ in range(rng.randint(0, 12))]
        sizes += rng.choices(sizes, k=rng.randint(0, 12)) if sizes else []
        reports = level_reports(collections.Counter(sizes), strides, channels, 2)
        for report, (name, stride) in zip(reports, strides.items()):
            maps = sorted((map_size(h, w, stride) for h, w in sizes), key=lambda hw: (hw[0] * hw[1], hw)) or [(0, 0)]
            assert (report.min_hw, report.median_hw, report.max_hw) == (maps[0], maps[len(maps) // 2], maps[-1])
            assert report.bytes == sum(h * w for h, w in maps if sizes) * channels[name] * 2
