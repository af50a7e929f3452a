"""The ``fpnx`` command: declare the options, call the library, render the result (:mod:`fpnx.render`).

One error handler for every command: a library error (:class:`~fpnx.errors.FpnxError`) prints one line and exits
with its code (2 for usage errors), never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from . import render
from .errors import FpnxError, Interrupted, UsageError
from .loader import DEFAULT_TIMEOUT_S
from .models.weights import DEFAULT_WEIGHTS
from .sources import DEFAULT_MAX_PIXELS
from .store.shards import as_shard

try:  # the click that typer raises from: its own copy in recent typer
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors
NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())  # click < 8.2 prints the help itself


class _Commands(TyperGroup):
    """Every command runs inside the one error handler, also under ``typer.testing.CliRunner``."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Command-line mistakes (an unknown option, a missing value) print one line too, with exit code 2; click
        would print a box of several. ``fpnx`` alone, or a command without arguments, prints its help."""
        try:
            with warnings.catch_warnings():
                warnings.showwarning = render.print_warning
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as error:
            error.show()
            code = error.exit_code
        except click_errors.UsageError as error:
            where = f"; see '{error.ctx.command_path} --help'" if error.ctx is not None else ""
            render.print_error(UsageError(f"{error.format_message().rstrip('.')}{where}"))
            code = error.exit_code
        except click_errors.ClickException as error:
            render.print_error(FpnxError(error.format_message()))
            code = error.exit_code
        except typer.Abort:
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FpnxError as error:
            render.print_error(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:  # before or after the part of a run that reports what it kept
            # (SIGTERM arrives as fpnx.__main__.Terminated, with its number)
            stopped = Interrupted("interrupted; run the same command again to resume",
                                  getattr(interrupt, "signum", signal.SIGINT))
            render.print_error(stopped)
            raise typer.Exit(stopped.exit_code) from None


app = typer.Typer(
    cls=_Commands,
    help="Turn folders of images into exact ResNet + FPN feature maps (P2-P6) stored in HDF5.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point."""
    app()


def _flag(*names: str, help: str) -> Any:  # noqa: A002 - typer's name
    """A boolean option: nothing follows it, so its help shows no value (typer's default shows ``<bool>``)."""
    return typer.Option(*names, help=help, metavar="")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


@app.command()
def extract(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or @list.txt files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output HDF5 file.")],
    weights: Annotated[str, typer.Option(help="Catalogue name (see `fpnx weights`), a local checkpoint, or 'random'.")] = DEFAULT_WEIGHTS,
    depth: Annotated[Optional[int], typer.Option(help="ResNet depth; default: what the weights hold.")] = None,
    bn_eps: Annotated[Optional[float], typer.Option(help="Frozen batch-norm epsilon; default: what the weights need.")] = None,
    levels: Annotated[str, typer.Option(help="Comma-separated levels to store.")] = "p2,p3,p4,p5,p6",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (same padded size only).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 (IEEE, TF32 off), bf16, fp16 (overflow falls back to fp32) or tf32 (CUDA TF32 on).")] = "fp32",
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes; 0 decodes in this process. [default: 1 on the CPU, cores - 1 (at most 8) on a GPU]")] = None,
    min_size: Annotated[int, typer.Option(help="Shorter side after resizing.")] = 800,
    max_size: Annotated[int, typer.Option(help="Cap on the longer side after resizing.")] = 1333,
    pixel_order: Annotated[Optional[str], typer.Option(help="RGB or BGR; default: what the weights need.")] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 or float16.")] = "float32",
    compression: Annotated[str, typer.Option(help="none, lzf or gzip.")] = "none",
    overwrite: Annotated[bool, _flag(help="Start anew instead of resuming.")] = False,
    allow_truncated: Annotated[bool, _flag(help="Decode what is there of truncated files.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels (decompression bombs).")] = DEFAULT_MAX_PIXELS,
    decode_timeout: Annotated[float, typer.Option(help="Seconds an image may take to decode and resize in a worker before it is stopped and recorded as failed; 0: no limit.")] = DEFAULT_TIMEOUT_S,
    archives: Annotated[bool, _flag("--archives/--no-archives", help="Read the images inside .tar and .zip files found in folders (given ones are always read).")] = True,
    strict: Annotated[bool, _flag(help="Exit 1 if any image failed.")] = False,
    commit_every_s: Annotated[Optional[float], typer.Option(hidden=True, help="Advanced: seconds between commits of finished images (default 10); a crash loses at most this much work.")] = None,
    pool: Annotated[Optional[str], typer.Option(help="Also store each image's per-channel avg or max over each level (vectors for retrieval, probes).")] = None,
    maps: Annotated[bool, _flag("--maps/--no-maps", help="--no-maps stores only the --pool vectors (kilobytes per image).")] = True,
    shard: Annotated[Optional[str], typer.Option(help="I/N: only shard I of N, into OUT.shard-0000I-of-0000N.h5; join the N shards with `fpnx merge --out OUT`. Under torchrun each process takes its own shard.")] = None,
    as_json: Annotated[bool, _flag("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Extract P2-P6 of every image into one HDF5 file; rerunning resumes where a run stopped."""
    from .run import extract as run_extract
    from .run.torchrun import launched

    update, stop = render.extract_progress(transient=as_json)
    try:
        summary = run_extract(
            inputs, out, weights=weights, depth=depth, bn_eps=bn_eps,
            levels=[name.strip() for name in levels.split(",") if name.strip()],
            batch_size=batch_size, device=device, precision=precision, workers=workers,
            min_size=min_size, max_size=max_size, pixel_order=pixel_order, dtype=dtype,
            compression=compression, overwrite=overwrite, allow_truncated=allow_truncated,
            max_pixels=max_pixels, decode_timeout_s=decode_timeout, archives=archives, progress=update,
            command=shlex.join(["fpnx", *sys.argv[1:]]),
            shard=shard, commit_every_s=commit_every_s, pool=pool, maps=maps,
        )
    finally:
        stop()
    launch = launched()
    if launch is not None and launch.rank != 0:  # torchrun: rank 0 reports for all
        return
    if as_json:
        _print_json(summary.to_dict())
    else:
        render.print_extract_summary(summary)
    if shard is not None:
        render.print_shard_done(as_shard(shard), out)
    if strict and summary.failures:
        raise typer.Exit(1)


@app.command("merge")
def merge_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged HDF5 file (added to if it exists).")],
    shards: Annotated[Optional[list[Path]], typer.Argument(help="Shard files; default: every OUT.shard-*-of-*.h5 next to --out.")] = None,
    as_json: Annotated[bool, _flag("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Join finished shards 0..N-1 (from `extract --shard I/N`) into one file; then remove the shard files."""
    from .store import merge_shards

    summary = merge_shards(shards or (), out=out)
    if as_json:
        _print_json(summary.to_dict())
    else:
        render.print_merge_summary(summary)


@app.command("weights")
def list_weights_command(
    as_json: Annotated[bool, _flag("--json", help="Print as JSON.")] = False,
) -> None:
    """List the known weights and the preprocessing each one carries."""
    from .models.weights import list_weights

    entries = list_weights()
    if as_json:
        _print_json([entry.to_dict() for entry in entries])
    else:
        render.print_weights(entries)


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="An fpnx feature file, or the OUT.h5.parts folder of an unfinished run.")],
    images: Annotated[bool, _flag("--images", help="One row per image: index, source, original and resized size.")] = False,
    image: Annotated[Optional[str], typer.Option("--image", help="One image, by position or source (also selects what --stats and --plot show).")] = None,
    stats: Annotated[bool, _flag("--stats", help="Per level mean, std, min, max, fraction of zeros, NaN/inf counts (streamed).")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: the input image, each level's mean activation and histogram.")] = None,
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="Folder the sources are relative to, for --plot.")] = None,
    as_json: Annotated[bool, _flag("--json", help="Print everything as JSON on stdout.")] = False,
) -> None:
    """Describe a feature file: images, weights, preprocessing, levels, size; optionally images, stats, a plot."""
    from .report.inspection import inspect_features
    from .report.plot import plot_features

    result = inspect_features(path, images=images, image=image, stats=stats)
    drawn = plot_features(path, plot, image=image, image_root=image_root) if plot is not None else None
    if as_json:
        _print_json({**result.to_dict(), "plot": drawn.to_dict() if drawn is not None else None})
    else:
        render.print_inspection(result, drawn)


@app.command("bench")
def bench_command(
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16 (autocast) or tf32 (CUDA TF32 on).")] = "fp32",
    batch_size: Annotated[str, typer.Option(help="Images per forward pass; several (1,2,4,8) sweep.")] = "1",
    size: Annotated[str, typer.Option(help="Input HxW; several (512x768,800x1216) sweep.")] = "800x1216",
    iters: Annotated[int, typer.Option(help="Timed iterations per setting.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed iterations first.")] = 2,
    weights: Annotated[str, typer.Option(help="Weights to build the model with (timings do not depend on them).")] = "random",
    depth: Annotated[Optional[int], typer.Option(help="ResNet depth; default: what the weights hold.")] = None,
    channels_last: Annotated[bool, _flag("--channels-last/--no-channels-last", help="channels_last memory format, as extract uses.")] = True,
    compile: Annotated[bool, _flag("--compile", help="torch.compile the model (the first call compiles, untimed).")] = False,
    compare: Annotated[Optional[str], typer.Option(help="Also time this reference in the same run: torchvision.")] = None,
    pipeline: Annotated[Optional[Path], typer.Option(help="Also extract this folder end to end into a temporary file.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch; default: torch's.")] = None,
    as_json: Annotated[bool, _flag("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Time the network: images/s, latency, GFLOP/s, memory, per-stage breakdown and P2-P6 shapes."""
    from .bench import run_bench

    report = run_bench(
        device=device, precision=precision, batch_sizes=_numbers(batch_size, "--batch-size"),
        sizes=_sizes(size), iters=iters, warmup=warmup, weights=weights, depth=depth, channels_last=channels_last,
        compile=compile, compare=compare, pipeline=pipeline, threads=threads,
        progress=lambda message: render.note(f"bench: {message}"),
    )
    if as_json:
        _print_json(report.to_dict())
    else:
        render.print_bench(report)


def _sizes(text: str) -> list[tuple[int, int]]:
    """``"800x1216,512x768"`` -> ``[(800, 1216), (512, 768)]`` (height x width)."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            height, width = (int(piece) for piece in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"--size must be HxW (e.g. 800x1216), or several separated by commas; got {item!r}") from None
        sizes.append((height, width))
    return sizes


def _numbers(text: str, option: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``."""
    try:
        return [int(item) for item in filter(None, (part.strip() for part in text.split(",")))]
    except ValueError:
        raise UsageError(f"{option} must be a number or numbers separated by commas, got {text!r}") from None


if __name__ == "__main__":
    main()
