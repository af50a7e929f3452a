"""How soon a resumed run gets going, and what it costs in all: dense float16 P2-P6 stopped by Ctrl-C, resumed.

    python benchmarks/resume.py --images 270 --stop-at 250 [--real-network]

The first run (the stub network of ``host_pipeline.py``, so it is quick) is stopped with a real SIGINT once
``--stop-at`` images are done; the page cache is then written back and dropped where allowed (root), and the same
run is resumed: printed are the seconds to its first progress report (start-up included: model, workers) and to
its end, with the run's own timings (``finalize`` holds what was copied there). ``--real-network`` resumes with
fpnx's real network (random weights), which leaves the writer thread time to spare. Compare checkouts in one
session, runs interleaved: ``PYTHONPATH=/path/to/checkout python benchmarks/resume.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import fpnx
from fpnx.errors import Interrupted

sys.path.insert(0, str(Path(__file__).parent))
from host_pipeline import StubPyramid, make_jpegs, settle_page_cache  # noqa: E402


def interrupt_at(count: int):
    def progress(state) -> None:
        if state.done == count:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as a person would press it

    return progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=270)
    parser.add_argument("--stop-at", type=int, default=250, help="images done when the first run is stopped")
    parser.add_argument("--min-size", type=int, default=480)
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument("--real-network", action="store_true", help="resume with the real network (random weights)")
    parser.add_argument("--workdir", default=None, help="folder on the disk to measure (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = [str(path) for path in make_jpegs(folder, args.images)]
        out = Path(tmp) / "dense.h5"
        options = dict(dtype="float16", min_size=args.min_size, max_size=args.max_size, device="cpu")
        try:
            fpnx.extract(paths, out, model=StubPyramid(), progress=interrupt_at(args.stop_at), **options)
            raise SystemExit("the first run was not interrupted: raise --images")
        except Interrupted as stopped:
            print(stopped)
        settle_page_cache([Path(path) for path in paths])
        model = fpnx.build_model("random") if args.real_network else StubPyramid()
        start, first = time.perf_counter(), []

        def progress(state) -> None:
            if not first:
                first.append(time.perf_counter() - start)

        summary = fpnx.extract(paths, out, model=model, progress=progress, **options)
        total = time.perf_counter() - start
        timings = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in summary.timings.items())
        print(f"resumed {summary.images_already_done} done + {summary.images_stored} new: first progress after "
              f"{first[0]:.2f} s, finished after {total:.2f} s; timings (s): {timings}")


if __name__ == "__main__":
    main()
