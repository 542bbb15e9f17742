"""`luncher make-updatable`, `export` and `import`: setting up a base, and backups."""

# No `from __future__ import annotations` here: typer reads the annotations at run time.

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from healthyluncher.cli_app import (
    JSON,
    Optimizer,
    Preset,
    app,
    ask,
    backup_target,
    bounded,
    file_path,
    floats,
    given_path,
    in_options,
    luncher,
    names,
)
from healthyluncher.cli_output import (
    Column,
    escape,
    json_line,
    note,
    out,
    print_table,
    progress_bars,
    quiet,
    reporting,
    spinner,
    suggest,
)
from healthyluncher.errors import UNDO
from healthyluncher.settings import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_LEARNING_RATE,
    MAX_SIDE,
    MAX_TRAINABLE_LAYERS,
    Hyperparameters,
)


@app.command("make-updatable")
@reporting
def make_updatable(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Argument(
            help="An ONNX image classifier.",
            show_default=False,
            metavar="MODEL.onnx",
            parser=given_path,
        ),
    ],
    labels: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            metavar="A,B,...",
            help="Class names in output order, comma-separated (else from metadata).",
        ),
    ] = None,
    trainable_layers: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=1,
            max=MAX_TRAINABLE_LAYERS,
            help="How many of the last layers with weights train.",
        ),
    ] = 1,
    examples: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            parser=given_path,
            metavar="DIR",
            help="A folder with one subfolder of photos per label: train the head on them "
            "(a new final layer when the labels are not the model's own).",
            show_default=False,
        ),
    ] = None,
    balance_subfolders: Annotated[
        bool,
        typer.Option(
            "--balance-subfolders",
            help="With --examples: each subfolder of a label (its dishes, say) weighs the "
            "same within it, however many photos it holds.",
        ),
    ] = False,
    preprocessing: Annotated[
        Optional[Preset],  # noqa: UP045
        typer.Option(
            help="Pixel normalization: imagenet (torchvision, timm), inception ([-1, 1]: "
            "Keras MobileNet, TF), unit ([0, 1]) or raw (0..255). Default: the model's "
            "metadata, else imagenet.",
            show_default=False,
        ),
    ] = None,
    resize: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            metavar="PX", min=1, max=MAX_SIDE, help="Short side in pixels before the centre crop."
        ),
    ] = None,
    mean: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            metavar="R,G,B", help="Per-channel mean in 0..255 pixel units, e.g. 123.7,116.3,103.5."
        ),
    ] = None,
    std: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            metavar="R,G,B", help="Per-channel std in 0..255 pixel units, e.g. 58.4,57.1,57.4."
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(metavar="N", min=1, max=MAX_EPOCHS, help="Default epochs for retrain.")
    ] = Hyperparameters.epochs,
    learning_rate: Annotated[
        float,
        typer.Option(
            parser=bounded(0.0, MAX_LEARNING_RATE, above=True),
            metavar="LR",
            show_default=False,  # with the range, as typer shows an int option's
            help=f"Default learning rate.  [default: {Hyperparameters.learning_rate:g}; "
            f"0<x<={MAX_LEARNING_RATE:g}]",
        ),
    ] = Hyperparameters.learning_rate,
    batch_size: Annotated[
        int, typer.Option(metavar="N", min=1, max=MAX_BATCH, help="Training batch size.")
    ] = Hyperparameters.batch_size,
    optimizer: Annotated[Optimizer, typer.Option(help="Training optimizer.")] = Optimizer.adamw,
    replay: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            parser=given_path,
            metavar="FILE.npz",
            help="An .npz of head inputs and labels from the base's training data.",
        ),
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
            parser=given_path,
            metavar="DIR",
            help="A directory of photos to calibrate --int8 on (at most 200 are used).",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="List every layer, not only near the cut.")
    ] = False,
    as_json: JSON = False,
) -> None:
    """Make an ONNX classifier a base your photos personalize.

    Its last layers train; everything before them stays frozen.

    Example: luncher make-updatable mobilenet.onnx --examples my-lunches/
    """
    from healthyluncher import api

    mean_values, std_values = floats(mean, "--mean"), floats(std, "--std")
    label_names = names(labels, "--labels")
    hyperparameters = Hyperparameters(
        epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, optimizer=optimizer.value
    )
    keep = _ask_to_keep(ctx) if keep_personalization is None else keep_personalization
    with progress_bars() as report, spinner(f"Making {model.name} updatable", report is None):
        result = api.make_updatable(
            model,
            labels=label_names,
            trainable_layers=trainable_layers,
            models_dir=(ctx.obj or {}).get("models_dir"),
            resize=resize,
            mean=mean_values,
            std=std_values,
            hyperparameters=hyperparameters,
            replay=replay,
            force=force,
            keep_personalization=keep,
            int8=int8,
            calibration=calibration,
            examples=examples,
            balance_subfolders=balance_subfolders,
            preprocessing=preprocessing.value if preprocessing else None,
            progress=report,
        )
    if as_json:
        json_line(result)
        return
    if not quiet[0]:  # --quiet: the result lines only, not the layers
        _print_layers(result.meta.layers, model.name, verbose)
    if not result.changed:
        out.print(f"Nothing changed (no new undo step): {escape(model.name)} is the base in use.")
        return
    _print_summary(result)


def _print_layers(layers: Sequence[Any], name: str, verbose: bool) -> None:
    shown = list(layers)
    if not verbose:  # the layers around the cut: the last frozen ones and every trainable one
        first = next((i for i, layer in enumerate(layers) if layer.trainable), len(layers))
        shown = list(layers[max(0, first - 3) :])
    title = f"Layers of {name}"
    if len(shown) < len(layers):
        title += f" (the last {len(shown)} of {len(layers)}; --verbose lists all)"
    print_table(
        title,
        [Column("layer"), Column("op"), Column("parameters", right=True), Column("")],
        [
            [
                (layer.name, ""),
                (layer.op, ""),
                (f"{layer.params:,}", ""),
                ("trainable", "green") if layer.trainable else ("frozen", "dim"),
            ]
            for layer in shown
        ],
    )


def _print_summary(result: Any) -> None:
    head = result.examples
    if head is not None:
        counts = ", ".join(f"{k}: {v}" for k, v in head.photos.items())
        what = (
            "A new final layer for" if head.replaced_head else "The model's own head, fine-tuned on"
        )
        accuracy = (
            f"held-out accuracy {head.held_out_accuracy:.1%} on {head.held_out} photo(s)"
            if head.held_out
            else "too few photos to hold any out"
        )
        out.print(
            f"{what} your photos ({escape(counts)}), {head.epochs} epochs: {accuracy}."
            + (f" {head.skipped} photo(s) could not be read." if head.skipped else "")
        )
        if head.contradictory:
            named = ", ".join(head.contradictory[:3]) + (
                ", ..." if len(head.contradictory) > 3 else ""
            )
            out.print(
                f"{len(head.contradictory)} file(s) hold a photo that is also under another "
                f"label; they were left out: {escape(named)}"
            )
        if head.input_scale != 1.0:
            note(
                f"The model's features are very large; they are scaled by "
                f"{head.input_scale:.3g} before the head, so that training steps stay small."
            )
    meta = result.meta
    prep = meta.preprocessing
    note(
        f"Preprocessing from {escape(in_options(result.preprocessing_source))}: "
        f"short side {prep.resize}, "
        f"crop {prep.height}x{prep.width}, mean {_numbers(prep.mean)}, std {_numbers(prep.std)}."
    )
    out.print(
        f"Base ready in {escape(str(result.directory))}: labels {escape(', '.join(meta.labels))}; "
        f"input {meta.preprocessing.height}x{meta.preprocessing.width} "
        f"{meta.preprocessing.layout}; training from tensor {escape(meta.split_tensor)!r}."
    )
    if result.replay_found is not None:
        note(
            f"Replay set: {meta.replay_examples} examples from {escape(str(result.replay_found))}"
            " (found beside the model), so personalizing it does not forget."
        )
    if meta.int8:
        out.print(f"The frozen part is int8, calibrated on {meta.calibration_photos} photo(s).")
    if result.dropped_personalization:
        note(f"The previous base and your personalization are one {suggest(UNDO)} away.")
    if result.carried_over is not None:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.carried_over.items()))
        out.print(
            f"Your personalization was carried over and retrained on the new base "
            f"({escape(counts)})."
        )
        if result.not_carried:
            out.print(
                f"{result.not_carried} example(s) had no usable thumbnail and were left behind; "
                f"{suggest(UNDO)} goes back to the previous base with them."
            )


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _ask_to_keep(ctx: typer.Context) -> bool | None:
    """Offer to keep an existing personalization, when a person is at the terminal."""
    if not sys.stdin.isatty() or not luncher(ctx).personalized:
        return None
    return ask("Keep your personalization on the new base (retrain it there)?", default=True)


@app.command("export")
@reporting
def export_backup(
    ctx: typer.Context,
    backup: Annotated[
        Path,
        typer.Argument(
            help="The archive to write: a name ending in .tar.gz or .tgz.",
            show_default=False,
            metavar="BACKUP.tar.gz",
            parser=backup_target,
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
    as_json: JSON = False,
) -> None:
    """Save your personalization and thumbnails to an archive.

    Example: luncher export luncher-backup.tar.gz
    """
    result = luncher(ctx).export_backup(backup, force=force)
    if as_json:
        json_line(result)
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    size = f"{result.size / 2**20:.1f} MiB" if result.size >= 2**20 else f"{result.size} bytes"
    out.print(
        f"Wrote {escape(str(result.path))} ({size}): labels "
        f"{escape(', '.join(result.labels))}; your examples ({escape(counts)}) and "
        f"{result.thumbnails} thumbnail(s)."
    )
    if result.without_thumbnail:
        out.print(
            f"{result.without_thumbnail} photo(s) have no thumbnail (or a damaged one, left "
            "out): they restore on this base but cannot be embedded again on another."
        )


@app.command("import")
@reporting
def import_backup(
    ctx: typer.Context,
    backup: Annotated[
        Path,
        typer.Argument(
            help="An archive written by 'luncher export'.",
            show_default=False,
            metavar="BACKUP.tar.gz",
            parser=file_path,
        ),
    ],
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="For a backup of another base: embed its photos again with this base and "
            "retrain with its settings.",
        ),
    ] = False,
    as_json: JSON = False,
) -> None:
    """Restore an archive written by export; undo goes back.

    Example: luncher import luncher-backup.tar.gz
    """
    with progress_bars() as report:
        result = luncher(ctx).import_backup(backup, rebuild=rebuild, progress=report)
    if as_json:
        json_line(result)
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    if not result.changed:
        out.print(f"Nothing changed (no new undo step): the backup is in use ({escape(counts)}).")
        return
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
    if result.replaced:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.replaced.items()))
        out.print(
            f"It replaced your previous examples ({escape(counts)}); {suggest(UNDO)} brings "
            "them back."
        )
    note(f"{result.undo_steps} undo step(s) available.")
