"""What the commands print reads well at 80 columns (a pipe, a narrow terminal): tables fit or are stacked, and no
value is cut or squeezed into one-character cells."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import fpnx
from fpnx.cli import app
from fpnx.render import print_table

SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"
narrow = CliRunner(env={"COLUMNS": "80"})


def lines_of(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def assert_fits(lines: list[str], width: int = 80, skip_first: bool = False) -> None:
    checked = lines[1:] if skip_first else lines  # extract's first line is one line on purpose, for grep
    too_wide = [line for line in checked if len(line.rstrip()) > width]
    assert not too_wide, "\n".join(too_wide)
    assert not any("…" in line for line in checked), "a cell was cut:\n" + "\n".join(checked)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("render") / "feats.h5"
    fpnx.extract([str(SAMPLES)], out, weights="random", min_size=64, max_size=96, workers=0)
    return out


def test_weights_at_80_columns_are_stacked_with_every_value_whole():
    lines = lines_of(narrow.invoke(app, ["weights"]))
    assert_fits(lines)
    text = "\n".join(lines)
    for entry in fpnx.list_weights():
        assert any(line.strip() == entry.name for line in lines), entry.name  # each name on a line of its own
    assert "FPN: untrained" in text and "stride in: 1x1" in text and "mean / std: 103.53, 116.28, 123.675" in text
    assert "resize: detectron2 rule, 800/1333, padded to 32" in " ".join(text.split())


def test_inspect_and_extract_at_80_columns(features, tmp_path):
    assert_fits(lines_of(narrow.invoke(app, ["inspect", str(features), "--images", "--stats"])))
    result = narrow.invoke(app, ["extract", str(SAMPLES), "--out", str(tmp_path / "x.h5"), "--weights", "random",
                                 "--min-size", "64", "--max-size", "96", "--workers", "0"])
    lines = lines_of(result)
    assert_fits(lines, skip_first=True)
    assert "5 images stored" in lines[0]
    timings = " ".join(" ".join(lines).split("timings (s;", 1)[1].split())
    assert timings.startswith("decode/preprocess summed over workers) decode: ")  # every value keeps its name


def test_bench_at_80_columns():
    result = narrow.invoke(app, ["bench", "--size", "64x96", "--iters", "1", "--warmup", "0", "--device", "cpu",
                                 "--compare", "torchvision", "--pipeline", str(SAMPLES)])
    lines = lines_of(result)
    assert_fits(lines)
    assert any("efficiency:" in line for line in lines)  # the wide end-to-end table came out stacked


def test_a_table_that_fits_stays_a_table_and_one_that_does_not_is_stacked():
    rows = [("p2", "4", "256"), ("p3", "8", "256")]
    wide = Console(width=80, record=True)
    print_table(wide, "levels", ("level", "stride", "channels"), rows)
    assert "┃ level ┃" in wide.export_text()
    tiny = Console(width=20, record=True)
    print_table(tiny, "levels", ("level", "stride", "channels"), rows)
    text = tiny.export_text()
    assert "┃" not in text
    assert "p3 stride: 8; channels: 256" in " ".join(text.split())
    tiny = Console(width=14, record=True)
    print_table(tiny, "timings", ("decode", "model"), [("0.04", "7.38")], left=0)  # no column names the row
    assert " ".join(tiny.export_text().split()) == "timings decode: 0.04; model: 7.38"


def test_help_shows_no_value_after_a_flag():
    for command in ("extract", "inspect", "bench", "weights", "merge"):
        result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        flags = [line for line in result.output.splitlines() if "--json" in line or "--stats" in line]
        assert flags and not any("<bool>" in line for line in flags), flags
