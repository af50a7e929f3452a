"""What the commands show people: summary lines and tables drawn with rich (the CLI layer: only cli.py uses it).

Every table fits the console: a table wider than the console (80 columns in a pipe or a narrow terminal) is
printed as stacked records instead, one block per row, so no cell is ever squeezed into one-character columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.padding import Padding
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)  # fmt: skip
from rich.table import Table

from .errors import FpnxError, display_path

stderr = Console(stderr=True)


def print_error(error: FpnxError) -> None:
    stderr.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)  # paths hold [ ]


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: one line, without the source line Python adds."""
    stderr.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    stderr.print(f"[dim]{escape(message)}[/dim]", highlight=False)


def human_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _hw(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_table(out: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                left: int = 1) -> None:
    """A table with ``left`` left-aligned columns, or, when it would not fit ``out``, one stacked block per row."""
    table = Table(title=title, title_justify="left")
    for k, column in enumerate(columns):
        table.add_column(column, justify="left" if k < left else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    if Measurement.get(out, out.options.update_width(1 << 16), table).maximum <= out.width:
        out.print(table)
        return
    out.print(f"[italic]{title}[/italic]", highlight=False)
    labelled = left > 0  # the first column names the row; else every cell is shown with its column's name
    for row in rows:
        if labelled:
            out.print(f"  [bold]{row[0]}[/bold]", highlight=False)
        details = "; ".join(f"{escape(column)}: {cell}" for column, cell in list(zip(columns, row))[labelled:])
        out.print(Padding(details, (0, 0, 0, 6 if labelled else 2)), highlight=False)  # wrapped within the console


# -- extract ---------------------------------------------------------------------------------------------------


def extract_progress(transient: bool) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """A progress bar (done/total, rate, elapsed, ETA, failures) on stderr: (update, stop).

    It starts with the first update, so errors before it print alone. A ``transient`` bar is shown on a terminal
    only.
    """
    bar = Progress(
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("{task.fields[failed]}"), console=stderr, transient=transient,
    )
    task = bar.add_task("extract", total=None, rate="", failed="")

    # a transient bar on a stream that is no terminal would leave only an empty line behind (rich draws it once,
    # at the end, then erases it)
    shown = not transient or stderr.is_terminal

    def update(state) -> None:
        if not shown:
            return
        if not bar.live.is_started:
            bar.start()
        rate = state.done / state.elapsed_s if state.elapsed_s > 0 else 0.0
        failed = f"[red]{state.failed} failed" if state.failed else ""
        bar.update(task, total=state.total, completed=state.done, rate=f"{rate:.2f} img/s", failed=failed)

    def stop() -> None:
        if bar.live.is_started:
            bar.stop()

    return update, stop


def print_extract_summary(summary) -> None:
    out = Console()
    weights = summary.weights
    out.print(
        f"[bold]{escape(summary.out)}[/bold]: {summary.images_stored} images stored"
        + (f", {summary.images_already_done} already done" if summary.images_already_done else "")
        + (f", [red]{len(summary.failures)} failed[/red]" if summary.failures else "")
        + (f", {len(summary.skipped)} skipped (hidden, not images...; listed by --json)" if summary.skipped else "")
        + f"  (weights {escape(weights['name'])}{'' if weights['trained'] else ' [yellow]untrained[/yellow]'},"
        f" {summary.device}, {summary.precision}, stored {summary.dtype})",
        soft_wrap=True,  # one line for scripts that grep it, whatever the terminal width
    )
    if summary.images_found == 0:
        out.print("[yellow]no images found in the inputs[/yellow]")
    print_table(out, "levels", ("level", "stride", "C", "min", "median", "max", "bytes"),
                [(level.name, str(level.stride), str(level.channels), _hw(level.min_hw), _hw(level.median_hw),
                  _hw(level.max_hw), human_bytes(level.bytes)) for level in summary.levels])
    stages = ("decode", "preprocess", "model", "write", "finalize", "total")
    print_table(out, "timings (s; decode/preprocess summed over workers)", (*stages, "images/s", "batch fill"),
                [(*(f"{summary.timings.get(name, 0.0):.2f}" for name in stages), f"{summary.images_per_s:.2f}",
                  f"{summary.mean_batch_fill:.0%}")], left=0)
    if summary.fp32_fallbacks:
        out.print(f"[yellow]{summary.fp32_fallbacks} batch(es) overflowed in reduced precision and ran again in fp32")
    if summary.float16_clamped:
        out.print(f"[yellow]{summary.float16_clamped} values beyond float16's range were clamped to +-65504")
    _print_failures(out, summary.failures)


def _print_failures(out: Console, failures: Sequence[tuple[str, str]]) -> None:
    if failures:  # any bytes but NUL: not UTF-8, "[/x]" markup
        print_table(out, "failures", ("source", "reason"),
                    [(escape(display_path(source)), escape(reason)) for source, reason in failures], left=2)


def print_shard_done(shard, out) -> None:
    stderr.print(f"shard {shard} done; once all {shard.count} are: fpnx merge --out {escape(str(out))}",
                 highlight=False)


def print_merge_summary(summary) -> None:
    if summary.nothing_to_do:
        Console().print(f"[bold]{escape(summary.out)}[/bold]: {summary.images} images, already merged from its "
                        f"{summary.count} shards; nothing to do", highlight=False, soft_wrap=True)
        return
    already = f", {len(summary.already_merged)} already merged" if summary.already_merged else ""
    already += f", {len(summary.nothing_new)} with nothing new" if summary.nothing_new else ""
    Console().print(
        f"[bold]{escape(summary.out)}[/bold]: {summary.images} images ({summary.images_added} added from "
        f"{len(summary.merged)} of {summary.count} shards{already}) in {summary.seconds:.1f} s; shard files removed",
        highlight=False, soft_wrap=True,
    )


# -- weights ---------------------------------------------------------------------------------------------------


def print_weights(entries) -> None:
    rows = []
    for entry in entries:
        prep = entry.preprocessing
        scale = "0-1" if prep.value_range == 1.0 else "0-255"
        rows.append((
            escape(entry.name), f"ResNet-{entry.depth}", f"{prep.pixel_order} {scale}",
            f"{', '.join(f'{v:g}' for v in prep.mean)} / {', '.join(f'{v:g}' for v in prep.std)}",
            f"{prep.resize} rule, {prep.min_size}/{prep.max_size}, padded to {prep.size_divisibility}",
            f"{entry.bn_eps:g}", "1x1" if entry.stride_in_1x1 else "3x3",
            "trained" if entry.fpn_trained else "untrained", escape(entry.description),
        ))
    columns = ("name", "network", "pixels", "mean / std", "resize", "bn eps", "stride in", "FPN", "description")
    print_table(Console(), "weights (fpnx extract --weights NAME)", columns, rows, left=len(columns))


# -- inspect ---------------------------------------------------------------------------------------------------


def print_inspection(result, drawn) -> None:
    out = Console()
    what = "unfinished run (.parts folder, committed segments)" if result.kind == "parts" else "fpnx feature file"
    out.print(
        f"[bold]{escape(result.path)}[/bold]: {result.images} images stored"
        + (f", [red]{len(result.failures)} failed[/red]" if result.failures else ", 0 failed")
        + f"  ({what}, format {result.format_version}, {human_bytes(result.size_on_disk)} on disk"
        + (f" in {result.files} files" if result.kind == "parts" else "") + ")",
        highlight=False,
    )
    out.print(_inspection_grid(result), highlight=False)
    print_table(out, "levels", ("level", "stride", "C", "min", "median", "max", "bytes", "on disk"),
                [(level.name, str(level.stride), str(level.channels), _hw(level.min_hw), _hw(level.median_hw),
                  _hw(level.max_hw), human_bytes(level.bytes), human_bytes(level.stored_bytes))
                 for level in result.levels])
    if result.selected is not None:
        print_table(out, "images", ("index", "source", "original", "resized", "scale"),
                    [(str(row.index), escape(display_path(row.source)), f"{row.height}x{row.width}",
                      f"{row.input_height}x{row.input_width}", f"{row.scale:.4g}") for row in result.selected],
                    left=2)
    if result.stats is not None:
        one = result.selected is not None and len(result.selected) == 1 and result.images != 1
        scope = f"image {result.selected[0].index}" if one else "all images"
        what = "" if result.maps else " of the pooled vectors"
        print_table(out, f"statistics{what} ({scope}; mean/std/min/max of finite values)",
                    ("level", "values", "mean", "std", "min", "max", "zeros", "NaN", "inf"),
                    [(row.name, str(row.count), _g(row.mean), _g(row.std), _g(row.min), _g(row.max),
                      "-" if row.zero_fraction is None else f"{row.zero_fraction:.2%}",
                      f"[red]{row.nan_count}[/red]" if row.nan_count else "0",
                      f"[red]{row.inf_count}[/red]" if row.inf_count else "0") for row in result.stats])
    _print_failures(out, result.failures)
    if result.links:
        print_table(out, "[yellow]links in the file (listed, not followed; fpnx never reads them)",
                    ("where", "kind", "target"),
                    [(escape(link.path), link.kind, escape(link.target)) for link in result.links], left=3)
    if drawn is not None:
        found = escape(display_path(drawn.image_path)) if drawn.image_path else "[yellow]not found[/yellow] (use --image-root)"
        out.print(f"plot: wrote {escape(drawn.out)} ({drawn.width}x{drawn.height}) for image {drawn.index} "
                  f"{escape(display_path(drawn.source))}; input image: {found}", highlight=False)


def _inspection_grid(result) -> Table:
    weights = result.weights
    trained = {True: "trained", False: "[yellow]untrained[/yellow]", None: "training unknown"}[result.trained]
    detail = ", ".join(part for part in (
        f"ResNet-{weights['depth']}" if weights.get("depth") else "",
        f"framework {weights['framework']}" if weights.get("framework") else "",
        f"bn eps {weights['bn_eps']:g}" if weights.get("bn_eps") is not None else "",
        f"sha256 {weights['sha256'][:12]}" if weights.get("sha256") else "",
    ) if part)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # long paths fold rather than lose their end
    grid.add_row("weights", f"{escape(str(weights.get('name')))} ({trained}; {escape(detail)})")
    prep = result.preprocessing
    if prep:
        scale = "0-1" if prep.get("value_range") == 1.0 else "0-255"
        numbers = lambda values: ", ".join(f"{value:g}" for value in values) if values else "-"  # noqa: E731
        grid.add_row(
            "preprocessing",
            f"{prep.get('pixel_order')} {scale}, mean {numbers(prep.get('mean'))}, std {numbers(prep.get('std'))}, "
            f"{prep.get('resize')} resize to min {prep.get('min_size')} / max {prep.get('max_size')}, "
            f"padded to a multiple of {prep.get('size_divisibility')}",
        )
    maps = f"{result.dtype}, compression {result.compression}" if result.maps else "no maps (--no-maps)"
    pooled = f", per-channel {result.pool} vectors per level (float32)" if result.pool else ""
    grid.add_row("stored", f"{maps}{pooled}, computed in {result.precision}")
    grid.add_row("levels", ", ".join(level.name for level in result.levels))
    if result.created or result.command:
        grid.add_row("made", escape(f"{result.created} by fpnx {result.fpnx_version} on {result.device}: "
                                    f"{result.command}"))
    return grid


# -- bench -----------------------------------------------------------------------------------------------------


def print_bench(report) -> None:
    out = Console()
    out.print(
        f"[bold]fpnx bench[/bold]: {report.device} ({escape(report.device_name)}), {report.threads} "
        f"thread{'s' if report.threads != 1 else ''}, {report.precision}, "
        f"{'channels_last' if report.channels_last else 'contiguous'}, "
        f"{'torch.compile' if report.compile else 'eager'}, weights {escape(report.weights)} (ResNet-{report.depth}); "
        f"{report.iters} timed iterations after {report.warmup} warm-up ({report.timer})",
        highlight=False,
    )
    for message in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(message)}", highlight=False)
    rows = report.rows

    def setting(index: int, row) -> str:
        return f"{row.height}x{row.width}" + (" *" if len(rows) > 1 and index == report.best else "")

    print_table(out, "model only (per batch: median and p90 latency)",
                ("size", "batch", "img/s", "median ms", "p90 ms", "GFLOP/s", "peak mem", "+forward"),
                [(setting(k, row), str(row.batch_size), f"{row.fpnx.images_per_s:.2f}",
                  f"{row.fpnx.latency_ms_median:.1f}", f"{row.fpnx.latency_ms_p90:.1f}", f"{row.fpnx.gflop_per_s:.1f}",
                  human_bytes(row.fpnx.peak_memory_bytes), human_bytes(row.fpnx.peak_memory_added_bytes))
                 for k, row in enumerate(rows)])
    out.print(f"[dim]{rows[0].gflop_per_image:.1f} GFLOP per image at {rows[0].height}x{rows[0].width}; peak mem: "
              f"{report.peak_memory_kind}; +forward: its rise during one forward (CUDA only)"
              + ("; * best img/s" if len(rows) > 1 else ""), highlight=False)
    if report.compare is not None:
        print_table(out, f"fpnx against {report.compare} (iterations interleaved)",
                    ("size", "batch", "fpnx img/s", f"{report.compare} img/s", "median ms", "ratio"),
                    [(setting(k, row), str(row.batch_size), f"{row.fpnx.images_per_s:.2f}",
                      f"{row.torchvision.images_per_s:.2f}", f"{row.torchvision.latency_ms_median:.1f}",
                      f"{row.ratio:.2f}x") for k, row in enumerate(rows)])
    _print_stages(out, rows[report.best])
    sizes = list(dict.fromkeys((row.height, row.width) for row in rows))
    first = {(row.height, row.width): row for row in reversed(rows)}
    print_table(out, "shapes (C x H x W)", ("level", *(f"{h}x{w}" for h, w in sizes)),
                [(level, *("x".join(str(v) for v in first[size].shapes[level]) for size in sizes))
                 for level in rows[report.best].shapes])
    _print_pipelines(out, rows)


def _print_stages(out: Console, best) -> None:
    rows = []
    for stage in best.stages:
        rate = stage.gflop / (stage.median_ms / 1000) if stage.median_ms > 0 and stage.gflop else None
        rows.append((stage.name, f"{stage.median_ms:.2f}", f"{stage.share:.1%}", f"{stage.gflop:.2f}",
                     f"{rate:.1f}" if rate is not None else "-"))
    rows.append(("[bold]sum", f"[bold]{best.stage_sum_ms:.2f}", "", f"{sum(s.gflop for s in best.stages):.2f}", ""))
    print_table(out, f"stages at {best.height}x{best.width}, batch {best.batch_size} (median ms per batch)",
                ("stage", "ms", "share", "GFLOP", "GFLOP/s"), rows)
    if best.forward_ms > 0:
        out.print(f"[dim]stage sum {best.stage_sum_ms:.2f} ms = {best.stage_sum_ms / best.forward_ms:.0%} of the full "
                  f"forward's {best.forward_ms:.2f} ms (the same forward, its stages marked by hooks)", highlight=False)


def _print_pipelines(out: Console, rows) -> None:
    runs = [(row, row.pipeline) for row in rows if row.pipeline is not None]
    if not runs:
        return
    stages = ("decode", "preprocess", "model", "write", "total")
    print_table(out, "end to end: extract into a temporary file (s; decode/preprocess summed over workers; total "
                "includes start-up, so use a folder of a few hundred images)",
                ("size", "batch", "images", *stages, "img/s", "model-only", "efficiency"),
                [(f"{run.min_size}-{run.max_size}", str(row.batch_size), str(run.images),
                  *(f"{run.timings_s[name]:.2f}" for name in stages), f"{run.images_per_s:.2f}",
                  f"{run.model_only_images_per_s:.2f}", f"{run.efficiency:.0%}") for row, run in runs])
