"""Archives as inputs: webdataset tar shards and zip files read member by member, never extracted.

Every archive here is made by the test: well-formed ones give exactly the features of the same images as loose
files; each kind of bad archive (cut, damaged, repeated names, unsafe names, links, bombs) follows its
documented rule and never stops the run.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import fpnx
import hostile_files as hostile
from fpnx.cli import app
from fpnx.errors import ImageError, UsageError
from fpnx.report.plot import plot_features
from fpnx.sources import ImageSource, decode_image, decode_source, discover
from fpnx.sources.archives import COMPRESSED_TAR_REASON, TRUNCATED_MEMBER, member_byte_limit
from test_robustness import assert_same_features, command, committed, finish, kill9, start, stored_in, wait_for

SIZES = {"min_size": 64, "max_size": 96}
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model():
    return fpnx.build_model("random")


def extract(inputs, out, model, **options):
    return fpnx.extract([str(p) for p in inputs], out, model=model, workers=0, device="cpu", **{**SIZES, **options})


def picture(seed: int, height: int = 24, width: int = 32, image_format: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], links: list[tuple[str, bytes, str]] = ()) -> Path:
    """A plain tar of ``(name, data)`` members in the given order, then ``(name, type, target)`` links."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return path


def write_zip(path: Path, members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about repeated names, which some tests want
        with zipfile.ZipFile(path, "w", method) as archive:
            for name, data in members:
                archive.writestr(name, data)
    return path


def shard_members(first: int, count: int) -> list[tuple[str, bytes]]:
    """A webdataset sample per image: KEY.jpg (a PNG here, lossless), KEY.json, KEY.txt and KEY.cls."""
    members = []
    for key in range(first, first + count):
        members += [(f"{key:09d}.jpg", picture(key, 20 + key % 7, 30)), (f"{key:09d}.json", b'{"w": 30}'),
                    (f"{key:09d}.txt", b"a caption"), (f"{key:09d}.cls", b"3")]
    return members


def loose_copy(folder: Path, members: list[tuple[str, bytes]]) -> Path:
    """The images of ``members`` extracted as files, as tar -x would leave them."""
    for name, data in members:
        if name.endswith((".jpg", ".png")):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return folder


def sources(found) -> list[str]:
    return [image.source for image in found.images]


def reasons(found) -> dict[str, str]:
    return {path: reason for path, reason in found.skipped}


def failures_of(summary) -> dict[str, str]:
    return dict(summary.failures)


# -- listing ------------------------------------------------------------------------------------------------------


def test_webdataset_shards_give_their_images_in_name_order_and_skip_the_rest(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = shard_members(0, 3)
    write_tar(shards / "000001.tar", members[4:] + members[:4])  # not in name order inside the tar
    write_tar(shards / "000000.tar", shard_members(100, 1))
    found = discover([shards])
    assert sources(found) == ["000000.tar/000000100.jpg", "000001.tar/000000000.jpg", "000001.tar/000000001.jpg",
                              "000001.tar/000000002.jpg"]
    image = found.images[1]
    assert image.path == str(shards / "000001.tar") and image.member.name == "000000000.jpg"
    assert pickle.loads(pickle.dumps(image)) == image  # workers receive it
    skipped = reasons(found)
    assert len(skipped) == 12 and set(skipped.values()) == {"not an image file extension"}
    assert skipped[f"{shards}/000001.tar/000000002.cls"] == "not an image file extension"


def test_zip_members_follow_the_folder_rules(tmp_path):
    archive = write_zip(tmp_path / "photos.zip", [
        ("photos/b.png", picture(1)), ("photos/a.png", picture(2)), ("photos/", b""), ("__MACOSX/photos/._a.png", b"x"),
        ("photos/.DS_Store", b"x"), (".cache/c.png", picture(3)), ("photos/inner.zip", b"x"), ("readme.txt", b"x"),
    ])  # fmt: skip
    found = discover([archive])
    assert sources(found) == [f"{archive}/photos/a.png", f"{archive}/photos/b.png"]
    assert reasons(found) == {
        f"{archive}/.cache/c.png": "in a hidden folder",
        f"{archive}/__MACOSX/photos/._a.png": "AppleDouble metadata file (macOS), not an image",
        f"{archive}/photos/.DS_Store": "hidden",
        f"{archive}/photos/inner.zip": "an archive inside an archive is not opened",
        f"{archive}/readme.txt": "not an image file extension",
    }


def test_archives_given_directly_in_lists_and_folders_keep_their_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "more").mkdir(parents=True)
    write_tar(tmp_path / "data" / "a.tar", [("x.png", picture(1))])
    write_zip(tmp_path / "data" / "more" / "b.zip", [("./y.png", picture(2))])  # "./" is dropped, as extracting does
    (tmp_path / "list.txt").write_text("data/more/b.zip\n")
    (tmp_path / "other").mkdir()
    write_tar(tmp_path / "other" / "c.tar", [("z.png", picture(3))])
    hostile.photo(tmp_path / "other" / "c.tar.png")
    found = discover(["data/a.tar", "@list.txt", "other", "data"])
    # in a folder, members sort by their sources among the files: "c.tar.png" < "c.tar/z.png" ('.' < '/')
    assert sources(found) == ["data/a.tar/x.png", "data/more/b.zip/y.png", "c.tar.png", "c.tar/z.png"]
    assert reasons(found) == {"data/a.tar": "same file as data/a.tar", "data/more/b.zip": "same file as data/more/b.zip"}


def test_no_archives_skips_only_the_archives_found_in_folders(tmp_path):
    write_tar(tmp_path / "a.tar", [("x.png", picture(1))])
    (tmp_path / "b.tar.gz").write_bytes(b"\x1f\x8b")
    found = discover([tmp_path], archives=False)
    assert found.images == []
    assert set(reasons(found).values()) == {"archive: not opened (--no-archives)"}
    assert sources(discover([tmp_path / "a.tar"], archives=False)) == [f"{tmp_path}/a.tar/x.png"]


def test_cli_reads_archives_unless_told_not_to_and_refuses_compressed_tars(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    hostile.photo(images / "a.png")
    write_tar(images / "b.tar", shard_members(0, 2))
    arguments = ["--weights", "random", "--min-size", "64", "--max-size", "96", "--workers", "0", "--json"]
    result = runner.invoke(app, ["extract", str(images), "--out", str(tmp_path / "all.h5"), *arguments])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images_stored"] == 3
    result = runner.invoke(app, ["extract", str(images), "--out", str(tmp_path / "no.h5"), "--no-archives", *arguments])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images_stored"] == 1
    assert summary["skipped"] == [{"path": str(images / "b.tar"), "reason": "archive: not opened (--no-archives)"}]
    (tmp_path / "c.tgz").write_bytes(b"\x1f\x8b")
    result = runner.invoke(app, ["extract", str(tmp_path / "c.tgz"), "--out", str(tmp_path / "c.h5"), *arguments])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'c.tgz'}: {COMPRESSED_TAR_REASON}"


def test_members_decode_exactly_as_the_same_files(tmp_path):
    members = [("a.png", picture(1)), ("b.jpg", picture(2, image_format="JPEG")), ("c.bmp", picture(3, image_format="BMP"))]
    loose = tmp_path / "loose"
    loose.mkdir()
    for name, data in members:
        (loose / name).write_bytes(data)
    for archive in (write_tar(tmp_path / "s.tar", members), write_zip(tmp_path / "s.zip", members),
                    write_zip(tmp_path / "stored.zip", members, zipfile.ZIP_STORED),
                    write_zip(tmp_path / "bz.zip", members, zipfile.ZIP_BZIP2),
                    write_zip(tmp_path / "lzma.zip", members, zipfile.ZIP_LZMA)):
        for image in discover([archive]).images:
            expected = decode_image(str(loose / image.member.name))
            decoded = decode_source(image)
            assert np.array_equal(decoded.rgb, expected.rgb) and decoded.format == expected.format, (archive, image)


# -- end to end: the same features as loose files; resuming; adding a shard; kill -9 ------------------------------


def test_shards_and_a_zip_give_the_features_of_the_loose_files(tmp_path, model):
    first, second = shard_members(0, 3), shard_members(3, 2)
    loose = loose_copy(tmp_path / "loose", first + second)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "000000.tar", first)
    write_tar(shards / "000001.tar", second)
    zipped = write_zip(tmp_path / "images.zip", [(f"images/{name}", data) for name, data in first + second])

    reference = extract([loose], tmp_path / "loose.h5", model)
    from_tars = extract([shards], tmp_path / "tars.h5", model)
    from_zip = extract([zipped], tmp_path / "zip.h5", model)
    assert reference.images_stored == from_tars.images_stored == from_zip.images_stored == 5
    assert len(from_tars.skipped) == 15 and from_tars.failures == [] and from_zip.failures == []
    with fpnx.open_features(tmp_path / "loose.h5") as expected:
        for out, prefix in (("tars.h5", None), ("zip.h5", f"{zipped}/images/")):
            with fpnx.open_features(tmp_path / out) as reader:
                for name in expected.sources:
                    shard = "000000.tar" if int(name[:9]) < 3 else "000001.tar"
                    source = f"{shard}/{name}" if prefix is None else prefix + name
                    assert reader.info(source) == {**expected.info(name), "source": source}
                    for level in expected.levels:
                        assert np.allclose(reader[source][level], expected[name][level], rtol=0, atol=1e-6)

    again = extract([shards], tmp_path / "tars.h5", model)  # a second run does nothing
    assert (again.images_stored, again.images_already_done, again.failures) == (0, 5, [])
    write_tar(shards / "000002.tar", shard_members(5, 2))  # a new shard: only its images are added
    more = extract([shards], tmp_path / "tars.h5", model)
    assert (more.images_stored, more.images_already_done) == (2, 5)
    assert stored_in(tmp_path / "tars.h5")[-2:] == ["000002.tar/000000005.jpg", "000002.tar/000000006.jpg"]
    drawn = plot_features(tmp_path / "tars.h5", tmp_path / "fig.png", image="000002.tar/000000005.jpg")
    assert drawn.image_path == str(shards / "000002.tar" / "000000005.jpg")  # inspect's plot finds the member


def test_kill_9_inside_an_archive_then_the_same_command_equals_an_uninterrupted_run(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "000000.tar", shard_members(0, 10))
    (tmp_path / "reference").mkdir()
    reference = tmp_path / "reference" / "out.h5"
    assert finish(command(shards, reference)).returncode == 0
    out, parts = tmp_path / "out.h5", tmp_path / "out.h5.parts"
    process = start(command(shards, out, "--workers", "1"), tmp_path / "1.log")
    wait_for(lambda: len(committed(parts)) >= 2, process)
    kill9(process)
    kept = stored_in(parts)
    assert 2 <= len(kept) < 10 and not out.exists()
    done = finish([*command(shards, out), "--json"])
    assert done.returncode == 0, done.stderr
    assert stored_in(out) == stored_in(reference)
    assert_same_features(out, reference)


# -- bad archives: one rule each -------------------------------------------------------------------------------


def test_compressed_tars_are_refused_with_the_remedy(tmp_path, model):
    with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as tar:
        tar.add(hostile.photo(tmp_path / "a.png"), "a.png")
    with pytest.raises(UsageError) as caught:
        discover([tmp_path / "shard.tar.gz"])
    assert str(caught.value) == f"{tmp_path / 'shard.tar.gz'}: {COMPRESSED_TAR_REASON}"
    (tmp_path / "renamed.tar").write_bytes((tmp_path / "shard.tar.gz").read_bytes())  # gzip behind a .tar name
    summary = extract([tmp_path], tmp_path / "out.h5", model)
    assert summary.images_stored == 1 and failures_of(summary) == {
        "renamed.tar": f"gzip-compressed data: {COMPRESSED_TAR_REASON}",
        "shard.tar.gz": COMPRESSED_TAR_REASON,
    }


def numbered_tar(path: Path, count: int) -> tuple[bytes, dict[str, tarfile.TarInfo]]:
    """A tar of 0.png .. COUNT-1.png: its bytes, and each member's header (offsets of header and data)."""
    write_tar(path, [(f"{k}.png", picture(k)) for k in range(count)])
    with tarfile.open(path) as tar:
        return path.read_bytes(), {info.name: info for info in tar.getmembers()}


def extract_damaged(tmp_path: Path, model, name: str, data: bytes, out: str = "out.h5") -> tuple[list[str], dict]:
    """Extract a folder holding only the archive ``name`` with content ``data``: (stored sources, failures)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / name).write_bytes(data)
    summary = extract([images], tmp_path / out, model)
    return stored_in(tmp_path / out), failures_of(summary)


def test_a_tar_cut_inside_a_member_keeps_the_members_before(tmp_path, model):
    whole, members = numbered_tar(tmp_path / "whole.tar", 4)
    stored, failed = extract_damaged(tmp_path, model, "cut.tar", whole[: members["2.png"].offset_data + 100])
    assert stored == ["cut.tar/0.png", "cut.tar/1.png"]
    assert failed == {"cut.tar/2.png": TRUNCATED_MEMBER}


def test_a_tar_cut_between_members_is_reported(tmp_path, model):
    whole, members = numbered_tar(tmp_path / "whole.tar", 3)
    # it ends right after the second member: no end-of-archive marker
    stored, failed = extract_damaged(tmp_path, model, "cut.tar", whole[: members["2.png"].offset])
    assert stored == ["cut.tar/0.png", "cut.tar/1.png"]
    assert failed == {"cut.tar": "truncated tar archive: it ends after 2 members without tar's end-of-archive "
                                 "marker; any later members are lost"}


def test_a_damaged_tar_header_keeps_the_members_before(tmp_path, model):
    whole, members = numbered_tar(tmp_path / "whole.tar", 3)
    second = members["1.png"].offset
    damaged = whole[:second] + b"\xff" * 100 + whole[second + 100 :]  # the second header's name and checksum
    stored, failed = extract_damaged(tmp_path, model, "bad.tar", damaged)
    assert stored == ["bad.tar/0.png"]
    assert failed == {"bad.tar": f"damaged tar archive: an invalid header at byte {second:,}, after 1 members; "
                                 "members after it cannot be found"}
    stored, failed = extract_damaged(tmp_path, model, "bad.tar", b"no tar at all" * 100, out="junk.h5")
    assert stored == [] and failed["bad.tar"].startswith("not a readable tar archive (")


def test_a_cut_zip_keeps_the_members_before_the_cut(tmp_path, model):
    whole = write_zip(tmp_path / "whole.zip", [(f"{k}.png", picture(k)) for k in range(4)]).read_bytes()
    with zipfile.ZipFile(tmp_path / "whole.zip") as archive:
        third = archive.getinfo("2.png").header_offset
    # the central directory (at the end) is gone: members are found from the start
    stored, failed = extract_damaged(tmp_path, model, "cut.zip", whole[: third + 60])
    assert stored == ["cut.zip/0.png", "cut.zip/1.png"]
    assert failed == {"cut.zip/2.png": TRUNCATED_MEMBER}
    # every member there, the directory cut
    stored, failed = extract_damaged(tmp_path, model, "cut.zip", whole[: whole.rindex(b"PK\x01\x02") + 10], "all.h5")
    assert len(stored) == 4 and list(failed) == ["cut.zip"]
    assert failed["cut.zip"].startswith("damaged zip archive (") and "4 members found" in failed["cut.zip"]


def test_a_damaged_zip_member_fails_alone(tmp_path, model):
    whole = write_zip(tmp_path / "whole.zip", [(f"{k}.png", picture(k)) for k in range(3)]).read_bytes()
    with zipfile.ZipFile(tmp_path / "whole.zip") as archive:
        info = archive.getinfo("1.png")
    start = info.header_offset + 30 + len(info.filename) + 40
    stored, failed = extract_damaged(tmp_path, model, "bad.zip", whole[:start] + bytes(20) + whole[start + 20 :])
    assert stored == ["bad.zip/0.png", "bad.zip/2.png"]
    assert failed["bad.zip/1.png"].startswith("damaged archive member")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_name_used_twice_reads_the_last_member(tmp_path, model, kind):
    members = [("a.png", picture(1)), ("b.png", picture(2)), ("./a.png", picture(3, 30, 20))]
    archive = (write_tar if kind == "tar" else write_zip)(tmp_path / f"dup.{kind}", members)
    found = discover([archive])
    assert sources(found) == [f"{archive}/a.png", f"{archive}/b.png"]
    assert reasons(found) == {f"{archive}/a.png": "name used again by a later member of the archive: the last one "
                                                  "is read, as extracting would leave it"}
    assert decode_source(found.images[0]).rgb.shape == (30, 20, 3)  # the last copy


def test_absolute_and_dotdot_names_are_never_read(tmp_path):
    members = [("/etc/a.png", picture(1)), ("../b.png", picture(2)), ("x/../../c.png", picture(3)),
               ("ok/./d.png", picture(4)), ("x/../e.png", picture(5))]
    for archive in (write_tar(tmp_path / "unsafe.tar", members), write_zip(tmp_path / "unsafe.zip", members)):
        found = discover([archive])
        assert sources(found) == [f"{archive}/ok/d.png"]
        names = {path.removeprefix(f"{archive}/"): reason for path, reason in found.skipped}
        assert names == {"/etc/a.png": "absolute path inside the archive: not read",
                         "../b.png": "path with '..' inside the archive: not read",
                         "x/../../c.png": "path with '..' inside the archive: not read",
                         "x/../e.png": "path with '..' inside the archive: not read"}, archive


def test_links_inside_archives_are_not_followed(tmp_path):
    archive = write_tar(tmp_path / "links.tar", [("a.png", picture(1))],
                        links=[("soft.png", tarfile.SYMTYPE, "/etc/passwd"), ("hard.png", tarfile.LNKTYPE, "a.png")])
    found = discover([archive])
    assert sources(found) == [f"{archive}/a.png"]
    assert reasons(found) == {
        f"{archive}/soft.png": "symbolic link inside the archive (to /etc/passwd): not followed",
        f"{archive}/hard.png": "hard link inside the archive (to a.png): not followed; its target is read under its "
                               "own name",
    }
    zipped = write_zip(tmp_path / "links.zip", [("a.png", picture(1))])
    with zipfile.ZipFile(zipped, "a") as target:
        link = zipfile.ZipInfo("soft.png")
        link.create_system, link.external_attr = 3, (0o120777 << 16)
        target.writestr(link, "/etc/passwd")
    found = discover([zipped])
    assert sources(found) == [f"{zipped}/a.png"]
    assert reasons(found) == {f"{zipped}/soft.png": "symbolic link inside the archive: not followed"}


def test_zip_bombs_are_refused_unread(tmp_path, model):
    limit = member_byte_limit(64 * 64)
    assert limit == 8 * 64 * 64 + 16 * 2**20
    bomb = write_zip(tmp_path / "bomb.zip", [("a.png", picture(1)), ("bomb.png", bytes(limit + 1))])
    assert bomb.stat().st_size < 100_000  # 16 MiB of zeros deflate to a few KB
    summary = extract([bomb], tmp_path / "out.h5", model, max_pixels=64 * 64)
    assert summary.images_stored == 1
    assert failures_of(summary) == {f"{bomb}/bomb.png": f"archive member declares {limit + 1:,} bytes, more than the "
                                    f"limit of {limit:,} for one image (8 bytes per pixel of --max-pixels, plus 16 MiB)"}

    # a member that lies about its size: never inflated past what it declares
    data = bytearray(write_zip(tmp_path / "liar.zip", [("a.png", bytes(100_000))]).read_bytes())
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, 22, 1000)  # uncompressed size in the local header
    struct.pack_into("<I", data, central + 24, 1000)  # and in the central directory
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="holds more data than the 1,000 bytes it declares"):
        decode_source(discover([tmp_path / "liar.zip"]).images[0])

    # two names for the same data (the overlapping-files bomb)
    data = bytearray(write_zip(tmp_path / "overlap.zip", [("a.png", picture(1))]).read_bytes())
    central = data.rindex(b"PK\x01\x02")
    end = data.rindex(b"PK\x05\x06")
    entry = data[central:end]
    copy = entry.replace(b"a.png", b"b.png")
    struct.pack_into("<HHI", data, end + 8, 2, 2, len(entry) * 2)  # entries on this disk, in all, directory size
    (tmp_path / "overlap.zip").write_bytes(bytes(data[:end] + copy + data[end:]))
    found = discover([tmp_path / "overlap.zip"])
    for image in found.images:
        with pytest.raises(ImageError, match="overlaps another member's"):
            decode_source(image)


def test_a_member_changed_after_listing_fails_alone(tmp_path):
    archive = write_tar(tmp_path / "a.tar", [("a.png", picture(1)), ("b.png", picture(2))])
    found = discover([archive])
    archive.write_bytes(archive.read_bytes()[:1024])
    with pytest.raises(ImageError, match="the archive ends inside this member"):
        decode_source(found.images[1])
    archive.unlink()
    with pytest.raises(ImageError, match="cannot open file: no such file"):
        decode_source(ImageSource(str(archive), "a.tar/a.png", found.images[0].member))
