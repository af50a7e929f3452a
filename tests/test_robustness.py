"""A million photos, one night: hostile inputs, crashes, kills, signals, full disks and rival runs.

Each kind of hostile input is generated here (tests/hostile_files.py) and extracted next to one good image: the
good one is stored, the hostile one is stored too or recorded as a failure with a one-line reason, and the run
goes on. Real ``python -m fpnx`` subprocesses are SIGKILLed, interrupted and starved of file space; the reruns
must equal an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import fpnx
import fpnx.run.pipeline as pipeline_module
import fpnx.store.merge as merge_module
import hostile_files as hostile
from fpnx.cli import app
from fpnx.errors import Interrupted, StoreError
from fpnx.sources import ImageSource, decoding
from fpnx.loader import ImageLoader, LoadOptions

SIZES = {"min_size": 64, "max_size": 96}
SIZE_OPTIONS = ["--min-size", "64", "--max-size", "96"]
ALLOWED = "not an image in an allowed format (JPEG, PNG, WEBP, BMP, TIFF, GIF, PPM, AVIF, JPEG2000, HEIF)"
CRASHED = "the decoder crashed (its worker process died)"
RESUME = "run the same command again to resume"
runner = CliRunner(env={"COLUMNS": "200"})  # wide: table cells are not wrapped


@pytest.fixture(scope="module")
def model():
    """One random-weights network for the in-process runs (extract folds its norms once; folding again is a no-op)."""
    return fpnx.build_model("random")


def extract(inputs, out, model, **options):
    return fpnx.extract([str(p) for p in inputs], out, model=model, workers=0, device="cpu", **{**SIZES, **options})


def cli_extract(images: Path, out: Path, *options: str):
    return runner.invoke(app, ["extract", str(images), "--out", str(out), "--weights", "random", *SIZE_OPTIONS,
                               "--workers", "0", *options])


def folder(tmp_path: Path, name: str = "images") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def with_good_image(tmp_path: Path, model, make, name: str, **options):
    """Extract a folder holding ``good.png`` and the file ``make(path)`` writes; the good one must be stored."""
    images = folder(tmp_path)
    hostile.photo(images / "good.png")
    make(images / name)
    out = tmp_path / "out.h5"
    summary = extract([images], out, model, **options)
    with fpnx.open_features(out) as reader:
        assert "good.png" in reader.sources
        assert reader.failures == summary.failures  # the file records what the run reported
        stored = list(reader.sources)
    return summary, stored, dict(summary.failures)


# -- the corpus: one test per kind of file -------------------------------------------------------------------------


def test_zero_byte_file_fails(tmp_path, model):
    summary, stored, failed = with_good_image(tmp_path, model, hostile.zero_bytes, "empty.jpg")
    assert stored == ["good.png"] and failed == {"empty.jpg": "empty file"}


@pytest.mark.parametrize("make", [hostile.text_file, hostile.icon_file], ids=["text", "ico"])
def test_non_image_with_an_image_extension_fails(tmp_path, model, make):
    summary, stored, failed = with_good_image(tmp_path, model, make, "fake.jpg")
    assert stored == ["good.png"] and failed == {"fake.jpg": ALLOWED}


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_file_fails_unless_allow_truncated(tmp_path, model, name):
    summary, stored, failed = with_good_image(tmp_path, model, hostile.truncated, name)
    assert stored == ["good.png"]
    assert failed[name].startswith("truncated image data (")
    out = tmp_path / "lenient.h5"
    lenient = extract([tmp_path / "images"], out, model, allow_truncated=True)
    assert lenient.failures == [] and lenient.images_stored == 2
    with fpnx.open_features(out) as reader:
        assert reader.info(name)["height"] == 96 and reader.info(name)["width"] == 128


def test_avif_jpeg2000_and_heic_are_stored_upright_and_broken_ones_reported(tmp_path, model, monkeypatch):
    images = folder(tmp_path)
    hostile.photo(images / "good.png")
    hostile.photo(images / "turned.avif", 40, 56, orientation=6)  # stored 56 wide, shown 40 wide
    hostile.photo(images / "turned.heic", 40, 56, orientation=6)
    hostile.photo(images / "tile.jp2", 40, 56)
    for name in ("cut.avif", "cut.heic", "cut.jp2"):
        hostile.truncated(images / name)
    summary = extract([images], tmp_path / "out.h5", model)
    assert summary.images_stored == 4 and sorted(dict(summary.failures)) == ["cut.avif", "cut.heic", "cut.jp2"]
    assert dict(summary.failures)["cut.heic"].startswith("truncated image data (")
    with fpnx.open_features(tmp_path / "out.h5") as reader:
        sizes = {name: (reader.info(name)["height"], reader.info(name)["width"]) for name in reader.sources}
    assert sizes == {"good.png": (48, 64), "turned.avif": (56, 40), "turned.heic": (56, 40), "tile.jp2": (40, 56)}

    monkeypatch.setattr(decoding, "heif_available", lambda: False)  # as without the optional pillow-heif
    summary = extract([images], tmp_path / "no_heif.h5", model)
    assert summary.images_stored == 3
    assert dict(summary.failures)["turned.heic"] == (
        "a HEIC/HEIF image: reading it needs the optional extra, pip install 'fpnx[heif]'"
    )


def test_decompression_bomb_fails_by_default(tmp_path, model):
    summary, stored, failed = with_good_image(tmp_path, model, hostile.bomb_png, "bomb.png")
    assert stored == ["good.png"]
    assert failed == {"bomb.png": "image is 20000x20000 = 400,000,000 pixels, more than the limit of 178,956,970"}


def test_max_pixels_limit_works_both_ways(tmp_path, model):
    images = folder(tmp_path)
    hostile.one_colour_png(images / "wide.png", 1000, 1500)  # 1.5 Mpixels in a file of a few KB
    strict = extract([images], tmp_path / "strict.h5", model, max_pixels=1_000_000)
    assert strict.failures == [("wide.png", "image is 1500x1000 = 1,500,000 pixels, more than the limit of 1,000,000")]
    assert extract([images], tmp_path / "default.h5", model).images_stored == 1
    assert extract([images], tmp_path / "exact.h5", model, max_pixels=1_500_000).images_stored == 1


@pytest.mark.parametrize(
    "tags",
    [{"compression": 60000}, {"compression": 34712}, {"bits": 7, "samples": 1, "photometric": 1},
     {"photometric": 32844}, {"ifd_offset": 10**6}],
    ids=["unknown-compression", "jpeg2000", "7-bit", "logl", "ifd-past-the-end"],
)
def test_unsupported_or_damaged_tiff_fails(tmp_path, model, tags):
    def make(path):
        hostile.tiff(path.with_name("fine.tif"))  # the same writer with supported tags makes a good TIFF
        hostile.tiff(path, **tags)

    summary, stored, failed = with_good_image(tmp_path, model, make, "odd.tif")
    assert stored == ["fine.tif", "good.png"]
    assert failed["odd.tif"].startswith("not an image in an allowed format: a damaged or unsupported TIFF (")


def test_files_that_vanish_or_change_after_discovery_fail(tmp_path, model, monkeypatch):
    images = folder(tmp_path)
    for name in ("a_good.png", "deleted.png", "emptied.png", "folder.png", "pipe.png", "z_good.png"):
        hostile.photo(images / name)
    real_discover = pipeline_module.discover

    def discover_then_change(inputs, **options):
        found = real_discover(inputs, **options)
        (images / "deleted.png").unlink()
        (images / "emptied.png").write_bytes(b"")
        (images / "folder.png").unlink()
        (images / "folder.png").mkdir()
        (images / "pipe.png").unlink()
        os.mkfifo(images / "pipe.png")  # opening must not wait for a writer
        return found

    monkeypatch.setattr(pipeline_module, "discover", discover_then_change)
    summary = extract([images], tmp_path / "out.h5", model)
    assert summary.images_found == 6 and summary.images_stored == 2
    assert dict(summary.failures) == {
        "deleted.png": "cannot open file: no such file or directory",
        "emptied.png": "empty file",
        "folder.png": "not a regular file",
        "pipe.png": "not a regular file",
    }


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_fails(tmp_path, model):
    def make(path):
        hostile.photo(path)
        path.chmod(0)

    summary, stored, failed = with_good_image(tmp_path, model, make, "secret.png")
    assert failed == {"secret.png": "cannot open file: permission denied"}


def test_hidden_and_appledouble_files_are_skipped_and_reported(tmp_path, model):
    images = folder(tmp_path)
    hostile.photo(images / "good.png")
    hostile.photo(images / ".hidden.png")  # real images, skipped for their names alone
    hostile.photo(images / "._good.png")
    (images / ".thumbnails").mkdir()
    hostile.photo(images / ".thumbnails" / "good.png")
    summary = extract([images], tmp_path / "out.h5", model)
    assert summary.images_found == 1 and summary.images_stored == 1 and summary.failures == []
    assert sorted(summary.skipped) == [
        (str(images / "._good.png"), "AppleDouble metadata file (macOS), not an image"),
        (str(images / ".hidden.png"), "hidden"),
        (str(images / ".thumbnails"), "hidden"),
    ]
    with fpnx.open_features(tmp_path / "out.h5") as reader:
        assert reader.sources == ["good.png"] and reader.failures == []


def test_one_pixel_image_is_stored(tmp_path, model):
    summary, stored, failed = with_good_image(tmp_path, model, lambda p: hostile.photo(p, 1, 1), "dot.png")
    assert failed == {} and sorted(stored) == ["dot.png", "good.png"]
    with fpnx.open_features(tmp_path / "out.h5") as reader:
        info = reader.info("dot.png")
        assert (info["height"], info["width"], info["input_height"], info["input_width"]) == (1, 1, 64, 64)
        features = reader["dot.png"]
        assert features["p2"].shape == (256, 16, 16) and features["p6"].shape == (256, 1, 1)
        assert all(np.isfinite(array).all() for array in features.values())


def test_strips_are_stored(tmp_path, model):
    def make(path):
        hostile.photo(path, 10, 2000, seed=3)
        hostile.photo(path.with_name("tall.png"), 2000, 10, seed=4)

    summary, stored, failed = with_good_image(tmp_path, model, make, "wide.png")
    assert failed == {} and sorted(stored) == ["good.png", "tall.png", "wide.png"]
    with fpnx.open_features(tmp_path / "out.h5") as reader:
        assert (reader.info("wide.png")["input_height"], reader.info("wide.png")["input_width"]) == (1, 96)
        assert (reader.info("tall.png")["input_height"], reader.info("tall.png")["input_width"]) == (96, 1)
        assert reader["wide.png"]["p2"].shape == (256, 1, 24) and reader["tall.png"]["p2"].shape == (256, 24, 1)
        assert all(np.isfinite(a).all() for name in ("wide.png", "tall.png") for a in reader[name].values())


def test_animated_gif_uses_its_first_frame(tmp_path, model):
    rng = np.random.default_rng(5)
    first, second = (rng.integers(0, 4, (40, 56)) for _ in range(2))

    def make(path):
        hostile.animated_gif(path, [first, second])
        hostile.palette_image(first).convert("RGB").save(path.with_name("first.png"))
        hostile.palette_image(second).convert("RGB").save(path.with_name("second.png"))

    summary, stored, failed = with_good_image(tmp_path, model, make, "moving.gif")
    assert failed == {} and len(stored) == 4
    with fpnx.open_features(tmp_path / "out.h5") as reader:
        gif, still_first, still_second = reader["moving.gif"], reader["first.png"], reader["second.png"]
        assert all(np.array_equal(gif[level], still_first[level]) for level in reader.levels)
        assert not np.array_equal(gif["p2"], still_second["p2"])


ODD_NAMES = [
    "with space.png", "hash#1.png", "café ü 日本.png", os.fsdecode(b"raw \xff\xfe.png"), "[red]photo [1].png",
]


def test_odd_names_round_trip(tmp_path, model):
    images = folder(tmp_path)
    for k, name in enumerate(ODD_NAMES):
        hostile.photo(images / name, seed=k)
    out = tmp_path / "out.h5"
    summary = extract([images], out, model)
    assert summary.images_stored == len(ODD_NAMES) and summary.failures == []
    with fpnx.open_features(out) as reader:
        assert sorted(reader.sources) == sorted(ODD_NAMES)
        for name in ODD_NAMES:
            assert np.array_equal(reader[name]["p3"], reader[reader.index_of(name)]["p3"])
    with h5py.File(out, "r") as h5:  # stored as the file system's bytes
        assert sorted(h5["images/source"][:].tolist()) == sorted(os.fsencode(name) for name in ODD_NAMES)


def test_cli_reports_failures_with_odd_names(tmp_path):
    images = folder(tmp_path)
    hostile.photo(images / "good.png")
    for name in ODD_NAMES[-2:]:  # not UTF-8; rich markup
        hostile.text_file(images / name)
    hostile.photo(images / "._good.png")
    result = cli_extract(images, tmp_path / "out.h5")
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "raw \\xff\\xfe.png" in result.stdout and "[red]photo [1].png" in result.stdout  # shown, not markup
    assert "1 images stored, 2 failed, 1 skipped (hidden, not images...; listed by --json)" in result.stdout


# -- decoders that crash -----------------------------------------------------------------------------------------


def test_a_crashing_decoder_costs_one_image(tmp_path, model):
    images = folder(tmp_path)
    names = ["a.png", "b.png", "crash.png", "d.png", "e.png", "f.png"]
    for k, name in enumerate(names):
        hostile.photo(images / name, seed=k)
    sources = [ImageSource(str(images / name), name) for name in names]
    options = LoadOptions(model.preprocessing.replace(**SIZES))
    loader = ImageLoader(sources, options, workers=2, prefetch=4, load=hostile.load_or_get_killed)
    loaded = list(loader)
    assert [item.origin.source for item in loaded] == names  # in order, each once
    assert [item.error for item in loaded] == [None, None, CRASHED, None, None, None]
    assert all(item.pixels.shape == (3, 64, 85) for item in loaded if item.ok)
    assert loader.crashes == 1


# -- exit codes ----------------------------------------------------------------------------------------------------


def test_strict_exits_1_on_any_failure_and_reruns_try_failures_again(tmp_path):
    images = folder(tmp_path)
    hostile.photo(images / "good.png")
    hostile.text_file(images / "bad.png")
    lenient = cli_extract(images, tmp_path / "lenient.h5")
    assert lenient.exit_code == 0, lenient.output  # the run completed; the failure is reported
    assert "bad.png" in lenient.stdout and ALLOWED.split(" (")[0] in lenient.stdout

    out = tmp_path / "strict.h5"
    first = cli_extract(images, out, "--strict")
    assert first.exit_code == 1 and "1 failed" in first.stdout
    again = cli_extract(images, out, "--strict", "--json")  # the same command: the bad file is tried again
    assert again.exit_code == 1
    assert json.loads(again.stdout)["failures"] == [{"source": "bad.png", "reason": ALLOWED}]
    hostile.photo(images / "bad.png", seed=9)  # fixed
    fixed = cli_extract(images, out, "--strict", "--json")
    assert fixed.exit_code == 0, fixed.output
    summary = json.loads(fixed.stdout)
    assert (summary["images_stored"], summary["images_already_done"], summary["failures"]) == (1, 1, [])
    with fpnx.open_features(out) as reader:
        assert sorted(reader.sources) == ["bad.png", "good.png"] and reader.failures == []


# -- real processes: SIGKILL, Ctrl-C, SIGTERM, a rival run, a full disk --------------------------------------------


def command(images: Path, out: Path, *options: str) -> list[str]:
    """``fpnx extract`` committing after every image, so that a test can stop it between commits."""
    return [sys.executable, "-m", "fpnx", "extract", str(images), "--out", str(out), "--weights", "random",
            *SIZE_OPTIONS, "--workers", "0", "--commit-every-s", "1e-4", *options]


def environment(warnings: str = "ignore") -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": warnings, "COLUMNS": "200"}


def start(arguments: list[str], log: Path, warnings: str = "ignore", **options) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=stderr, env=environment(warnings),
                                **options)


def finish(arguments: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, capture_output=True, text=True, env=environment(), timeout=300, **options)


def wait_until_caught(pid: int, signum: int, timeout_s: float = 60.0) -> None:
    """Until process ``pid`` has a handler for ``signum`` (Linux: SigCgt in /proc/PID/status). fpnx's entry point
    takes SIGTERM over first thing; before it runs (Python's start and ``import fpnx``: tens of milliseconds, more
    on a busy machine) a signal ends Python its own way."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never caught signal {signum}")


# 130, or ended by the SIGINT itself, which a shell reports as 130 too (rarely, an interrupt caught while torch is
# imported still ends Python that way: 2 of 24 tries here); a SIGTERM ends the command as Ctrl-C does, with 143
@pytest.mark.parametrize(("signum", "after_s", "codes"), [
    (signal.SIGINT, 0.15, (130, -signal.SIGINT)), (signal.SIGINT, 0.6, (130, -signal.SIGINT)),
    (signal.SIGTERM, 0.4, (143,)), (signal.SIGTERM, 0.8, (143,)),
])  # fmt: skip
def test_a_signal_while_python_imports_the_command_prints_one_line(tmp_path, signum, after_s, codes):
    """Importing torch takes seconds; Ctrl-C or a scheduler's SIGTERM then must not print the traceback of an
    import, nor end the process silently."""
    images = folder(tmp_path)
    photos(images, 2)
    process = start(command(images, tmp_path / "out.h5"), tmp_path / "log")
    wait_until_caught(process.pid, signal.SIGTERM)  # fpnx's entry point runs: from here on, one line
    time.sleep(after_s)
    process.send_signal(signum)
    assert process.wait(timeout=120) in codes
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), lines


def test_json_output_into_a_pipe_leaves_stderr_empty(tmp_path):
    """The progress bar of a --json run is transient: where stderr is no terminal it left an empty line, which
    then stood before an error's one line."""
    images = folder(tmp_path)
    photos(images, 2)
    done = finish([*command(images, tmp_path / "out.h5"), "--json"])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["images_stored"] == 2


def test_once_the_command_is_over_a_ctrl_c_is_ignored_while_python_exits():
    """torch's exit handlers run after the command: a Ctrl-C then would print a traceback from them."""
    script = ("import signal, sys\nimport fpnx.__main__ as entry\nsys.argv = ['fpnx', 'weights', '--json']\n"
              "try:\n    entry.main()\nexcept SystemExit as done:\n    print(done.code)\n"
              "print(signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["0", "True"]


def test_ctrl_c_after_the_output_is_in_place_says_it_is_complete(tmp_path, model, monkeypatch):
    import fpnx.store.writer as writer_module

    images = folder(tmp_path)
    photos(images, 3)
    out = tmp_path / "out.h5"

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "remove_tree", interrupted)  # while the parts folder is being removed
    with pytest.raises(fpnx.Interrupted, match=f"interrupted: {out} is complete; the same command removes"):
        extract([images], out, model)
    monkeypatch.undo()
    with fpnx.open_features(out) as features:
        assert len(features) == 3
    summary = extract([images], out, model)
    assert summary.images_already_done == 3 and not (tmp_path / "out.h5.parts").exists()


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0, interval: float = 0.002) -> None:
    """Poll until ``condition()``; fail if the process ends first (the moment to act on was missed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"fpnx ended (exit {process.returncode}) before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def committed(parts: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(parts) if name.startswith("seg-") and name.endswith(".h5"))
    except FileNotFoundError:
        return []


def kill9(process: subprocess.Popen) -> None:
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL


def stored_in(path: Path) -> list[str]:
    with fpnx.open_features(path) as reader:
        return list(reader.sources)


def photos(images: Path, count: int) -> list[str]:
    names = [f"{k:02d}.png" for k in range(count)]
    for k, name in enumerate(names):
        hostile.photo(images / name, 40 + 3 * k, 64, seed=k)
    return names


def assert_same_features(path: Path, reference: Path) -> None:
    with fpnx.open_features(path) as reader, fpnx.open_features(reference) as expected:
        assert reader.sources == expected.sources
        assert reader.failures == expected.failures
        for i in range(len(expected)):
            assert reader.info(i) == expected.info(i)
            mine, theirs = reader[i], expected[i]
            for level in expected.levels:
                assert np.array_equal(mine[level], theirs[level]), (reader.sources[i], level)


def test_sigkill_at_several_points_then_the_same_command_equals_an_uninterrupted_run(tmp_path):
    images = folder(tmp_path)
    names = photos(images, 12)
    (tmp_path / "reference").mkdir()
    reference = tmp_path / "reference" / "out.h5"
    assert finish(command(images, reference)).returncode == 0
    out, parts, finishing = tmp_path / "out.h5", tmp_path / "out.h5.parts", tmp_path / "out.h5.tmp"
    run = command(images, out)

    # 1. as soon as the first image is committed
    process = start(run, tmp_path / "1.log")
    wait_for(lambda: committed(parts), process)
    kill9(process)
    kept = stored_in(parts)
    assert kept and not out.exists()

    # 2. the same command (decoding in a worker process this time) resumes; killed again after three more commits
    process = start([*run, "--workers", "1"], tmp_path / "2.log", warnings="default")
    wait_for(lambda: len(committed(parts)) >= len(kept) + 3, process)
    helpers = children(process.pid) if CAN_LIST_CHILDREN else []
    kill9(process)
    resumed = stored_in(parts)
    assert resumed[: len(kept)] == kept and len(set(resumed)) == len(resumed) >= len(kept) + 3
    assert wait_until_gone(helpers), "a decoding worker outlived the killed run"
    assert helpers or not CAN_LIST_CHILDREN
    # multiprocessing's resource tracker (one of the helpers) cleaned up after the workers without warning
    assert "leaked" not in (tmp_path / "2.log").read_text()

    # 3. resumed once more, killed as finalize renames the finished file over OUT.h5 (a new output's finalize
    # only adds the tables to OUT.h5.merge.tmp and renames it; test_store kills it before the rename)
    process = start(run, tmp_path / "3.log")
    wait_for(lambda: finishing.exists() or out.exists(), process, interval=0.0002)
    kill9(process)
    if out.exists():  # the rename happened: the output is complete (its parts may be partly deleted)
        assert stored_in(out) == names
    elif parts.is_dir():  # killed before the rename: every image was committed before finalize began
        assert stored_in(parts) == names

    # 4. to the end: nothing is redone, nothing stored twice, and the result is what one run makes
    done = finish([*run, "--json"])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["images_stored"], summary["images_already_done"]) == (0, 12)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.h5")) == ["out.h5"]
    assert stored_in(out) == names
    assert_same_features(out, reference)


def wait_until_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


CAN_LIST_CHILDREN = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error")]


@pytest.mark.skipif(not CAN_LIST_CHILDREN, reason="finds the worker processes in /proc")
def test_ctrl_c_stops_within_seconds_keeps_finished_images_and_says_how_to_resume(tmp_path):
    images = folder(tmp_path)
    names = photos(images, 12)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    # a terminal's Ctrl-C goes to the whole process group, decoding workers included
    process = start(command(images, out, "--workers", "1"), tmp_path / "err.log", start_new_session=True)
    wait_for(lambda: committed(parts), process)
    helpers = children(process.pid)
    assert helpers, "the decoding worker"
    os.killpg(process.pid, signal.SIGINT)
    sent = time.monotonic()
    assert process.wait(timeout=60) == 130
    assert time.monotonic() - sent < 10
    kept = stored_in(parts)
    lines = error_lines((tmp_path / "err.log").read_text())
    assert lines == [f"error: interrupted: {len(kept)} images are kept in {parts}; {RESUME}"]
    assert wait_until_gone(helpers), "a worker outlived the run"

    done = finish([*command(images, out), "--json"])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["images_stored"], summary["images_already_done"]) == (12 - len(kept), len(kept))
    assert stored_in(out) == names


def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """A script's ``fpnx extract ... &`` (no job control) starts with SIGINT ignored, so that a Ctrl-C meant for the
    script leaves the run going: fpnx keeps it ignored, as Python does (SIGTERM still stops it)."""
    images = folder(tmp_path)
    names = photos(images, 12)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    for signum, code in ((signal.SIGINT, 0), (signal.SIGTERM, 143)):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child, as from the shell
        try:
            process = start(command(images, out, "--overwrite"), tmp_path / "err.log")
        finally:
            signal.signal(signal.SIGINT, previous)
        wait_for(lambda: committed(parts), process)
        process.send_signal(signum)
        assert process.wait(timeout=120) == code, (tmp_path / "err.log").read_text()
        if signum == signal.SIGINT:
            assert stored_in(out) == names
        else:
            assert not out.exists() and committed(parts)  # stopped, finished work kept


@pytest.mark.skipif(not CAN_LIST_CHILDREN, reason="finds the worker processes in /proc")
def test_ctrl_c_while_the_workers_start_prints_one_line(tmp_path):
    """Workers import torch for seconds after they start; a terminal's Ctrl-C then reaches them too and must not
    print the traceback of that import from each of them."""
    images = folder(tmp_path)
    photos(images, 12)  # two tasks of images: both workers start at once
    out = tmp_path / "out.h5"
    log = tmp_path / "err.log"
    process = start(command(images, out, "--workers", "2"), log, start_new_session=True)
    wait_for(lambda: len(children(process.pid)) >= 2, process)
    time.sleep(0.5)  # well inside the import of torch, which takes seconds
    helpers = children(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    stderr = log.read_text()
    assert len(stderr.splitlines()) == 1 and error_lines(stderr)[0].startswith("error: interrupted"), stderr
    assert wait_until_gone(helpers), "a worker outlived the run"


def test_sigterm_stops_with_exit_143_and_keeps_finished_images(tmp_path):
    images = folder(tmp_path)
    photos(images, 12)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    process = start(command(images, out), tmp_path / "err.log")
    wait_for(lambda: len(committed(parts)) >= 2, process)
    process.terminate()
    assert process.wait(timeout=60) == 143
    kept = stored_in(parts)
    assert len(kept) >= 2
    lines = error_lines((tmp_path / "err.log").read_text())
    assert lines == [f"error: interrupted: {len(kept)} images are kept in {parts}; {RESUME}"]
    with pytest.raises(StoreError, match=f"left {len(kept)} images in .*run the same command again to resume"):
        fpnx.open_features(out)
    assert not (tmp_path / "out.h5.lock").exists()


def interrupt_after(images: int):
    """A progress callback that presses Ctrl-C (a real SIGINT to this process) once ``images`` are done."""

    def progress(state) -> None:
        if state.done == images:
            os.kill(os.getpid(), signal.SIGINT)

    return progress


def test_interrupted_library_call_raises_interrupted(tmp_path, model):
    images = folder(tmp_path)
    photos(images, 6)
    out = tmp_path / "out.h5"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="images are kept in .*out.h5.parts; run the same command again") as caught:
        extract([images], out, model, progress=interrupt_after(2), commit_every_s=3600)
    assert caught.value.exit_code == 130
    assert len(stored_in(Path(f"{out}.parts"))) >= 2  # the open segment was committed on the way out
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back


@pytest.mark.parametrize("raised", [RuntimeError("enough for today"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_progress_callback_that_raises_stops_the_run_and_keeps_the_work(tmp_path, model, raised):
    """The callback runs in the writer thread: what it raises ends the run in the caller (the thread must go on
    until stopped, or the producer waits forever on a full queue), and the next run resumes."""
    images = folder(tmp_path)
    names = photos(images, 12)
    out = tmp_path / "out.h5"

    def progress(state) -> None:
        if state.done == 2:
            raise raised

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            extract([images], out, model, progress=progress, commit_every_s=3600)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - inspected below
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)  # a hang fails the test instead of stopping the suite
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "extract hung after its progress callback raised"
    expected = Interrupted if isinstance(raised, KeyboardInterrupt) else RuntimeError
    assert isinstance(outcome[0], expected), outcome
    assert outcome[0] is raised or isinstance(outcome[0], Interrupted)
    kept = stored_in(Path(f"{out}.parts"))
    assert len(kept) >= 2 and not out.exists()
    again = extract([images], out, model)
    assert again.images_already_done == len(kept) and again.images_stored == len(names) - len(kept)
    assert sorted(stored_in(out)) == names


def test_ctrl_c_during_finalize_keeps_everything(tmp_path, model, monkeypatch):
    images = folder(tmp_path)
    names = photos(images, 3)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"

    def merge_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # Ctrl-C lands here, while OUT.h5.tmp would be written
        raise AssertionError("not interrupted")

    monkeypatch.setattr(merge_module, "write_merged", merge_interrupted)
    try:
        with pytest.raises(Interrupted, match=f"3 images are kept in {parts}; run the same command again"):
            extract([images], out, model)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during finalize escaped as a bare KeyboardInterrupt")
    monkeypatch.undo()
    assert not out.exists() and stored_in(parts) == names
    again = extract([images], out, model)
    assert (again.images_stored, again.images_already_done) == (0, 3)
    assert stored_in(out) == names


@pytest.mark.parametrize("removed", range(5))
def test_a_cleanup_cut_short_after_finalize_is_finished_by_the_next_run(tmp_path, model, monkeypatch, removed):
    """Ctrl-C (or a kill) while the parts of a finalized run are being deleted, after ``removed`` deletions."""
    images = folder(tmp_path)
    names = photos(images, 4)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    real_unlink = os.unlink
    done = []

    def unlink(path, *args, **kwargs):
        if out.exists():  # finalize renamed OUT.h5.tmp: these are the parts (manifest, 4 segments)
            if len(done) == removed:
                raise KeyboardInterrupt
            done.append(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(Interrupted):
        extract([images], out, model, commit_every_s=1e-4)
    monkeypatch.undo()
    assert parts.is_dir() and stored_in(out) == names
    again = extract([images], out, model)
    assert (again.images_stored, again.images_already_done) == (0, 4)
    assert stored_in(out) == names and sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.h5"]


def test_cli_ctrl_c_outside_the_run_says_how_to_resume(tmp_path, monkeypatch):
    def pressed(inputs, **options):
        raise KeyboardInterrupt  # e.g. while a huge tree of folders is being listed

    monkeypatch.setattr(pipeline_module, "discover", pressed)
    result = cli_extract(folder(tmp_path), tmp_path / "out.h5")
    assert result.exit_code == 130
    assert result.output.strip() == "error: interrupted; run the same command again to resume"


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    images = folder(tmp_path)
    names = photos(images, 8)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    process = start(command(images, out), tmp_path / "err.log")
    try:
        wait_for(lambda: committed(parts), process)
        process.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken, for as long as this test needs
        kept = stored_in(parts)  # a running run's committed work can be read
        expected = f"{out} is being written by another fpnx run (pid {process.pid} on {socket.gethostname()})"
        for extra in ([], ["--overwrite"]):
            rival = cli_extract(images, out, *extra)
            assert rival.exit_code == 1
            assert rival.output.strip().splitlines()[-1] == f"error: {expected}; wait for it or choose another --out"
            assert stored_in(parts)[: len(kept)] == kept  # --overwrite deleted nothing
        looked = runner.invoke(app, ["inspect", str(out)])
        assert looked.exit_code == 1 and "run the same command again to resume" in looked.output
        assert runner.invoke(app, ["inspect", str(parts)]).exit_code == 0
    finally:
        process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=120) == 0
    assert stored_in(out) == names


def test_write_error_is_one_line_and_keeps_what_was_written(tmp_path):
    images = folder(tmp_path)
    hostile.photo(images / "a_strip.png", 10, 300, seed=1)  # a segment of ~100 KB
    hostile.photo(images / "b_strip.png", 300, 10, seed=2)
    hostile.photo(images / "c_square.png", 64, 64, seed=3)  # ~400 KB: past the limit below
    hostile.photo(images / "d_strip.png", 10, 300, seed=4)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"

    def small_files() -> None:  # the kernel refuses to grow a file past 200 KB (EFBIG), as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    failed = finish(command(images, out), preexec_fn=small_files)
    assert failed.returncode == 1
    # the file that grew too large: the blocks of a new output go to OUT.h5.merge.tmp (docs/format.md)
    assert error_lines(failed.stderr) == [
        f"error: cannot write {tmp_path / 'out.h5.merge.tmp'}: File too large; the 2 images written before are "
        "kept; fix that and run the same command again"
    ]
    assert sorted(os.listdir(parts)) == ["manifest.json", "seg-000001.h5", "seg-000002.h5"]
    assert (tmp_path / "out.h5.merge.tmp").exists()  # the committed segments' bytes are there
    assert stored_in(parts) == ["a_strip.png", "b_strip.png"]
    assert not (tmp_path / "out.h5.lock").exists()

    done = finish([*command(images, out), "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images_already_done"] == 2
    assert stored_in(out) == ["a_strip.png", "b_strip.png", "c_square.png", "d_strip.png"]


# -- resuming rules: settings, new inputs, unfinished and damaged outputs ----------------------------------------


def test_other_settings_are_a_clear_error_and_never_a_mixed_file(tmp_path, model):
    images = folder(tmp_path)
    photos(images, 4)
    out = tmp_path / "out.h5"
    extract([images], out, model)
    before = out.read_bytes()
    with pytest.raises(StoreError) as caught:
        extract([images], out, model, min_size=80)
    assert str(caught.value) == (
        f"{out} was made with other settings: 'preprocessing.min_size' is 64 there, 80 in this run; "
        "--overwrite starts anew (or choose another --out)"
    )
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.h5"]

    unfinished = tmp_path / "unfinished.h5"
    with pytest.raises(Interrupted):
        extract([images], unfinished, model, progress=interrupt_after(1), commit_every_s=3600)
    with pytest.raises(StoreError, match=r"unfinished.h5.parts was made with other settings: 'dtype' is 'float32' there, 'float16' in this run"):
        extract([images], unfinished, model, dtype="float16")
    with pytest.raises(StoreError) as caught:  # the levels: in the option's words, not as channels.p2
        extract([images], unfinished, model, levels=["p3", "p4"])
    assert str(caught.value).startswith(f"{unfinished}.parts was made with other settings: 'levels' is ['p2', 'p3', "
                                        "'p4', 'p5', 'p6'] there, ['p3', 'p4'] in this run")
    anew = extract([images], unfinished, model, dtype="float16", overwrite=True)
    assert anew.images_stored == 4 and anew.images_already_done == 0
    with fpnx.open_features(unfinished) as reader:
        assert reader.dtype == "float16" and len(reader) == 4


def test_new_inputs_are_processed_incrementally(tmp_path, model):
    images = folder(tmp_path)
    for k in (0, 2, 4):
        hostile.photo(images / f"{k}.png", seed=k)
    out = tmp_path / "out.h5"
    assert extract([images], out, model).images_stored == 3
    for k in (1, 3):
        hostile.photo(images / f"{k}.png", seed=k)
    more = extract([images], out, model)
    assert (more.images_stored, more.images_already_done) == (2, 3)

    for k in (5, 6, 7, 8):
        hostile.photo(images / f"{k}.png", seed=k)
    with pytest.raises(Interrupted):  # an interrupted incremental run, then more new inputs
        extract([images], out, model, progress=interrupt_after(1), commit_every_s=3600)
    kept = len(stored_in(Path(f"{out}.parts")))
    hostile.photo(images / "9.png", seed=9)
    last = extract([images], out, model)
    assert (last.images_stored, last.images_already_done) == (10 - 5 - kept, 5 + kept)

    whole = tmp_path / "whole.h5"
    extract([images], whole, model)
    with fpnx.open_features(out) as reader, fpnx.open_features(whole) as expected:
        assert reader.sources == ["0.png", "2.png", "4.png", "1.png", "3.png", *(f"{k}.png" for k in range(5, 10))]
        for source in expected.sources:
            assert reader.info(source) == expected.info(source)
            assert all(np.array_equal(reader[source][lv], expected[source][lv]) for lv in expected.levels)


def test_unfinished_output_says_what_to_do_and_its_parts_can_be_read(tmp_path, model):
    images = folder(tmp_path)
    photos(images, 6)
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    with pytest.raises(Interrupted):
        extract([images], out, model, progress=interrupt_after(2), commit_every_s=3600)
    kept = stored_in(parts)
    message = (f"{out} is not finished: an interrupted or running extract left {len(kept)} images in {parts}; "
               f"run the same command again to resume, or open {parts} to read what is done")
    with pytest.raises(StoreError) as caught:
        fpnx.open_features(out)
    assert str(caught.value) == message
    with fpnx.open_features(parts) as reader:
        assert reader[kept[0]]["p2"].shape[0] == 256
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1 and result.output.strip() == f"error: {message}"
    result = runner.invoke(app, ["inspect", str(parts), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == len(kept)


def test_damaged_or_truncated_files_give_one_line_errors(tmp_path, model):
    images = folder(tmp_path)
    photos(images, 2)
    out = tmp_path / "out.h5"
    extract([images], out, model, compression="gzip")
    data = out.read_bytes()
    damaged = {"empty.h5": b"", "text.h5": b"not HDF5\n" * 10, "flipped.h5": data[:4096] + bytes(len(data) - 4096)}
    damaged.update({f"cut{k}.h5": data[: len(data) * k // 100] for k in (1, 10, 50, 90, 99)})
    with h5py.File(out, "r") as h5:  # the index is intact, one compressed chunk of features is not
        chunk = h5["blocks/000001/p2"].id.get_chunk_info(0)
    start, end = chunk.byte_offset + 8, chunk.byte_offset + chunk.size - 8
    garbage = (bytes(range(256)) * ((end - start) // 256 + 1))[: end - start]
    damaged["bad_chunk.h5"] = data[:start] + garbage + data[end:]
    for name, content in damaged.items():
        path = tmp_path / name
        path.write_bytes(content)
        try:  # opens or not, a damaged file never gives garbage, a traceback or a crash
            with fpnx.open_features(path) as reader:
                for i in range(len(reader)):
                    reader[i]
        except StoreError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            result = runner.invoke(app, ["inspect", str(path), "--stats"])
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
            assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
        else:
            pytest.fail(f"{name} read without error")


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory lives in /dev/shm")
def test_shared_memory_is_freed_after_a_run_and_after_kill_9(tmp_path):
    def blocks() -> set[str]:
        return {name for name in os.listdir("/dev/shm") if name.startswith("fpnx-")}

    images = folder(tmp_path)
    photos(images, 12)
    before = blocks()
    assert finish(command(images, tmp_path / "done.h5", "--workers", "1")).returncode == 0
    assert blocks() <= before
    process = start([*command(images, tmp_path / "out.h5"), "--workers", "1"], tmp_path / "kill.log")
    wait_for(lambda: committed(tmp_path / "out.h5.parts"), process)
    kill9(process)
    deadline = time.monotonic() + 20  # Python's resource tracker unlinks the block once the workers are gone
    while not blocks() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert blocks() <= before, blocks() - before
