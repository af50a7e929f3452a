"""The ``fpnx`` command: parse options, call the library, render the result. The only module importing typer/rich."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import FpnxError
from .images import DEFAULT_MAX_PIXELS
from .weights import DEFAULT_WEIGHTS

app = typer.Typer(
    help="Turn folders of images into exact ResNet + FPN feature maps (P2-P6) stored in HDF5.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def main() -> None:
    """Console-script entry point: user mistakes print one line and exit non-zero, never a traceback."""
    try:
        app()
    except FpnxError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


def fail(error: FpnxError) -> typer.Exit:
    """For commands run through typer's runner (tests): the same one-line error and exit code."""
    console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(error.exit_code)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


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
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (fp16 overflow falls back to fp32).")] = "fp32",
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes; 0 decodes in this process.")] = None,
    min_size: Annotated[int, typer.Option(help="Shorter side after resizing.")] = 800,
    max_size: Annotated[int, typer.Option(help="Cap on the longer side after resizing.")] = 1333,
    pixel_order: Annotated[Optional[str], typer.Option(help="RGB or BGR; default: what the weights need.")] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 or float16.")] = "float32",
    compression: Annotated[str, typer.Option(help="none, lzf or gzip.")] = "none",
    overwrite: Annotated[bool, typer.Option(help="Start anew instead of resuming.")] = False,
    allow_truncated: Annotated[bool, typer.Option(help="Decode what is there of truncated files.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels (decompression bombs).")] = DEFAULT_MAX_PIXELS,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any image failed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Extract P2-P6 of every image into one HDF5 file; rerunning resumes where a run stopped."""
    from .pipeline import extract as run_extract

    progress = Progress(
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("{task.fields[failed]}"), console=console, transient=as_json,
    )
    task = progress.add_task("extract", total=None, rate="", failed="")

    def update(state) -> None:
        if not progress.live.is_started:  # start on the first update, so errors before it print alone
            progress.start()
        rate = state.done / state.elapsed_s if state.elapsed_s > 0 else 0.0
        failed = f"[red]{state.failed} failed" if state.failed else ""
        progress.update(task, total=state.total, completed=state.done, rate=f"{rate:.2f} img/s", failed=failed)

    try:
        try:
            summary = run_extract(
                inputs, out, weights=weights, depth=depth, bn_eps=bn_eps,
                levels=[name.strip() for name in levels.split(",") if name.strip()],
                batch_size=batch_size, device=device, precision=precision, workers=workers,
                min_size=min_size, max_size=max_size, pixel_order=pixel_order, dtype=dtype,
                compression=compression, overwrite=overwrite, allow_truncated=allow_truncated,
                max_pixels=max_pixels, progress=update, command=shlex.join(["fpnx", *sys.argv[1:]]),
            )
        finally:
            if progress.live.is_started:
                progress.stop()
    except FpnxError as error:
        raise fail(error) from None
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)
    if strict and summary.failures:
        raise typer.Exit(1)


def _print_summary(summary) -> None:
    out = Console()
    out.print(
        f"[bold]{summary.out}[/bold]: {summary.images_stored} images stored"
        + (f", {summary.images_already_done} already done" if summary.images_already_done else "")
        + (f", [red]{len(summary.failures)} failed[/red]" if summary.failures else "")
        + f"  (weights {summary.weights['name']}{'' if summary.weights['trained'] else ' [yellow]untrained[/yellow]'},"
        f" {summary.device}, {summary.precision}, stored {summary.dtype})"
    )
    levels = Table(title="levels", title_justify="left")
    for column in ("level", "stride", "channels", "min HxW", "median HxW", "max HxW", "bytes"):
        levels.add_column(column, justify="left" if column == "level" else "right")
    for level in summary.levels:
        levels.add_row(level.name, str(level.stride), str(level.channels), _hw(level.min_hw), _hw(level.median_hw),
                       _hw(level.max_hw), _human_bytes(level.bytes))
    out.print(levels)
    timings = Table(title="timings (s; decode/preprocess summed over workers)", title_justify="left")
    for name in ("decode", "preprocess", "model", "write", "total"):
        timings.add_column(name, justify="right")
    timings.add_column("images/s", justify="right")
    timings.add_row(*(f"{summary.timings[name]:.2f}" for name in ("decode", "preprocess", "model", "write", "total")),
                    f"{summary.images_per_s:.2f}")
    out.print(timings)
    if summary.fp32_fallbacks:
        out.print(f"[yellow]{summary.fp32_fallbacks} batch(es) overflowed in reduced precision and ran again in fp32")
    if summary.float16_clamped:
        out.print(f"[yellow]{summary.float16_clamped} values beyond float16's range were clamped to +-65504")
    if summary.failures:
        failures = Table(title="failures", title_justify="left")
        failures.add_column("source")
        failures.add_column("reason")
        for source, reason in summary.failures:
            failures.add_row(source, reason)
        out.print(failures)


@app.command("weights")
def list_weights_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the known weights and the preprocessing each one carries."""
    from .weights import list_weights, random_weights

    entries = [*list_weights(), random_weights()]
    if as_json:
        print(json.dumps([entry.to_dict() for entry in entries], indent=2))
        return
    table = Table()
    for column in ("name", "depth", "pixels", "mean / std", "bn eps", "stride in", "FPN", "description"):
        table.add_column(column)
    for entry in entries:
        prep = entry.preprocessing
        scale = "0-1" if prep.value_range == 1.0 else "0-255"
        table.add_row(
            entry.name, str(entry.depth), f"{prep.pixel_order} {scale}",
            f"{', '.join(f'{v:g}' for v in prep.mean)} / {', '.join(f'{v:g}' for v in prep.std)}",
            f"{entry.bn_eps:g}", "1x1" if entry.stride_in_1x1 else "3x3",
            "trained" if entry.fpn_trained else "untrained", entry.description,
        )
    Console().print(table)


if __name__ == "__main__":
    main()
