"""Pooled vectors (--pool avg|max, --no-maps): equal to pooling the stored maps, small, and carried through kill -9
+ resume, shards and merges; files without them read as before."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import fpnx
from fpnx.cli import app
from fpnx.store import merge_shards

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
COMMON = {"weights": "random", "min_size": 64, "max_size": 96, "workers": 0}
CLI = ["--weights", "random", "--min-size", "64", "--max-size", "96", "--workers", "0"]


def pooled_of(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{source: {level: vector}} of a file, whatever its row order."""
    with fpnx.open_features(path) as reader:
        vectors = {level: reader.pooled(level) for level in reader.levels}
        return {source: {level: vectors[level][i] for level in reader.levels} for i, source in enumerate(reader.sources)}


@pytest.fixture(scope="module")
def with_maps(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pooled") / "avg.h5"
    fpnx.extract([SAMPLES], out, pool="avg", **COMMON)
    return out


def test_avg_is_the_mean_of_the_stored_float32_maps(with_maps):
    with fpnx.open_features(with_maps) as reader:
        assert reader.pool == "avg" and reader.has_maps and len(reader) == 5
        for level in reader.levels:
            pooled = reader.pooled(level)
            assert pooled.shape == (5, 256) and pooled.dtype == np.float32
            means = np.stack([reader[i][level].astype(np.float64).mean(axis=(1, 2)) for i in range(len(reader))])
            assert np.abs(pooled - means).max() <= 1e-5 * np.abs(means).max(), level


def test_max_is_computed_before_the_float16_cast(tmp_path):
    out = tmp_path / "max.h5"
    fpnx.extract([SAMPLES], out, pool="max", dtype="float16", levels=["p3", "p5"], **COMMON)
    float32 = tmp_path / "f32.h5"
    fpnx.extract([SAMPLES], float32, dtype="float32", levels=["p3", "p5"], **COMMON)
    with fpnx.open_features(out) as reader, fpnx.open_features(float32) as exact:
        for level in ("p3", "p5"):
            expected = np.stack([exact[i][level].max(axis=(1, 2)) for i in range(len(exact))])
            assert np.array_equal(reader.pooled(level), expected)  # the float32 values, not float16 ones
            stored = np.stack([reader[i][level].astype(np.float32).max(axis=(1, 2)) for i in range(len(reader))])
            assert not np.array_equal(stored, expected)


def test_no_maps_is_small_reads_back_and_refuses_map_reads(with_maps, tmp_path):
    out = tmp_path / "vectors.h5"
    result = CliRunner().invoke(app, ["extract", str(SAMPLES), "--out", str(out), "--pool", "avg", "--no-maps", *CLI])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size < 0.1 * with_maps.stat().st_size
    assert pooled_of(out).keys() == pooled_of(with_maps).keys()
    for source, vectors in pooled_of(out).items():
        for level, vector in vectors.items():
            assert np.array_equal(vector, pooled_of(with_maps)[source][level])
    with h5py.File(out) as h5:
        assert h5.attrs["format_version"] == 2 and h5.attrs["maps"] == 0 and len(h5["blocks"]) == 0
    with fpnx.open_features(out) as reader:
        assert not reader.has_maps
        with pytest.raises(fpnx.UsageError, match="no feature maps"):
            reader[0]
    with pytest.raises(fpnx.UsageError, match="no feature maps"):
        fpnx.FeatureDataset(out)
    shown = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert shown["pool"] == "avg" and shown["maps"] is False and shown["images"] == 5
    shown = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--stats", "--image", "1", "--json"]).stdout)
    with fpnx.open_features(out) as reader:  # --stats describes the vectors of a file that holds only those
        for row, level in zip(shown["stats"], reader.levels):
            vector = reader.pooled(level)[1].astype(np.float64)
            assert row["name"] == level and row["count"] == vector.size
            assert np.isclose(row["mean"], vector.mean(), rtol=1e-12) and row["max"] == vector.max()
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["inspect", str(out), "--stats"])
    assert table.exit_code == 0 and "statistics of the pooled vectors (all images" in table.output
    refused = CliRunner().invoke(app, ["extract", str(SAMPLES), "--out", str(tmp_path / "x.h5"), "--no-maps", *CLI])
    assert refused.exit_code == 2 and "--no-maps stores pooled vectors only" in refused.output


def test_a_file_without_pooled_vectors_reads_as_before_and_says_so(tmp_path):
    old = Path(__file__).parent / "data" / "written-by-fpnx-0.1.h5"
    with fpnx.open_features(old) as reader:
        assert reader.pool is None and reader.has_maps and reader[0]["p5"].shape[0] == 256
        with pytest.raises(fpnx.UsageError, match="stores no pooled vectors"):
            reader.pooled("p5")


def test_pooled_vectors_survive_kill_9_and_resume(with_maps, tmp_path):
    out = tmp_path / "out.h5"
    command = [sys.executable, "-m", "fpnx", "extract", str(SAMPLES), "--out", str(out), "--pool", "avg",
               "--commit-every-s", "1e-4", *CLI]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "out.h5.parts"
    while not list(parts.glob("seg-*.h5")) and process.poll() is None:
        time.sleep(0.001)
    process.kill()
    process.wait(timeout=30)
    assert not out.exists() and list(parts.glob("seg-*.h5")), "the run was not caught between two commits"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert pooled_of(out).keys() == pooled_of(with_maps).keys()
    for source, vectors in pooled_of(out).items():
        for level, vector in vectors.items():
            assert np.array_equal(vector, pooled_of(with_maps)[source][level])


def test_pooled_vectors_go_through_shards_and_their_merge(with_maps, tmp_path):
    out = tmp_path / "feats.h5"
    for shard in ("0/2", "1/2"):
        fpnx.extract([SAMPLES], out, pool="avg", shard=shard, **COMMON)
    merge_shards(out=out)
    merged = pooled_of(out)
    assert merged.keys() == pooled_of(with_maps).keys()
    for source, vectors in merged.items():
        for level, vector in vectors.items():
            assert np.abs(vector - pooled_of(with_maps)[source][level]).max() <= 1e-5 * np.abs(vector).max()
