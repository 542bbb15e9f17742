"""The `luncher` command: parses options, calls one library function, renders the result."""

# No `from __future__ import annotations` here: typer reads every command's annotations on
# each run, and string annotations cost it an eval each (6 ms of every command's start).

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from healthyluncher.config import Hyperparameters
from healthyluncher.errors import LuncherError

if TYPE_CHECKING:
    from healthyluncher.store import ModelStore

CONTEXT = {"help_option_names": ["-h", "--help"]}


class _Console:
    """A rich Console created on first use: `--json` output and `--help` never import rich's
    rendering (about 20 ms of every cold start)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=True, **self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


out = _Console()
err = _Console(stderr=True)


def escape(text: str) -> str:
    """rich's markup escape, imported when something is printed with markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers
    style: str = ""  # rich style of every cell, at a terminal


def print_table(title: str, columns: list[Column], rows: list[list[tuple[str, str]]]) -> None:
    """A table: drawn by rich at a terminal; piped, plain columns separated by two spaces
    (grep- and awk-friendly, and no rich import). Cells are (text, rich style or "")."""
    if not sys.stdout.isatty():
        widths = [
            max([len(c.header)] + [len(row[i][0]) for row in rows]) for i, c in enumerate(columns)
        ]

        def line(cells: list[str]) -> str:
            parts = [
                cell.rjust(width) if column.right else cell.ljust(width)
                for cell, width, column in zip(cells, widths, columns, strict=True)
            ]
            return "  ".join(parts).rstrip()

        text = [title, line([c.header for c in columns])]
        text += [line([cell for cell, _ in row]) for row in rows]
        sys.stdout.write("\n".join(text) + "\n")
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(
            column.header,
            justify="right" if column.right else "left",
            style=column.style or None,
            overflow="fold" if index == 0 else "ellipsis",
        )
    for row in rows:
        table.add_row(
            *(
                f"[{style}]{escape(cell)}[/{style}]" if style else escape(cell)
                for cell, style in row
            )
        )
    out.print(table)


def say(text: str) -> None:
    """A line of plain text (no markup) on stdout."""
    sys.stdout.write(text + "\n")


_debug_requested = False


def reporting(command: Callable[..., None]) -> Callable[..., None]:
    """Turn errors into one red line on stderr and exit 1 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except LuncherError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: the models directory was not changed")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (`luncher predict --json photos/ | head`): stop quietly,
            # and keep Python from complaining while it flushes stdout on exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except Exception as exc:
            if _debug_requested or os.environ.get("LUNCHER_DEBUG"):
                raise
            err.print(
                f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(str(exc))} "
                "(run with --debug for the traceback)"
            )
            raise typer.Exit(1) from None

    return wrapper


app = typer.Typer(
    context_settings=CONTEXT,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Personalize a lunch-photo classifier (healthy / fast food) on your own machine.",
)


@app.callback()
def main_options(
    ctx: typer.Context,
    models_dir: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option(
            "--models-dir",
            help="Where models and your examples live. Default: $LUNCHER_MODELS_DIR, "
            "else your user data directory.",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of unexpected errors.")
    ] = False,
) -> None:
    global _debug_requested
    _debug_requested = debug
    ctx.obj = {"models_dir": models_dir}


def _store(ctx: typer.Context) -> "ModelStore":
    from healthyluncher.store import ModelStore, resolve_models_dir

    return ModelStore(resolve_models_dir((ctx.obj or {}).get("models_dir")))


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, got {text!r}") from None


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


@app.command("make-updatable")
@reporting
def make_updatable(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="An ONNX image classifier.", show_default=False)],
    labels: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Class names in output order, comma-separated (else from metadata)."),
    ] = None,
    trainable_layers: Annotated[
        int, typer.Option(min=1, help="How many of the last layers with weights train.")
    ] = 1,
    resize: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Short side in pixels before the centre crop."),
    ] = None,
    mean: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Per-channel mean in 0..255 pixel units, e.g. 123.7,116.3,103.5."),
    ] = None,
    std: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Per-channel std in 0..255 pixel units, e.g. 58.4,57.1,57.4."),
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="Default epochs for retrain.")
    ] = Hyperparameters.epochs,
    learning_rate: Annotated[
        float, typer.Option(help="Default learning rate.")
    ] = Hyperparameters.learning_rate,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Training batch size.")
    ] = Hyperparameters.batch_size,
    optimizer: Annotated[Optimizer, typer.Option(help="Training optimizer.")] = Optimizer.adamw,
    replay: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="An .npz of head inputs and labels from the base's training data."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing base.")] = False,
    keep_personalization: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--keep-personalization/--drop-personalization",
            help="Carry your examples over to the new base and retrain on it (default: ask).",
            show_default=False,
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Quantize the frozen part to int8 (static, per-channel); needs --calibration.",
        ),
    ] = False,
    calibration: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="A directory of photos to calibrate --int8 on (at most 200 are used).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Turn MODEL into a base whose last layers train on your photos.

    Example: luncher make-updatable mobilenet.onnx --labels healthy,fast_food --trainable-layers 2
    """
    from healthyluncher.updatable import UpdatableOptions
    from healthyluncher.updatable import make_updatable as run

    options = UpdatableOptions(
        labels=tuple(x.strip() for x in labels.split(",")) if labels else None,
        trainable_layers=trainable_layers,
        resize=resize,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        hyperparameters=Hyperparameters(
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            optimizer=optimizer.value,
        ),
        replay=replay,
        force=force or keep_personalization is False,
        keep_personalization=_ask_to_keep(ctx)
        if keep_personalization is None
        else keep_personalization,
        int8=int8,
        calibration=calibration,
    )
    with _status(f"Making {model.name} updatable"):
        result = run(_store(ctx), model, options)
    print_table(
        f"Layers of {model.name}",
        [Column("layer"), Column("op"), Column("parameters", right=True), Column("")],
        [
            [
                (layer.name, ""),
                (layer.op, ""),
                (f"{layer.params:,}", ""),
                ("trainable", "green") if layer.trainable else ("frozen", "dim"),
            ]
            for layer in result.meta.layers
        ],
    )
    meta = result.meta
    out.print(
        f"Base ready in {escape(str(result.directory))}: labels {', '.join(meta.labels)}; "
        f"input {meta.preprocessing.height}x{meta.preprocessing.width} "
        f"{meta.preprocessing.layout}; training from tensor {escape(meta.split_tensor)!r}."
    )
    if meta.int8:
        out.print(f"The frozen part is int8, calibrated on {meta.calibration_photos} photo(s).")
    if result.dropped_personalization:
        out.print("The previous personalization was removed.")
    if result.carried_over is not None:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.carried_over.items()))
        out.print(
            f"Your personalization was carried over and retrained on the new base ({counts})."
        )
        if result.not_carried:
            out.print(f"{result.not_carried} example(s) had no thumbnail and were left behind.")


def _ask_to_keep(ctx: typer.Context) -> bool | None:
    """Offer to keep an existing personalization, when a person is at the terminal."""
    if not sys.stdin.isatty():
        return None

    store = _store(ctx)
    if store.read_state().personal is None:
        return None
    return typer.confirm(
        "Keep your personalization on the new base (retrain it there)?", default=True
    )


@contextmanager
def _status(message: str) -> Iterator[None]:
    if err.is_terminal:
        with err.status(message):
            yield
    else:
        yield


@app.command()
@reporting
def predict(
    ctx: typer.Context,
    images: Annotated[
        list[Path], typer.Argument(help="Photos, or directories to search.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    base: Annotated[bool, typer.Option("--base", help="Ignore the personalization.")] = False,
) -> None:
    """Say whether each photo is healthy or fast food, and how sure the model is.

    Example: luncher predict pancakes.jpg photos/ --json
    """
    from healthyluncher.photos import ImageFailure, find_images
    from healthyluncher.predicting import Predictor

    predictor = Predictor(_store(ctx), use_base=base)
    paths = find_images(images)
    if not paths:
        raise LuncherError("no image files found in " + ", ".join(map(str, images)))
    failed = 0
    rows = []
    for result in predictor.predict(paths):
        if isinstance(result, ImageFailure):
            failed += 1
            if as_json:
                _json_line({"path": str(result.path), "error": result.error})
            err.print(f"[red]error:[/red] {escape(result.error)}")
            continue
        if as_json:
            _json_line(
                {
                    "path": str(result.path),
                    "label": result.label,
                    "probability": round(result.probability, 6),
                    "probabilities": {k: round(v, 6) for k, v in result.probabilities.items()},
                }
            )
        else:
            rows.append(result)
    if not as_json and rows:
        which = "personalized" if predictor.model.personalized else "base"
        labels = predictor.model.labels
        print_table(
            f"Predictions ({which} model)",
            [Column("photo"), Column("label"), Column("probability", right=True)]
            + [Column(label, right=True, style="dim") for label in labels],
            [
                [(str(row.path), ""), (row.label, "bold"), (f"{row.probability:.1%}", "")]
                + [(f"{row.probabilities[label]:.1%}", "") for label in labels]
                for row in rows
            ],
        )
    if failed:
        raise typer.Exit(1)


def _json_line(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


@app.command()
@reporting
def retrain(
    ctx: typer.Context,
    images: Annotated[
        list[Path], typer.Argument(help="Photos, or directories to search.", show_default=False)
    ],
    label: Annotated[str, typer.Option(help="What these photos are.", show_default=False)],
    epochs: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Passes over the examples (default: the model's setting)."),
    ] = None,
    learning_rate: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Default: the model's setting."),
    ] = None,
    views: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            min=1,
            help="Augmented views per photo; 1 turns augmentation off. Default: up to 8 "
            "for a few photos, 1 from 16 photos on.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Teach the model that these photos are LABEL.

    Example: luncher retrain --label healthy my-pancakes/
    """
    from healthyluncher.personalize import retrain as run

    with _progress() as report:
        result = run(
            _store(ctx),
            label,
            images,
            epochs=epochs,
            learning_rate=learning_rate,
            augment_views=views,
            progress=report,
        )
    for failure in result.failures:
        err.print(f"[yellow]skipped:[/yellow] {escape(failure.error)}")
    if as_json:
        _json_line(
            {
                "label": result.label,
                "photos": [
                    {
                        "path": str(p.path),
                        "before": round(p.before, 6),
                        "after": round(p.after, 6),
                    }
                    for p in result.photos
                ],
                "skipped": [{"path": str(f.path), "error": f.error} for f in result.failures],
                "examples_per_label": result.examples_per_label,
                "final_loss": round(result.final_loss, 6),
                "views_per_photo": result.views,
                "hyperparameters": result.hyperparameters.to_json(),
            }
        )
    else:
        print_table(
            f"Probability of {result.label!r}",
            [Column("photo"), Column("before", right=True), Column("after", right=True)],
            [
                [
                    (str(photo.path), ""),
                    (f"{photo.before:.1%}", ""),
                    (f"{photo.after:.1%}", "green" if photo.after >= photo.before else "red"),
                ]
                for photo in result.photos
            ],
        )
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
        say(
            f"Trained {result.hyperparameters.epochs} epochs on your examples ({counts}); "
            f"{result.views} view(s) per new photo; {result.cached} photo(s) came from the "
            "cache."
        )
    if result.failures:
        raise typer.Exit(1)


@contextmanager
def _progress() -> Iterator[Any]:
    """A progress callback drawing rich bars on stderr (silent when not a terminal)."""
    if not sys.stderr.isatty() or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bars = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err.real(),
        transient=True,
        disable=not err.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield report


@app.command()
@reporting
def reset(ctx: typer.Context) -> None:
    """Remove the personalization and your examples; the pristine base stays.

    Example: luncher reset
    """
    from healthyluncher.personalize import reset as run

    result = run(_store(ctx))
    if not result.removed_model:
        out.print("Nothing to reset: predictions already come from the base model.")
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.removed_examples.items()))
    out.print(
        f"Removed the personalized model and your examples ({counts or 'none'}) "
        f"and {result.removed_cache_files} cached embedding file(s). Predictions now come "
        "from the base model."
    )


@app.command("export")
@reporting
def export_backup(
    ctx: typer.Context,
    backup: Annotated[
        Path, typer.Argument(help="The archive to write (.tar.gz).", show_default=False)
    ],
) -> None:
    """Save your personalization, your examples and your photos' thumbnails to one archive.

    Example: luncher export luncher-backup.tar.gz
    """
    from healthyluncher.backup import export_backup as run

    result = run(_store(ctx), backup)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    size = f"{result.size / 2**20:.1f} MiB" if result.size >= 2**20 else f"{result.size} bytes"
    out.print(
        f"Wrote {escape(str(result.path))} ({size}): labels "
        f"{escape(', '.join(result.labels))}; your examples ({escape(counts)}) and "
        f"{result.thumbnails} thumbnail(s)."
    )
    if result.without_thumbnail:
        out.print(
            f"{result.without_thumbnail} photo(s) have no thumbnail: they restore on this base "
            "but cannot be embedded again on another."
        )


@app.command("import")
@reporting
def import_backup(
    ctx: typer.Context,
    backup: Annotated[
        Path, typer.Argument(help="An archive written by 'luncher export'.", show_default=False)
    ],
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="For a backup of another base: embed its photos again with this base and "
            "retrain with its settings.",
        ),
    ] = False,
) -> None:
    """Restore a personalization saved by 'luncher export'; 'luncher undo' goes back.

    Example: luncher import luncher-backup.tar.gz
    """
    from healthyluncher.backup import import_backup as run

    with _progress() as report:
        result = run(_store(ctx), backup, rebuild=rebuild, progress=report)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    if result.rebuilt:
        out.print(
            f"Embedded your photos with this base and retrained ({escape(counts)}); "
            f"labels {escape(', '.join(result.labels))}."
        )
        if result.not_carried:
            out.print(f"{result.not_carried} photo(s) had no usable thumbnail and were left out.")
    else:
        out.print(
            f"Restored the personalized model trained {result.trained_at} ({escape(counts)}); "
            f"labels {escape(', '.join(result.labels))}."
        )
    out.print(f"{result.undo_steps} undo step(s) available.")


@app.command()
@reporting
def undo(ctx: typer.Context) -> None:
    """Go back to the personalized model as it was before the last retrain.

    Example: luncher undo
    """
    from healthyluncher.personalize import undo as run

    result = run(_store(ctx))
    if result.restored == "base":
        out.print("Back to the base model (no personalization).")
    else:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
        out.print(f"Restored the personalized model trained {result.trained_at} ({counts}).")
    out.print(f"{result.remaining_undos} more undo step(s) available.")


@app.command()
@reporting
def forget(
    ctx: typer.Context,
    images: Annotated[
        list[Path], typer.Argument(help="Photos, or directories to search.", show_default=False)
    ],
) -> None:
    """Remove these photos from your examples and retrain without them.

    Example: luncher forget my-pancakes/burnt.jpg
    """
    from healthyluncher.personalize import forget as run

    with _progress() as report:
        result = run(_store(ctx), images, progress=report)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    if result.retrained:
        out.print(f"Forgot {result.forgotten} photo(s) and retrained on the rest ({counts}).")
    else:
        out.print(f"Forgot {result.forgotten} photo(s); no examples remain, so the base predicts.")


@app.command()
@reporting
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show the base, your examples, and which model predicts.

    Example: luncher status --json
    """
    from dataclasses import asdict

    from healthyluncher.personalize import status as run

    result = run(_store(ctx))
    if as_json:
        data = asdict(result)
        data["models_dir"] = str(result.models_dir)
        _json_line(data)
        return
    out.print(f"[bold]models directory[/bold]  {escape(str(result.models_dir))}")
    out.print(
        f"[bold]base[/bold]              {escape(result.base_name)} "
        f"(sha256 {result.base_sha256[:12]}, {escape(result.base_source)}"
        f"{', int8 frozen part' if result.int8 else ''})"
    )
    out.print(f"[bold]labels[/bold]            {', '.join(map(escape, result.labels))}")
    out.print(f"[bold]predicting with[/bold]   the {result.predicting_with} model")
    examples = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    out.print(f"[bold]your examples[/bold]     {escape(examples) or 'none'}")
    out.print(
        f"[bold]undo steps[/bold]        {result.undo_steps}; the models directory holds "
        f"{result.disk_bytes / 2**20:.1f} MiB"
    )
    if result.last_retrain:
        hp = result.hyperparameters
        out.print(
            f"[bold]last retrain[/bold]      {result.last_retrain} ({result.retrains} in all; "
            f"{hp['epochs']} epochs, lr {hp['learning_rate']}, {hp['optimizer']}, "
            f"{_views_setting(hp)})"
        )


def _views_setting(hp: dict[str, Any]) -> str:
    views = hp["augment_views"]
    if views == 1:
        return "1 view per photo"
    if hp.get("view_budget", 0) > 0:
        return f"up to {views} views per photo, {hp['view_budget']} per retrain"
    return f"{views} views per photo"


def main() -> None:
    import warnings

    # Pillow warns about damaged metadata it recovers from; errors are reported per file.
    warnings.filterwarnings("ignore", module="PIL")
    app()


if __name__ == "__main__":
    main()
