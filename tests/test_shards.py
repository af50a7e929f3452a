"""Sharded extraction: torchrun with 2 CPU processes, --shard + merge, missing/unfinished shards, a killed rank.

Every path ends in a comparison with one single-process run on the same images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import fpnx
from fpnx.cli import app
from fpnx.run.torchrun import launched
from fpnx.store import merge_shards
from fpnx.store.shards import Shard, shard_of, shard_path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
IMAGES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
COMMON = dict(weights="random", min_size=64, max_size=96, workers=0, device="cpu")
CLI_COMMON = ["--weights", "random", "--min-size", "64", "--max-size", "96", "--workers", "0", "--device", "cpu"]
COMMIT_EVERY_IMAGE = ["--commit-every-s", "0.000001"]  # a durable segment after every image
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
runner = CliRunner()


def read_all(path: Path) -> dict[str, dict[str, np.ndarray]]:
    with fpnx.open_features(path) as features:
        sources = features.sources
        assert len(sources) == len(set(sources)), "a source is stored twice"
        return {source: features[source] for source in sources}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """One single-process run on the sample photos: what every sharded run must equal."""
    out = tmp_path_factory.mktemp("single") / "single.h5"
    fpnx.extract([SAMPLES], out, **COMMON)
    return read_all(out)


def assert_matches(path: Path, reference: dict, sources=None) -> None:
    stored = read_all(path)
    expected = sorted(reference if sources is None else sources)
    assert sorted(stored) == expected
    for source in expected:
        for level, ref in reference[source].items():
            got = stored[source][level]
            assert got.shape == ref.shape, (source, level)
            error = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
            assert error <= 1e-5, (source, level, error)  # oneDNN varies ~1e-6 with the thread count


def leftovers(folder: Path, out: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != out)


def copy_images(folder: Path, names) -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(SAMPLES / name, folder / name)


def test_torchrun_two_cpu_processes_equal_one(reference, tmp_path):
    out = tmp_path / "feats.h5"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fpnx", "extract", str(SAMPLES), "--out", str(out), *CLI_COMMON, "--json"]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)  # one summary: rank 0 reports for both, rank 1 is quiet
    assert (summary["out"], summary["device"], summary["images_stored"]) == (str(out), "2 x cpu", 5)
    assert leftovers(tmp_path, out) == []  # shard files, parts and locks are gone
    assert_matches(out, reference)
    with fpnx.open_features(out) as features:
        metadata = features.attrs["metadata"]
        assert "shard" not in metadata and metadata["shards"]["count"] == 2
    inspected = runner.invoke(app, ["inspect", str(out), "--json"])  # one file, one collection
    assert inspected.exit_code == 0, inspected.output
    assert (json.loads(inspected.stdout)["images"], json.loads(inspected.stdout)["files"]) == (5, 1)
    with h5py.File(out, "r") as plain:
        assert len(plain["images"]["source"]) == 5 and len(plain["blocks"]) >= 1
    # the merged file has a single-process file's settings: a plain run resumes it and finds nothing to do
    again = fpnx.extract([SAMPLES], out, **COMMON)
    assert (again.images_stored, again.images_already_done) == (0, 5)


def test_split_is_stable_disjoint_and_complete():
    names = [f"dir{i % 7}/img_{i}.jpg" for i in range(2000)] + ["caf\udce9.png", "ünïcode/ß.webp"]
    for count in (1, 2, 3, 8):
        shards = [Shard(index, count) for index in range(count)]
        owners = {name: [s.index for s in shards if s.owns(name)] for name in names}
        assert all(len(found) == 1 for found in owners.values())  # each name in exactly one shard
        assert all(owners[name][0] == shard_of(name, count) for name in names)
        if count > 1:  # roughly even
            sizes = np.bincount([shard_of(name, count) for name in names], minlength=count)
            assert sizes.min() > 0.8 * len(names) / count
    # by name, not by position: the same name lands in the same shard whatever else is there
    assert shard_of("a/b.jpg", 4) == shard_of("a/b.jpg", 4) == (
        int.from_bytes(__import__("hashlib").sha1(b"a/b.jpg").digest()[:8], "big") % 4)
    assert shard_path(Path("/x/feats.h5"), Shard(3, 12)) == Path("/x/feats.shard-00003-of-00012.h5")


@pytest.mark.parametrize("text", ["3/2", "a/b", "0/0", "2/2", "-1/2", "1", "1/2/3"])
def test_bad_shard_is_a_usage_error(tmp_path, text):
    with pytest.raises(fpnx.UsageError, match="I/N"):
        Shard.parse(text)
    result = runner.invoke(app, ["extract", str(SAMPLES), "--out", str(tmp_path / "f.h5"), "--shard", text])
    assert result.exit_code == 2, result.output
    assert "--shard must be I/N" in result.output and "Traceback" not in result.output


def test_shard_option_is_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched().shard == Shard(1, 2)
    with pytest.raises(fpnx.UsageError, match="--shard cannot be combined with torchrun"):
        fpnx.extract([str(SAMPLES)], tmp_path / "f.h5", weights="random", shard="0/2")
    assert list(tmp_path.iterdir()) == []


def test_shards_then_merge_equal_one_run(reference, tmp_path):
    out = tmp_path / "feats.h5"
    result = runner.invoke(app, ["extract", str(SAMPLES), "--out", str(out), "--shard", "0/2", *CLI_COMMON, "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    second = fpnx.extract([SAMPLES], out, shard="1/2", **COMMON)
    assert first["out"] == str(shard_path(out, Shard(0, 2))) and second.out == str(shard_path(out, Shard(1, 2)))
    assert not out.exists()
    for index in (0, 1):  # each shard holds exactly the images that hash to it
        stored = read_all(shard_path(out, Shard(index, 2)))
        assert sorted(stored) == sorted(name for name in IMAGES if shard_of(name, 2) == index)
    assert first["images_stored"] + second.images_stored == len(IMAGES)
    result = runner.invoke(app, ["merge", "--out", str(out)])  # finds the shards next to --out
    assert result.exit_code == 0, result.output
    assert f"{len(IMAGES)} images ({len(IMAGES)} added from 2 of 2 shards)" in result.stdout
    assert leftovers(tmp_path, out) == []
    assert_matches(out, reference)
    named = [str(shard_path(out, Shard(index, 2))) for index in (0, 1)]
    for again in ([], named):  # again (a retried job step), as before or naming the shards: nothing to do
        result = runner.invoke(app, ["merge", *again, "--out", str(out)])
        assert result.exit_code == 0 and f"{len(IMAGES)} images, already merged from its 2 shards" in result.stdout
        result = runner.invoke(app, ["merge", *again, "--out", str(out), "--json"])
        report = json.loads(result.stdout)
        assert (report["nothing_to_do"], report["merged"], report["images_added"]) == (True, [], 0)
        assert report["already_merged"] == named  # the shards it absorbed, by name (their files are gone)
    wrong_split = [str(shard_path(out, Shard(index, 3))) for index in (0, 1, 2)]
    result = runner.invoke(app, ["merge", *wrong_split, "--out", str(out)])  # files named that are not there
    assert result.exit_code == 2 and "shard 0/3 is missing" in result.output
    result = runner.invoke(app, ["merge", str(tmp_path / "typo.h5"), "--out", str(out)])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'typo.h5'} does not exist"
    assert_matches(out, reference)
    plain = tmp_path / "plain.h5"
    fpnx.extract([SAMPLES], plain, **COMMON)  # not made by a merge: no shards of it is still an error
    result = runner.invoke(app, ["merge", "--out", str(plain)])
    assert result.exit_code == 1 and "plain.h5 is a finished file: nothing to merge into it" in result.output


def test_a_merged_file_records_the_command_that_adds_to_it(tmp_path):
    out = tmp_path / "feats.h5"
    for index, shard in enumerate(("--shard 0/2", "--shard=1/2")):
        fpnx.extract([SAMPLES], out, shard=(index, 2), command=f"fpnx extract photos --out {out} {shard} --json",
                     **COMMON)
    merge_shards(out=out)
    with fpnx.open_features(out) as reader:  # the first shard's command without --shard: a plain run adds to out
        assert reader.metadata["command"] == f"fpnx extract photos --out {out} --json"


def test_missing_shard_is_named_and_nothing_is_merged(tmp_path):
    out = tmp_path / "feats.h5"
    fpnx.extract([SAMPLES], out, shard=(1, 2), **COMMON)
    present = shard_path(out, Shard(1, 2))
    missing = r"shard 0/2 is missing: .*feats\.shard-00000-of-00002\.h5 does not exist"
    with pytest.raises(fpnx.StoreError, match=missing):
        merge_shards(out=out)
    result = runner.invoke(app, ["merge", str(present), "--out", str(out)])  # named explicitly: the same
    assert result.exit_code == 1
    assert "shard 0/2 is missing" in result.output and "--shard 0/2" in result.output
    assert len(result.output.strip().splitlines()) == 1
    named = runner.invoke(app, ["merge", str(shard_path(out, Shard(0, 2))), str(present), "--out", str(out)])
    assert named.exit_code == 2 and "shard 0/2 is missing" in named.output  # a file named that is not there
    assert not out.exists() and present.exists()
    with pytest.raises(fpnx.StoreError, match="split 2 ways, this one is split 3 ways"):
        fpnx.extract([SAMPLES], out, shard="0/3", **COMMON)
    three = tmp_path / "three.h5"
    fpnx.extract([SAMPLES], three, shard="1/3", **COMMON)
    with pytest.raises(fpnx.StoreError, match=r"shard 0/3 is missing: .* \(2 of 3 shards are not ready: 0/3, 2/3\)"):
        merge_shards(out=three)


CHILD = """
import os, sys, time
from fpnx.store.writer import FeatureWriter
add = FeatureWriter.add
def add_then_hang(self, *args, **kwargs):
    add(self, *args, **kwargs)
    time.sleep(120)  # the test kills this process here, after the first committed segment
if os.environ.get("RANK", "1") == "1":  # the --shard 1/2 process, or rank 1 of torchrun
    FeatureWriter.add = add_then_hang
from fpnx.cli import main
sys.argv = ["fpnx", *sys.argv[1:]]
main()
"""


def wait_for_segment(parts: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list(parts.glob("seg-*.h5")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert list(parts.glob("seg-*.h5")), "no segment was committed within 120 s"


def test_killed_shard_is_refused_then_rerun_completes_it(reference, tmp_path):
    out = tmp_path / "feats.h5"
    fpnx.extract([SAMPLES], out, shard="0/2", **COMMON)
    arguments = ["extract", str(SAMPLES), "--out", str(out), "--shard", "1/2", *CLI_COMMON, *COMMIT_EVERY_IMAGE]
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), *arguments], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = Path(str(shard_path(out, Shard(1, 2))) + ".parts")
    wait_for_segment(parts, child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not shard_path(out, Shard(1, 2)).exists() and len(list(parts.glob("seg-*.h5"))) == 1
    with pytest.raises(fpnx.StoreError) as refused:  # a merged view never includes part of a shard
        merge_shards(out=out)
    message = str(refused.value)
    assert "shard 1/2 is unfinished" in message and "holds 1 images" in message
    assert "rerun `fpnx extract" in message and "--shard 1/2" in message
    assert not out.exists()
    result = runner.invoke(app, [*arguments, "--json"])  # the same command again
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    mine = sum(shard_of(name, 2) == 1 for name in IMAGES)
    assert (summary["images_already_done"], summary["images_stored"]) == (1, mine - 1)
    merged = merge_shards(out=out)
    assert merged.images == len(IMAGES) and leftovers(tmp_path, out) == []
    assert_matches(out, reference)


def test_incremental_runs_after_a_merge(reference, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "feats.h5"
    copy_images(folder, IMAGES[:3])
    for index in (0, 1):
        fpnx.extract([folder], out, shard=(index, 2), **COMMON)
    merge_shards(out=out)
    assert_matches(out, reference, IMAGES[:3])

    copy_images(folder, IMAGES[3:4])
    runs = [fpnx.extract([folder], out, shard=(index, 2), **COMMON) for index in (0, 1)]
    assert sum(run.images_stored for run in runs) == 1  # only the new image is extracted
    assert sum(run.images_already_done for run in runs) == 3
    shards = [shard_path(out, Shard(index, 2)) for index in (0, 1)]
    kept = tmp_path / "kept"
    kept.mkdir()
    for shard in shards:
        shutil.copy(shard, kept / shard.name)
    merged = merge_shards(out=out)
    assert (merged.images, merged.images_added) == (4, 1)
    assert_matches(out, reference, IMAGES[:4])

    # a merge killed after its rename, before removing the shards: the shards are already in OUT.h5
    for shard in shards:
        shutil.copy(kept / shard.name, shard)
    again = merge_shards(out=out)
    assert (again.images, again.images_added, len(again.already_merged)) == (4, 0, 2)
    assert not any(shard.exists() for shard in shards)
    for shard in shards:  # same state once more; an extract run now drops them before working
        shutil.copy(kept / shard.name, shard)
    identity = os.stat(out).st_ino
    runs = [fpnx.extract([folder], out, shard=(index, 2), **COMMON) for index in (0, 1)]
    assert sum(run.images_stored for run in runs) == 0
    result = runner.invoke(app, ["merge", "--out", str(out), "--json"])
    empty = json.loads(result.stdout)
    assert (empty["images_added"], empty["already_merged"], empty["nothing_new"]) == (0, [], [str(s) for s in shards])
    assert os.stat(out).st_ino == identity  # nothing new: the merged file was not rewritten
    assert_matches(out, reference, IMAGES[:4])


def test_torchrun_rank_killed_then_same_command_completes(reference, tmp_path):
    out = tmp_path / "feats.h5"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(CHILD))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    arguments = ["extract", str(SAMPLES), "--out", str(out), *CLI_COMMON, *COMMIT_EVERY_IMAGE, "--json"]
    job = subprocess.Popen([*launcher, str(child), *arguments], env=ENV, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard = shard_path(out, Shard(1, 2))
    wait_for_segment(Path(f"{shard}.parts"), job)
    rank1 = int(Path(f"{shard}.lock").read_text().split()[1])  # "pid N on HOST", written by the shard's writer
    os.kill(rank1, signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert not out.exists() and not shard.exists()  # nothing half-merged
    assert len(list(Path(f"{shard}.parts").glob("seg-*.h5"))) == 1
    again = subprocess.run([*launcher, "-m", "fpnx", *arguments], capture_output=True, text=True, env=ENV,
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["images_already_done"] >= 1  # at least the committed segment of the killed rank
    assert summary["images_already_done"] + summary["images_stored"] == len(IMAGES)
    assert leftovers(tmp_path, out) == ["child.py"]
    assert_matches(out, reference)
