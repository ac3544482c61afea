"""The `ecprune-onnx` command line: parse options, call the library, print, set the exit status.

Exit status: 0 success, 1 a quality gate failed, 2 bad input (one `error:` line on stderr),
130 interrupted. Progress bars and the tables of compress/evaluate go to stderr so stdout
holds only results: `inspect`'s table or JSON, and one closing line per command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from ecprune_onnx import __version__
from ecprune_onnx.errors import OutputExistsError, UsageError
from ecprune_onnx.options import (
    BUDGETS,
    DEFAULT_METHOD,
    DEFAULT_NEURON_METHOD,
    DEFAULT_WEIGHT_METHOD,
    METHOD_NAMES,
    SCOPES,
    STRUCTURES,
    check_data_file,
    check_method,
    check_model_file,
    check_ratio,
    parse_memory,
)

# The library (numpy, onnx, onnxruntime, torch: seconds to import) loads inside the
# commands, after the checks that need no model: `--help` and a typo answer at once.
if TYPE_CHECKING:
    from ecprune_onnx.compress import CompressResult
    from ecprune_onnx.compress import Progress as ProgressCallback
    from ecprune_onnx.evaluate import EvaluateResult, Latency, LatencyComparison
    from ecprune_onnx.finetune import FinetuneResult
    from ecprune_onnx.groups import GroupScan
    from ecprune_onnx.layers import DenseLayer, LayerScan

# Rich's width when stderr is not a terminal (CI logs, pipes) is 80 columns, which wraps
# tables with long node names; logs have room for more.
_LOG_WIDTH = 120

# The usual shell convention for a process ended by SIGINT (128 + 2).
_EXIT_INTERRUPTED = 130


class _Command(TyperCommand):
    """A command whose usage line reads `compress [OPTIONS] MODEL`: typer 0.29 writes a
    required argument as `{MODEL}`, which reads like a template left unfilled."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [re.sub(r"^\{(.*)\}$", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        """Options that do not parse (`--ratio half`, an unknown flag, a missing MODEL) end in
        one `error:` line and exit 2, as every other bad input does, instead of click's usage
        block of three."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except Exception as error:
            # click's UsageError: typer 0.29 raises its own vendored copy of click's class,
            # so it is known by what it carries, exit code 2 and a message of its own
            if getattr(error, "exit_code", None) != 2 or not hasattr(error, "format_message"):
                raise
            command = " ".join(filter(None, [parent and parent.info_name, info_name]))
            _fail(f"{error.format_message().rstrip('.')} (see '{command} --help')")
            raise typer.Exit(2) from error


app = typer.Typer(
    name="ecprune-onnx",
    help="Post-training elimination-compensation pruning of the dense layers of ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help, not rich's boxed panels: those squeeze the descriptions into a
    # narrow column at 80 columns, cut long metavars mid-word, and draw box characters
    # into CI logs.
    rich_markup_mode=None,
    # Bugs keep Python's plain traceback: readable in CI logs, no local variables dumped.
    pretty_exceptions_enable=False,
)

# Built here: typer evaluates the annotations as strings, where an f-string cannot nest quotes.
_METHOD_HELP = (
    f"The criterion: {', '.join(METHOD_NAMES)} (README, 'Which method'). "
    f"[default: {DEFAULT_METHOD}; {DEFAULT_NEURON_METHOD} with --structure neuron]"
)
_WEIGHT_METHOD_HELP = f"Method of --weight-ratio, as --method (default: {DEFAULT_WEIGHT_METHOD})."

ModelArgument = Annotated[
    Path, typer.Argument(metavar="MODEL", help="ONNX model file.", show_default=False)
]
ReportOption = Annotated[
    Path | None,
    typer.Option("--report", metavar="JSON", help="Also write the results as JSON to this file."),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Rows per batch.")]
DeviceOption = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda")]
BatchAxisOption = Annotated[
    list[str] | None,
    typer.Option(
        "--batch-axis",
        metavar="NAME=AXIS",
        help="Axis of input NAME that holds the rows, or NAME=none for an input fed whole "
        "(default: none for scalars, else where the input has the batch's symbolic "
        "dimension, else 0).",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars or tables.")]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show the traceback of errors in the input too.")
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ecprune-onnx {__version__}")
        raise typer.Exit()


@app.callback()
def _app(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Post-training elimination-compensation pruning of the dense layers of ONNX models."""


def main() -> None:
    """Console-script entry point (`ecprune-onnx`, `python -m ecprune_onnx`)."""
    app(prog_name="ecprune-onnx")


# ---------------------------------------------------------------------------- commands


@app.command("compress", cls=_Command)
def compress_command(
    model: ModelArgument,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib",
            metavar="NPZ",
            help="Calibration data. [required unless --method magnitude or random]",
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels", metavar="KEY", help="Labels array of the NPZ (needed by --method gradient)."
        ),
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option(
            "--ratio",
            metavar="R",
            help="Share of the dense weights to remove, in [0,1) (--structure neuron: of "
            "the hidden units). [required unless --pattern]",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Pruned model file (default: MODEL.pruned.onnx)."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            metavar="NAME",
            help=_METHOD_HELP,
            show_default=False,
        ),
    ] = None,
    scope: Annotated[str, typer.Option("--scope", metavar="|".join(SCOPES))] = "global",
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            metavar="|".join(BUDGETS),
            help="ec's share per layer: from damage measured in onnxruntime, or predicted "
            "(auto: measured up to 25M dense weights).",
        ),
    ] = "auto",
    structure: Annotated[
        str,
        typer.Option(
            "--structure",
            metavar="|".join(STRUCTURES),
            help="Zero single weights, or remove whole hidden units and shrink the matrices.",
        ),
    ] = "weight",
    weight_ratio: Annotated[
        float | None,
        typer.Option(
            "--weight-ratio",
            metavar="W",
            help="With --structure neuron: then zero this share of the weights that remain.",
            show_default=False,
        ),
    ] = None,
    weight_method: Annotated[
        str | None,
        typer.Option(
            "--weight-method",
            metavar="NAME",
            help=_WEIGHT_METHOD_HELP,
            show_default=False,
        ),
    ] = None,
    pattern: Annotated[
        str | None,
        typer.Option("--pattern", metavar="N:M", help="Keep N of every M consecutive weights."),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps", help="Reach the ratio in this many rounds, recomputing the statistics."
        ),
    ] = 1,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="GLOB", help="Leave matching layers alone."),
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option("--output", metavar="NAME", help="Model output whose deviation counts."),
    ] = None,
    probes: Annotated[int, typer.Option("--probes", help="Most random probe vectors.")] = 16,
    batch_size: BatchSizeOption = 256,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    compensate: Annotated[
        bool | None,
        typer.Option(
            "--compensate/--no-compensate",
            help="Shift biases to compensate (default: the method's own).",
            show_default=False,
        ),
    ] = None,
    parity_tolerance: Annotated[
        float | None,
        typer.Option(
            "--parity-tolerance",
            metavar="REL",
            help="Largest relative deviation of the torch copy from onnxruntime (default: "
            "10x the model's own float rounding noise, at least 1e-3).",
            show_default=False,
        ),
    ] = None,
    batch_axis: BatchAxisOption = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            metavar="SIZE",
            help="Most memory for the statistics' sums, e.g. 8G (default: half the memory "
            "available); beyond it they are taken in groups of layers, one pass each.",
            show_default=False,
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            metavar="int8|int4",
            help="Also store the dense weights quantized (refit by GPTQ on the calibration "
            "data); --ratio may then be left out.",
            show_default=False,
        ),
    ] = None,
    block_size: Annotated[
        int, typer.Option("--block-size", help="int4: inputs sharing one scale.")
    ] = 32,
    quant_format: Annotated[
        str | None,
        typer.Option(
            "--quant-format",
            metavar="qdq|nbits",
            help="DequantizeLinear on integer weights, or com.microsoft MatMulNBits "
            "(default: nbits).",
            show_default=False,
        ),
    ] = None,
    symmetric: Annotated[
        bool | None,
        typer.Option(
            "--symmetric/--asymmetric",
            help="Grid centred on 0, or with a zero point (default: asymmetric).",
            show_default=False,
        ),
    ] = None,
    report: ReportOption = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output.")] = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Prune and/or quantize the dense layers of MODEL; write the copy."""
    console = _stderr_console()
    with _user_errors(debug):
        _check_compress_inputs(model, calib, ratio, method, weight_method)
        memory_bytes = parse_memory(max_memory) if max_memory is not None else None
        from ecprune_onnx.compress import compress
        from ecprune_onnx.modelio import default_output_path

        planned_output = out or default_output_path(model)
        _check_report_path(report, [model, planned_output, calib])
        with _progress_bars(console, enabled=not quiet) as progress:
            result = compress(
                model,
                calib,
                ratio,
                labels=labels,
                output=out,
                method=method,
                scope=scope,
                pattern=pattern,
                steps=steps,
                exclude=exclude or (),
                outputs=outputs or (),
                probes=probes,
                batch_size=batch_size,
                device=device,
                seed=seed,
                compensate=compensate,
                force=force,
                progress=progress,
                structure=structure,
                weight_ratio=weight_ratio,
                weight_method=weight_method,
                parity_tolerance=parity_tolerance,
                batch_axes=_batch_axes(batch_axis),
                budget=budget,
                max_memory=memory_bytes,
                quantize=quantize,
                block_size=block_size,
                quant_format=quant_format,
                symmetric=symmetric,
            )
        if report is not None:
            _write_report_or_undo(report, result.to_dict(), Path(result.output))
    if not quiet:
        _print_compress_result(console, result)
        typer.echo(f"wrote {result.output}")


@app.command(
    "evaluate", cls=_Command, short_help="Compare a pruned model with its original on data."
)
def evaluate_command(
    original: Annotated[Path, typer.Argument(metavar="ORIGINAL", help="The unpruned model.")],
    pruned: Annotated[Path, typer.Argument(metavar="PRUNED", help="The pruned model.")],
    data: Annotated[Path, typer.Option("--data", metavar="NPZ", help="Held-out data.")],
    labels: Annotated[
        str | None, typer.Option("--labels", metavar="KEY", help="Array of labels in the NPZ.")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", metavar="NAME", help="Output the task metrics read."),
    ] = None,
    max_mse: Annotated[
        float | None, typer.Option("--max-mse", help="Gate: largest MSE of any output.")
    ] = None,
    min_accuracy: Annotated[
        float | None, typer.Option("--min-accuracy", help="Gate: lowest accuracy (0-1).")
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option("--max-accuracy-drop", help="Gate: largest accuracy lost (0-1)."),
    ] = None,
    batch_size: BatchSizeOption = 256,
    latency_budget: Annotated[
        float,
        typer.Option(
            "--latency-budget",
            metavar="SECONDS",
            help="Time spent measuring latency at batch 1 and at --batch-size (0: skip).",
        ),
    ] = 4.0,
    device: DeviceOption = "auto",
    batch_axis: BatchAxisOption = None,
    report: ReportOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Compare PRUNED with ORIGINAL on held-out data; exit 1 if a gate fails."""
    console = _stderr_console()
    with _user_errors(debug):
        check_model_file(original)
        check_model_file(pruned)
        check_data_file(data, "--data")
        from ecprune_onnx.evaluate import evaluate

        _check_report_path(report, [original, pruned, data])
        with _progress_bars(console, enabled=not quiet) as progress:
            result = evaluate(
                original,
                pruned,
                data,
                labels,
                output=output,
                max_mse=max_mse,
                min_accuracy=min_accuracy,
                max_accuracy_drop=max_accuracy_drop,
                batch_size=batch_size,
                latency_budget=latency_budget,
                device=device,
                progress=progress,
                batch_axes=_batch_axes(batch_axis),
            )
        if report is not None:
            _write_report(report, result.to_dict())
    if not quiet:
        _print_evaluate_result(console, result)
        typer.echo(_verdict(result))
    elif not result.passed:
        typer.echo(_verdict(result), err=True)
    if not result.passed:
        raise typer.Exit(1)


@app.command("inspect", cls=_Command, short_help="List the dense layers of MODEL, and any skipped.")
def inspect_command(
    model: ModelArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    debug: DebugOption = False,
) -> None:
    """List the dense layers of MODEL that can be pruned, and why others cannot."""
    with _user_errors(debug):
        check_model_file(model)
        from ecprune_onnx.heads import find_unit_groups
        from ecprune_onnx.layers import find_dense_layers
        from ecprune_onnx.modelio import load_model
        from ecprune_onnx.normalize import normalize

        onnx_model = load_model(model)
        normalize(onnx_model)
        scan = find_dense_layers(onnx_model)
        groups = find_unit_groups(onnx_model, scan.layers)
    if as_json:
        typer.echo(json.dumps({**_scan_dict(model, scan), **_groups_dict(groups)}, indent=2))
    else:
        console = Console(highlight=False, markup=False)
        _print_scan(console, scan)
        _print_groups(console, groups)


@app.command(
    "finetune", cls=_Command, short_help="Train the kept weights of MODEL on labelled data."
)
def finetune_command(
    model: ModelArgument,
    data: Annotated[Path, typer.Option("--data", metavar="NPZ", help="Labelled training data.")],
    labels: Annotated[
        str, typer.Option("--labels", metavar="KEY", help="Array of labels in the NPZ.")
    ] = "y",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Finetuned model file (default: MODEL.finetuned.onnx)."),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", metavar="NAME", help="Tensor the loss reads (default: first float output)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training rows.")] = 20,
    learning_rate: Annotated[float, typer.Option("--lr", help="Adam's learning rate.")] = 1e-3,
    batch_size: BatchSizeOption = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and shuffles.")] = 0,
    validation: Annotated[
        float, typer.Option("--validation", help="Share of the rows held out for validation.")
    ] = 0.1,
    device: DeviceOption = "auto",
    report: ReportOption = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output.")] = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Train the remaining dense weights and biases of MODEL on labelled data, zeros kept."""
    console = _stderr_console()
    with _user_errors(debug):
        check_model_file(model)
        check_data_file(data, "--data")
        from ecprune_onnx.finetune import default_finetune_path, finetune

        _check_report_path(report, [model, out or default_finetune_path(model), data])
        with _progress_bars(console, enabled=not quiet) as progress:
            result = finetune(
                model,
                data,
                out,
                labels=labels,
                loss_output=output,
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=seed,
                validation=validation,
                device=device,
                force=force,
                progress=progress,
            )
        if report is not None:
            _write_report_or_undo(report, result.to_dict(), Path(result.output))
    if not quiet:
        _print_finetune_result(console, result)
        typer.echo(f"wrote {result.output}")


# ------------------------------------------------------------------- errors and files


def _check_compress_inputs(
    model: Path,
    calib: Path | None,
    ratio: float | None,
    method: str | None,
    weight_method: str | None,
) -> None:
    """What compress() would refuse first, checked before the library loads."""
    check_model_file(model)
    if calib is not None:
        check_data_file(calib, "--calib")
    if ratio is not None:
        check_ratio(ratio)
    if method is not None:
        check_method(method)
    if weight_method is not None:
        check_method(weight_method, "--weight-method")


@contextlib.contextmanager
def _user_errors(debug: bool) -> Iterator[None]:
    """Turn the user's mistakes into one `error:` line and exit 2; bugs keep their traceback."""
    try:
        yield
    except UsageError as error:
        if debug:
            raise
        _fail(_cli_message(error))
    except (FileNotFoundError, PermissionError) as error:
        # The library reports files it opens as UsageError; these escaped from elsewhere.
        if debug:
            raise
        culprit = error.filename if error.filename is not None else "file"
        _fail(f"{culprit}: {error.strerror or error}")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(_EXIT_INTERRUPTED) from None


def _cli_message(error: UsageError) -> str:
    """The library's message, with the API's argument names as the CLI's options."""
    if isinstance(error, OutputExistsError):
        return f"{error.path}: already exists; pass --force to overwrite it"
    return str(error)


def _fail(message: str) -> None:
    # Plain echo, not rich: rich would wrap a long message and read "[...]" as markup.
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(2)


def _check_report_path(report: Path | None, protected: Iterable[Path | None]) -> None:
    """Refuse a report path that would replace one of the command's files or cannot be written.

    Checked before the work starts so a long run is not lost to a typo.
    """
    if report is None:
        return
    for path in protected:
        if path is not None and report.resolve() == Path(path).resolve():
            raise UsageError(f"--report {report}: would overwrite {path}; choose another file")
    if report.is_dir():
        raise UsageError(f"--report {report}: is a folder; expected a JSON file name")
    if not report.parent.is_dir():
        raise UsageError(f"--report {report}: folder {report.parent} does not exist")


def _write_report(report: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a report."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    handle, staged = tempfile.mkstemp(prefix=f".{report.name}.", dir=report.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(staged, report)
    except OSError as error:
        raise UsageError(
            f"--report {report}: cannot write it ({error.strerror or error})"
        ) from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)


def _write_report_or_undo(report: Path, data: dict, output: Path) -> None:
    """A run whose report cannot be written failed: take the model it wrote back out too."""
    try:
        _write_report(report, data)
    except UsageError:
        from ecprune_onnx.modelio import data_path

        output.unlink(missing_ok=True)
        data_path(output).unlink(missing_ok=True)
        raise


def _json_default(value: object) -> object:
    """numpy scalars and paths that the results may carry."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ------------------------------------------------------------------------ printing


def _stderr_console() -> Console:
    console = Console(stderr=True, highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _LOG_WIDTH
    return console


@contextlib.contextmanager
def _progress_bars(console: Console, enabled: bool) -> Iterator[ProgressCallback | None]:
    """The progress callback the library calls: one bar per task name it reports.

    The bars start at the first report, so an error found before any work is the only
    thing printed (a stopped, empty progress display still prints a blank line).
    """
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    bars = Progress(*columns, console=console)
    task_ids: dict[str, int] = {}

    def report(task: str, done: int, total: int) -> None:
        if not task_ids:
            bars.start()
        if task not in task_ids:
            task_ids[task] = bars.add_task(task, total=total)
        bars.update(task_ids[task], completed=done, total=total)

    try:
        yield report
    finally:
        if task_ids:
            bars.stop()


def _print_compress_result(console: Console, result: CompressResult) -> None:
    console.print(f"device: {result.device}; probes: {result.probes or 'none (no calibration)'}")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(_layer_table(result))
    weights = sum(layer.weights for layer in result.layers)
    removed = sum(layer.removed for layer in result.layers)
    console.print(f"total sparsity: {result.sparsity:.2%} ({removed:,} of {weights:,} weights)")
    if result.calib_rows:
        console.print(
            f"output deviation, sum of squares over {result.calib_rows:,} calibration rows: "
            f"predicted {_number(result.predicted_deviation)}, "
            f"measured {_number(result.measured_deviation)}"
        )
        console.print(f"measured MSE per output element: {_number(result.measured_mse)}")
    else:
        console.print("output deviation: not measured (no calibration data given)")
    if result.parity_deviation is not None:
        console.print(
            f"torch copy vs onnxruntime: relative deviation {result.parity_deviation:.1e} "
            f"(tolerance {result.parity_tolerance:.1e}; the model's float rounding noise "
            f"{result.parity_noise:.1e})"
        )
    for line in _skipped_lines(result.skipped):
        console.print(line)
    for group in result.skipped_groups:
        console.print(f"units not removable: {group.layer}: {group.reason}")
    for name in result.excluded:
        console.print(f"excluded by --exclude: {name}")
    if result.quantize is not None:
        console.print(_quantized_line(result))


def _quantized_line(result: CompressResult) -> str:
    """The grid, the format and the sizes of the input and the written file."""
    grid = "per output channel" if result.block_size is None else f"blocks of {result.block_size}"
    kind = "symmetric" if result.symmetric else "asymmetric"
    before, after = result.size_original, result.size_output
    return (
        f"quantized {result.quantize} ({grid}, {kind}) as {result.quant_format}: file "
        f"{before.raw:,} -> {after.raw:,} B ({before.raw / after.raw:.2f}x smaller), gzip -9 "
        f"{before.gzip:,} -> {after.gzip:,} B ({before.gzip / after.gzip:.2f}x); latency: "
        "ecprune-onnx evaluate"
    )


def _batch_axes(texts: list[str] | None) -> dict[str, int | None]:
    from ecprune_onnx.calib import parse_batch_axes

    return parse_batch_axes(texts or ())


def _skipped_lines(skipped) -> list[str]:
    """One line per skipped node; nodes skipped for the same kind of reason (the attention
    products of a transformer) share one line."""
    by_reason: dict[str, list] = {}
    for node in skipped:
        by_reason.setdefault(_reason_kind(node.reason), []).append(node)
    lines = []
    for kind, nodes in by_reason.items():
        if len(nodes) == 1:
            lines.append(f"skipped {nodes[0].node} ({nodes[0].op_type}): {nodes[0].reason}")
        else:
            ops = "/".join(sorted({node.op_type for node in nodes}))
            lines.append(
                f"skipped {len(nodes)} {ops} nodes: {kind} (ecprune-onnx inspect lists them)"
            )
    return lines


def _reason_kind(reason: str) -> str:
    """A skip reason without the names in quotes: the same for nodes skipped alike."""
    return re.sub(r"'[^']*'", "'…'", reason)


def _layer_table(result: CompressResult) -> Table:
    table = Table(title=_layer_table_title(result))
    for column in ("layer", "shape", "removed / weights", "sparsity"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    table.add_column("predicted damage", justify="right")
    table.add_column("bias shift norm", justify="right")
    neurons = result.structure == "neuron"
    if neurons:
        table.add_column("units removed", justify="right")
    for layer in result.layers:
        units = [] if not neurons else [_count(layer.units_removed, layer.shape[0])]
        table.add_row(
            layer.name,
            _shape(layer.shape),
            f"{layer.removed:,} / {layer.weights:,}",
            f"{layer.sparsity:.1%}",
            _number(layer.predicted_damage),
            _number(layer.bias_shift_norm),
            *units,
        )
    return table


def _layer_table_title(result: CompressResult) -> str:
    """What was pruned by which method; `removed` in the table counts all of it."""
    if result.structure != "neuron":
        budgets = f", layer budgets {result.budget}" if result.budget else ""
        return f"{result.method} pruning, {result.scope} scope{budgets}"
    title = f"{result.method} unit pruning"
    if result.weight_ratio:
        title += f", then {result.weight_method} on {result.weight_ratio:.0%} of the weights left"
    return f"{title}, {result.scope} scope"


def _count(part: int | None, whole: int) -> str:
    return "-" if part is None else f"{part:,} / {whole:,}"


def _print_evaluate_result(console: Console, result: EvaluateResult) -> None:
    console.print(_deviation_table(result))
    if result.top1_agreement is not None:
        console.print(f"top-1 agreement on {result.task_output}: {result.top1_agreement:.2%}")
    if result.metric is not None:
        console.print(
            f"{result.metric} on {result.task_output}: original "
            f"{_metric(result.metric, result.metric_original)}, "
            f"pruned {_metric(result.metric, result.metric_pruned)}"
        )
    console.print(_sparsity_table(result))
    console.print(_size_and_speed_table(result))
    if result.gates:
        console.print(_gate_table(result))


def _deviation_table(result: EvaluateResult) -> Table:
    table = Table(title="output deviation, pruned vs original")
    table.add_column("output")
    for column in ("MSE", "max abs", "relative"):
        table.add_column(column, justify="right")
    for deviation in result.outputs:
        table.add_row(
            deviation.name,
            _number(deviation.mse),
            _number(deviation.max_abs),
            _number(deviation.relative),
        )
    return table


def _sparsity_table(result: EvaluateResult) -> Table:
    table = Table(title="sparsity of the pruned model")
    table.add_column("layer")
    for column in ("shape", "zeros", "sparsity"):
        table.add_column(column, justify="right")
    for layer in result.layers:
        table.add_row(layer.name, _shape(layer.shape), f"{layer.zeros:,}", f"{layer.sparsity:.1%}")
    return table


def _size_and_speed_table(result: EvaluateResult) -> Table:
    """Parameters, dense FLOPs, file size and latency of both models; the last column is
    pruned / original, so below 1 means smaller or faster. Latency: the median and half
    the interquartile range of the timed samples; the ratio is the median of the paired
    ratios, with their interquartile range."""
    original, pruned = result.footprint_original, result.footprint_pruned
    table = Table(title=f"size and speed ({result.provider})")
    if any(timing.within_noise for timing in result.latency):
        table.caption = "*: within noise (the two interquartile ranges overlap)"
    table.add_column("")
    for column in ("original", "pruned", "pruned / original"):
        table.add_column(column, justify="right")
    counts = (
        ("parameters", original.parameters, pruned.parameters),
        ("FLOPs / sample (dense)", original.flops_per_sample, pruned.flops_per_sample),
        ("file size, B", original.file_bytes, pruned.file_bytes),
        ("file size after gzip -9, B", original.gzip_bytes, pruned.gzip_bytes),
    )
    for label, before, after in counts:
        table.add_row(label, f"{before:,}", f"{after:,}", _ratio(after, before))
    for timing in result.latency:
        table.add_row(
            f"latency, batch {timing.batch}",
            _latency(timing.original),
            _latency(timing.pruned),
            _latency_ratio(timing),
        )
    return table


def _latency(latency: Latency) -> str:
    half_range = (latency.q3_ms - latency.q1_ms) / 2 / latency.median_ms
    return f"{latency.median_ms:.3g} ms ±{half_range:.0%}"


def _latency_ratio(timing: LatencyComparison) -> str:
    spread = f"{timing.ratio:.2f}x ({timing.ratio_q1:.2f}-{timing.ratio_q3:.2f})"
    return f"{spread}*" if timing.within_noise else spread


def _gate_table(result: EvaluateResult) -> Table:
    table = Table(title="quality gates")
    table.add_column("gate")
    for column in ("threshold", "value", "result"):
        table.add_column(column, justify="right")
    for gate in result.gates:
        verdict = "PASS" if gate.passed else "FAIL"
        table.add_row(gate.name, _number(gate.threshold), _number(gate.value), verdict)
    return table


def _verdict(result: EvaluateResult) -> str:
    failed = [gate for gate in result.gates if not gate.passed]
    if failed:
        details = "; ".join(
            f"{gate.name} {_number(gate.value)} (threshold {_number(gate.threshold)})"
            for gate in failed
        )
        return f"FAIL: {details}"
    return f"PASS: {len(result.gates)} gates passed" if result.gates else "no gates checked"


def _print_finetune_result(console: Console, result: FinetuneResult) -> None:
    console.print(
        f"device: {result.device}; loss: {result.loss} on {result.loss_output}; "
        f"rows: {result.train_rows:,} training, {result.validation_rows:,} validation"
    )
    console.print(
        f"trained {len(result.layers)} dense layers: {result.trainable:,} parameters, "
        f"{result.frozen_zeros:,} zero weights held at zero"
    )
    console.print(_epoch_table(result))
    if result.validation_loss:
        console.print(f"kept epoch {result.best_epoch} (lowest validation loss; 0: as given)")


def _epoch_table(result: FinetuneResult) -> Table:
    """One row per epoch; row 0 is the validation loss of the model as given."""
    table = Table(title=f"finetuning, {result.loss} loss")
    for column in ("epoch", "train loss", "validation loss"):
        table.add_column(column, justify="right")
    validation = result.validation_loss or [None] * (result.epochs + 1)
    if result.validation_loss:
        table.add_row("0", "", _number(validation[0]))
    for epoch, train_loss in enumerate(result.train_loss[1:], start=1):
        marker = " *" if epoch == result.best_epoch and result.validation_loss else ""
        table.add_row(f"{epoch}{marker}", _number(train_loss), _number(validation[epoch]))
    return table


def _print_scan(console: Console, scan: LayerScan) -> None:
    table = Table(title="dense layers")
    table.add_column("layer")
    table.add_column("kind")
    table.add_column("shape [out, in]", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("weight")
    table.add_column("bias")
    for layer in scan.layers:
        row = _layer_dict(layer)
        table.add_row(
            row["name"],
            row["kind"],
            _shape(row["shape"]),
            f"{row['parameters']:,}",
            row["weight"],
            row["bias"] or "none",
        )
    console.print(table)
    for node in scan.skipped:
        console.print(f"skipped {node.node} ({node.op_type}): {node.reason}")


def _print_groups(console: Console, scan: GroupScan) -> None:
    """The neuron groups and attention heads --structure neuron can shrink, and the layers
    whose units it cannot."""
    from ecprune_onnx.heads import unit_group_summary

    rows = [unit_group_summary(group) for group in scan.groups]
    table = Table(title="neuron groups (--structure neuron)")
    for column in ("producer", "units", "path", "consumers"):
        table.add_column(column, justify="right" if column == "units" else "left")
    for row in (row for row in rows if row["kind"] == "neurons"):
        path, consumers = ", ".join(row["path"]) or "-", ", ".join(row["consumers"])
        producer = " + ".join([row["producer"], *row["partners"]])  # a gate and its up proj
        table.add_row(producer, f"{row['units']:,}", path, consumers)
    console.print(table)
    heads = Table(title="attention heads (--structure neuron)")
    for column in ("output projection", "heads", "head_dim", "q, k, v projections"):
        heads.add_column(column, justify="right" if column.startswith("head") else "left")
    for row in (row for row in rows if row["kind"] == "heads"):
        projections = ", ".join(dict.fromkeys(row["projections"]))
        heads.add_row(row["output"], str(row["heads"]), str(row["head_dim"]), projections)
    if heads.rows:
        console.print(heads)
    for skipped in scan.skipped:
        console.print(f"units not removable: {skipped.layer}: {skipped.reason}")


def _groups_dict(scan: GroupScan) -> dict:
    from ecprune_onnx.heads import unit_group_summary

    rows = [unit_group_summary(group) for group in scan.groups]
    kinds = [row.pop("kind") for row in rows]
    return {
        "neuron_groups": [row for row, kind in zip(rows, kinds) if kind == "neurons"],
        "head_groups": [row for row, kind in zip(rows, kinds) if kind == "heads"],
        "skipped_groups": [{"layer": s.layer, "reason": s.reason} for s in scan.skipped],
    }


def _scan_dict(model: Path, scan: LayerScan) -> dict:
    return {
        "model": str(model),
        "layers": [_layer_dict(layer) for layer in scan.layers],
        "skipped": [
            {"node": node.node, "op_type": node.op_type, "reason": node.reason}
            for node in scan.skipped
        ],
    }


def _layer_dict(layer: DenseLayer) -> dict:
    """What `inspect` shows of a DenseLayer; parameters count the effective bias too."""
    out_features, in_features = layer.shape
    bias_count = out_features if layer.bias_name is not None else 0
    return {
        "name": layer.name,
        "kind": layer.kind,
        "shape": [int(out_features), int(in_features)],
        "parameters": int(out_features * in_features + bias_count),
        "weight": layer.weight_name,
        "bias": layer.bias_name,
        "dtype": str(layer.weight_dtype),
    }


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _metric(name: str, value: float | None) -> str:
    return f"{value:.2%}" if name == "accuracy" and value is not None else _number(value)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "n/a"
