"""Images/s decoded from a tar shard and from a zip against the same images as loose files, in one run.

    python benchmarks/read_archives.py --images 200 --rounds 5

Makes 640x480 JPEGs from the sample photos and stores them three ways: loose files in a folder, one
webdataset-style tar shard (each image beside a .json and a .txt member) and one zip (stored, as image zips
usually are; --zip-method deflate compresses it). Each round lists the three inputs with ``discover``, then reads
and decodes every image with ``decode_source``, as a worker does, in this one process: image k from the folder,
from the tar, from the zip, then image k + 1, so the machine's noise falls on the three alike. Printed: images/s
of each over all rounds, the ratios archive / loose (the result: 1.00 means reading from the archive costs
nothing), and what listing took (median). The files sit in the page cache after the warm-up round, so this
measures fpnx's reading, not the disk.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from bench_extract import make_jpegs

from fpnx.sources import decode_source, discover


def make_inputs(root: Path, count: int, zip_method: int) -> dict[str, Path]:
    loose = root / "loose"
    loose.mkdir()
    paths = make_jpegs(loose, count)
    shard = root / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        for path in paths:
            tar.add(path, path.name)
            for suffix, data in ((".json", b'{"width": 640, "height": 480}'), (".txt", b"a caption")):
                info = tarfile.TarInfo(path.stem + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    archive = root / "images.zip"
    with zipfile.ZipFile(archive, "w", zip_method) as target:
        for path in paths:
            target.write(path, f"images/{path.name}")
    return {"loose": loose, "tar": shard, "zip": archive}


def one_round(inputs: dict[str, Path], listing: dict[str, list[float]], decoding: dict[str, float]) -> None:
    """List each input, then decode image k of each in turn; add the times to ``listing`` and ``decoding``."""
    found = {}
    for name, source in inputs.items():
        started = time.perf_counter()
        found[name] = discover([source]).images
        listing[name].append(time.perf_counter() - started)
    counts = {len(images) for images in found.values()}
    assert len(counts) == 1, {name: len(images) for name, images in found.items()}
    for index in range(counts.pop()):
        for name, images in found.items():
            started = time.perf_counter()
            decode_source(images[index])
            decoding[name] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--zip-method", choices=["stored", "deflate"], default="stored")
    args = parser.parse_args()
    method = zipfile.ZIP_STORED if args.zip_method == "stored" else zipfile.ZIP_DEFLATED

    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.images, method)
        one_round(inputs, {name: [] for name in inputs}, dict.fromkeys(inputs, 0.0))  # warm-up: page cache, plugins
        listing: dict[str, list[float]] = {name: [] for name in inputs}
        decoding = dict.fromkeys(inputs, 0.0)
        for _ in range(args.rounds):
            one_round(inputs, listing, decoding)

    rate = {name: args.images * args.rounds / seconds for name, seconds in decoding.items()}
    print(f"{args.images} JPEGs 640x480, {args.rounds} rounds, one process; zip {args.zip_method}")
    for name in inputs:
        print(f"{name:6s} {rate[name]:8.1f} images/s read and decoded   listing {statistics.median(listing[name]) * 1e3:7.2f} ms")
    print(f"tar / loose  {rate['tar'] / rate['loose']:.3f}")
    print(f"zip / loose  {rate['zip'] / rate['loose']:.3f}")


if __name__ == "__main__":
    main()
