"""The ``fpnx`` command: parse options, call the library, render the result. The only module importing typer/rich."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import FpnxError
from .images import DEFAULT_MAX_PIXELS, display_path
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
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


def fail(error: FpnxError) -> typer.Exit:
    """For commands run through typer's runner (tests): the same one-line error and exit code."""
    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)  # paths hold [ ]
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
    commit_every_s: Annotated[Optional[float], typer.Option(hidden=True, help="Advanced: seconds between commits of finished images (default 10); a crash loses at most this much work.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: only shard I of N, into OUT.shard-0000I-of-0000N.h5; join the N shards with `fpnx merge --out OUT`. Under torchrun each process takes its own shard.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Extract P2-P6 of every image into one HDF5 file; rerunning resumes where a run stopped."""
    from .distributed import launched, parse_shard_option
    from .pipeline import Interrupted, extract as run_extract

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
        shard_spec = parse_shard_option(shard)
        launch = launched()
        try:
            summary = run_extract(
                inputs, out, weights=weights, depth=depth, bn_eps=bn_eps,
                levels=[name.strip() for name in levels.split(",") if name.strip()],
                batch_size=batch_size, device=device, precision=precision, workers=workers,
                min_size=min_size, max_size=max_size, pixel_order=pixel_order, dtype=dtype,
                compression=compression, overwrite=overwrite, allow_truncated=allow_truncated,
                max_pixels=max_pixels, progress=update, command=shlex.join(["fpnx", *sys.argv[1:]]),
                shard=shard_spec, commit_every_s=commit_every_s,
            )
        finally:
            if progress.live.is_started:
                progress.stop()
    except FpnxError as error:
        raise fail(error) from None
    except KeyboardInterrupt:  # before or after the part of the run that reports what it kept
        raise fail(Interrupted("interrupted; run the same command again to resume")) from None
    if launch is not None and launch.rank != 0:  # torchrun: rank 0 reports for all
        return
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)
    if shard_spec is not None:
        console.print(f"shard {shard_spec} done; once all {shard_spec.count} are: fpnx merge --out {escape(str(out))}", highlight=False)
    if strict and summary.failures:
        raise typer.Exit(1)


def _print_summary(summary) -> None:
    out = Console()
    out.print(
        f"[bold]{escape(summary.out)}[/bold]: {summary.images_stored} images stored"
        + (f", {summary.images_already_done} already done" if summary.images_already_done else "")
        + (f", [red]{len(summary.failures)} failed[/red]" if summary.failures else "")
        + (f", {len(summary.skipped)} skipped (hidden, not images...; listed by --json)" if summary.skipped else "")
        + f"  (weights {escape(summary.weights['name'])}{'' if summary.weights['trained'] else ' [yellow]untrained[/yellow]'},"
        f" {summary.device}, {summary.precision}, stored {summary.dtype})",
        soft_wrap=True,  # one line for scripts that grep it, whatever the terminal width
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
        for source, reason in summary.failures:  # any bytes but NUL: not UTF-8, "[/x]" markup
            failures.add_row(escape(display_path(source)), escape(reason))
        out.print(failures)


@app.command("merge")
def merge_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged HDF5 file (added to if it exists).")],
    shards: Annotated[Optional[list[Path]], typer.Argument(help="Shard files; default: every OUT.shard-*-of-*.h5 next to --out.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Join finished shards 0..N-1 (from `extract --shard I/N`) into one file; then remove the shard files."""
    from .distributed import merge_shards

    try:
        summary = merge_shards(shards or (), out=out)
    except FpnxError as error:
        raise fail(error) from None
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    already = f", {len(summary.already_merged)} already merged" if summary.already_merged else ""
    Console().print(
        f"[bold]{escape(summary.out)}[/bold]: {summary.images} images ({summary.images_added} added from "
        f"{len(summary.merged)} of {summary.count} shards{already}) in {summary.seconds:.1f} s; shard files removed",
        highlight=False, soft_wrap=True,
    )


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
    table.add_column("name", no_wrap=True)
    for column in ("depth", "pixels", "mean / std", "bn eps", "stride in", "FPN", "description"):
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



@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="An fpnx feature file, or the OUT.h5.parts folder of an unfinished run.")],
    images: Annotated[bool, typer.Option("--images", help="One row per image: index, source, original and resized size.")] = False,
    image: Annotated[Optional[str], typer.Option("--image", help="One image, by position or source (also selects what --stats and --plot show).")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Per level mean, std, min, max, fraction of zeros, NaN/inf counts (streamed).")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: the input image, each level's mean activation and histogram.")] = None,
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="Folder the sources are relative to, for --plot.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON on stdout.")] = False,
) -> None:
    """Describe a feature file: images, weights, preprocessing, levels, size; optionally images, stats, a plot."""
    from .inspect import inspect_features
    from .plot import plot_features

    try:
        result = inspect_features(path, images=images, image=image, stats=stats)
        drawn = plot_features(path, plot, image=image, image_root=image_root) if plot is not None else None
    except FpnxError as error:
        raise fail(error) from None
    if as_json:
        data = result.to_dict()
        data["plot"] = drawn.to_dict() if drawn is not None else None
        print(json.dumps(data, indent=2))
        return
    _print_inspection(result, drawn)


def _wide_console() -> Console:
    """stdout; when it is not a terminal (a pipe, a file, a test), wide enough that tables do not wrap numbers."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _print_inspection(result, drawn) -> None:
    out = _wide_console()
    what = "unfinished run (.parts folder, committed segments)" if result.kind == "parts" else "fpnx feature file"
    out.print(
        f"[bold]{escape(result.path)}[/bold]: {result.images} images stored"
        + (f", [red]{len(result.failures)} failed[/red]" if result.failures else ", 0 failed")
        + f"  ({what}, format {result.format_version}, {_human_bytes(result.size_on_disk)} on disk"
        + (f" in {result.files} files" if result.kind == "parts" else "") + ")",
        highlight=False,
    )
    weights = result.weights
    trained = {True: "trained", False: "[yellow]untrained[/yellow]", None: "training unknown"}[result.trained]
    detail = ", ".join(part for part in (
        f"ResNet-{weights['depth']}" if weights.get("depth") else "",
        f"framework {weights['framework']}" if weights.get("framework") else "",
        f"bn eps {weights['bn_eps']:g}" if weights.get("bn_eps") is not None else "",
        f"sha256 {weights['sha256'][:12]}" if weights.get("sha256") else "",
    ) if part)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("weights", f"{escape(str(weights.get('name')))} ({trained}; {escape(detail)})")
    prep = result.preprocessing
    if prep:
        scale = "0-1" if prep.get("value_range") == 1.0 else "0-255"
        summary.add_row(
            "preprocessing",
            f"{prep.get('pixel_order')} {scale}, mean {_numbers(prep.get('mean'))}, std {_numbers(prep.get('std'))}, "
            f"{prep.get('resize')} resize to min {prep.get('min_size')} / max {prep.get('max_size')}, "
            f"padded to a multiple of {prep.get('size_divisibility')}",
        )
    summary.add_row("stored", f"{result.dtype}, compression {result.compression}, computed in {result.precision}")
    summary.add_row("levels", ", ".join(level.name for level in result.levels))
    if result.created or result.command:
        summary.add_row("made", escape(f"{result.created} by fpnx {result.fpnx_version} on {result.device}: {result.command}"))
    out.print(summary, highlight=False)

    levels = Table(title="levels", title_justify="left")
    for column in ("level", "stride", "channels", "min HxW", "median HxW", "max HxW", "bytes", "on disk"):
        levels.add_column(column, justify="left" if column == "level" else "right")
    for level in result.levels:
        levels.add_row(level.name, str(level.stride), str(level.channels), _hw(level.min_hw), _hw(level.median_hw),
                       _hw(level.max_hw), _human_bytes(level.bytes),
                       _human_bytes(level.stored_bytes) if level.stored_bytes is not None else "-")
    out.print(levels)

    if result.selected is not None:
        table = Table(title="images", title_justify="left")
        for column in ("index", "source", "original HxW", "resized HxW", "scale"):
            table.add_column(column, justify="left" if column == "source" else "right")
        for row in result.selected:
            table.add_row(str(row.index), escape(display_path(row.source)), f"{row.height}x{row.width}",
                          f"{row.input_height}x{row.input_width}", f"{row.scale:.4g}")
        out.print(table)
    if result.stats is not None:
        scope = f"image {result.selected[0].index}" if result.selected is not None and len(result.selected) == 1 \
            and result.images != 1 else "all images"
        table = Table(title=f"statistics ({scope}; mean/std/min/max of finite values)", title_justify="left")
        for column in ("level", "values", "mean", "std", "min", "max", "zeros", "NaN", "inf"):
            table.add_column(column, justify="left" if column == "level" else "right")
        for row in result.stats:
            table.add_row(row.name, str(row.count), _g(row.mean), _g(row.std), _g(row.min), _g(row.max),
                          "-" if row.zero_fraction is None else f"{row.zero_fraction:.2%}",
                          f"[red]{row.nan_count}[/red]" if row.nan_count else "0",
                          f"[red]{row.inf_count}[/red]" if row.inf_count else "0")
        out.print(table)
    if result.failures:
        table = Table(title="failures", title_justify="left")
        table.add_column("source")
        table.add_column("reason")
        for source, reason in result.failures:
            table.add_row(escape(display_path(source)), escape(reason))
        out.print(table)
    if result.links:
        table = Table(title="[yellow]links in the file (listed, not followed; fpnx never reads them)", title_justify="left")
        for column in ("where", "kind", "target"):
            table.add_column(column)
        for link in result.links:
            table.add_row(escape(link.path), link.kind, escape(link.target))
        out.print(table)
    if drawn is not None:
        found = escape(display_path(drawn.image_path)) if drawn.image_path else "[yellow]not found[/yellow] (use --image-root)"
        out.print(f"plot: wrote {escape(drawn.out)} ({drawn.width}x{drawn.height}) for image {drawn.index} "
                  f"{escape(display_path(drawn.source))}; input image: {found}", highlight=False)


def _optional_bytes(count) -> str:
    return "-" if count is None else _human_bytes(count)


def _numbers(values) -> str:
    return ", ".join(f"{value:g}" for value in values) if values else "-"


def _g(value) -> str:
    return "-" if value is None else f"{value:.4g}"


@app.command("bench")
def bench_command(
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (autocast).")] = "fp32",
    batch_size: Annotated[str, typer.Option(help="Images per forward pass; several (1,2,4,8) sweep.")] = "1",
    size: Annotated[str, typer.Option(help="Input HxW; several (512x768,800x1216) sweep.")] = "800x1216",
    iters: Annotated[int, typer.Option(help="Timed iterations per setting.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed iterations first.")] = 2,
    weights: Annotated[str, typer.Option(help="Weights to build the model with (timings do not depend on them).")] = "random",
    depth: Annotated[Optional[int], typer.Option(help="ResNet depth; default: what the weights hold.")] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="channels_last memory format, as extract uses.")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (the first call compiles, untimed).")] = False,
    compare: Annotated[Optional[str], typer.Option(help="Also time this reference in the same run: torchvision.")] = None,
    pipeline: Annotated[Optional[Path], typer.Option(help="Also extract this folder end to end into a temporary file.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch; default: torch's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Time the network: images/s, latency, GFLOP/s, memory, per-stage breakdown and P2-P6 shapes."""
    from .bench import parse_batch_sizes, parse_sizes, run_bench

    def progress(message: str) -> None:
        console.print(f"[dim]bench: {escape(message)}[/dim]", highlight=False)

    try:
        report = run_bench(
            device=device, precision=precision, batch_sizes=parse_batch_sizes(batch_size), sizes=parse_sizes(size),
            iters=iters, warmup=warmup, weights=weights, depth=depth, channels_last=channels_last, compile=compile,
            compare=compare, pipeline=pipeline, threads=threads, progress=progress,
        )
    except FpnxError as error:
        raise fail(error) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    _print_bench(report)


def _print_bench(report) -> None:
    out = _wide_console()
    out.print(
        f"[bold]fpnx bench[/bold]: {report.device} ({escape(report.device_name)}), {report.threads} "
        f"thread{'s' if report.threads != 1 else ''}, "
        f"{report.precision}, {'channels_last' if report.channels_last else 'contiguous'}, "
        f"{'torch.compile' if report.compile else 'eager'}, weights {escape(report.weights)} (ResNet-{report.depth}); "
        f"{report.iters} timed iterations after {report.warmup} warm-up ({report.timer})",
        highlight=False,
    )
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    rows = report.rows
    compare = report.compare is not None
    with_pipeline = any(row.pipeline is not None for row in rows)
    table = Table(title="model only (per batch: median and p90 latency)", title_justify="left")
    columns = ["size", "batch", "img/s", "median ms", "p90 ms", "GFLOP/img", "GFLOP/s", "peak mem", "+forward"]
    if compare:
        columns += [f"{report.compare} img/s", "median ms ", "ratio"]
    if with_pipeline:
        columns += ["end-to-end img/s", "efficiency"]
    for column in columns:
        table.add_column(column, justify="left" if column == "size" else "right")
    for index, row in enumerate(rows):
        cells = [
            f"{row.height}x{row.width}" + (" *" if len(rows) > 1 and index == report.best else ""),
            str(row.batch_size), f"{row.fpnx.images_per_s:.2f}", f"{row.fpnx.latency_ms_median:.1f}",
            f"{row.fpnx.latency_ms_p90:.1f}", f"{row.gflop_per_image:.1f}", f"{row.fpnx.gflop_per_s:.1f}",
            _human_bytes(row.fpnx.peak_memory_bytes), _optional_bytes(row.fpnx.peak_memory_added_bytes),
        ]
        if compare:
            reference = row.torchvision
            cells += [f"{reference.images_per_s:.2f}", f"{reference.latency_ms_median:.1f}", f"{row.ratio:.2f}x"]
        if with_pipeline:
            cells += [f"{row.pipeline.images_per_s:.2f}", f"{row.pipeline.efficiency:.0%}"] if row.pipeline else ["-", "-"]
        table.add_row(*cells)
    out.print(table)
    out.print(f"[dim]peak mem: {report.peak_memory_kind}; +forward: its rise during one forward (CUDA only)"
              + (f"; ratio: fpnx img/s over {report.compare} img/s (iterations interleaved)" if compare else "")
              + ("; * best img/s" if len(rows) > 1 else ""), highlight=False)

    best = rows[report.best]
    stages = Table(title=f"stages at {best.height}x{best.width}, batch {best.batch_size} (median ms per batch)",
                   title_justify="left")
    for column in ("stage", "ms", "share", "GFLOP", "GFLOP/s"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for stage in best.stages:
        rate = stage.gflop / (stage.median_ms / 1000) if stage.median_ms > 0 and stage.gflop else None
        stages.add_row(stage.name, f"{stage.median_ms:.2f}", f"{stage.share:.1%}", f"{stage.gflop:.2f}",
                       f"{rate:.1f}" if rate is not None else "-")
    stages.add_row("[bold]sum", f"[bold]{best.stage_sum_ms:.2f}", "", f"{sum(s.gflop for s in best.stages):.2f}", "")
    out.print(stages)
    if best.forward_ms > 0:
        out.print(f"[dim]stage sum {best.stage_sum_ms:.2f} ms = {best.stage_sum_ms / best.forward_ms:.0%} of the full "
                  f"forward's {best.forward_ms:.2f} ms (the pieces run one after another, same operations)",
                  highlight=False)

    sizes = list(dict.fromkeys((row.height, row.width) for row in rows))
    shapes = Table(title="shapes (C x H x W)", title_justify="left")
    shapes.add_column("level")
    for height, width in sizes:
        shapes.add_column(f"{height}x{width}", justify="right")
    first = {(row.height, row.width): row for row in reversed(rows)}
    for level in best.shapes:
        shapes.add_row(level, *("x".join(str(v) for v in first[size].shapes[level]) for size in sizes))
    out.print(shapes)

    if with_pipeline:
        table = Table(title="end to end: extract into a temporary file (s; decode/preprocess summed over workers; "
                            "total includes start-up, so use a folder of a few hundred images)", title_justify="left")
        for column in ("size", "batch", "images", "decode", "preprocess", "model", "write", "total", "img/s",
                       "model-only img/s", "efficiency"):
            table.add_column(column, justify="left" if column == "size" else "right")
        for row in rows:
            run = row.pipeline
            if run is None:
                continue
            table.add_row(f"{run.min_size}-{run.max_size}", str(row.batch_size), str(run.images),
                          *(f"{run.timings_s[name]:.2f}" for name in ("decode", "preprocess", "model", "write", "total")),
                          f"{run.images_per_s:.2f}", f"{run.model_only_images_per_s:.2f}", f"{run.efficiency:.0%}")
        out.print(table)


if __name__ == "__main__":
    main()
