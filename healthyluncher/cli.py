"""The `luncher` command: parses options, calls the public API (healthyluncher.api), renders."""

# No `from __future__ import annotations` here: typer reads every command's annotations on
# each run, and string annotations cost it an eval each (6 ms of every command's start).

import sys
from pathlib import Path
from typing import Annotated, Any, Optional, cast

import typer

# Importing them registers their commands: make-updatable, export and import; examples, labels.
from healthyluncher import cli_setup, cli_teaching, to_json  # noqa: F401
from healthyluncher.cli_app import JSON, app, ask, bounded, given_path, luncher, spelled, with_stdin
from healthyluncher.cli_app import main as main  # the entry point, with every command here
from healthyluncher.cli_output import (
    Column,
    RowPrinter,
    command_line,
    counting,
    duplicates,
    err,
    escape,
    json_line,
    note,
    out,
    print_table,
    progress_bars,
    reporting,
    suggest,
    training_settings,
)
from healthyluncher.errors import RESET_PURGE, UNDO, LuncherError, UnknownLabelError
from healthyluncher.settings import MAX_EPOCHS, MAX_LEARNING_RATE, MAX_MEMORY_STRENGTH, MAX_VIEWS
from healthyluncher.settings import Hyperparameters as HP

PHOTOS = typer.Argument(
    help="Photos, or directories to search; - reads paths from standard input, one a line.",
    show_default=False,
    metavar="PHOTO_OR_DIR...",
    parser=given_path,
)
FORGOTTEN = typer.Argument(
    help="Photos, or directories to search, or a photo's digest (8 or more hex digits) or "
    "thumbnail, as `luncher examples` lists them; - reads them from standard input.",
    show_default=False,
    metavar="PHOTO_OR_DIGEST...",
    parser=given_path,
)


@app.command()
@reporting
def predict(
    ctx: typer.Context,
    images: Annotated[list[Path], PHOTOS],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    base: Annotated[bool, typer.Option("--base", help="Ignore the personalization.")] = False,
) -> None:
    """Say whether photos are healthy or fast food, and how sure.

    Rows are printed as photos are ready: Ctrl-C keeps those already printed.

    Example: luncher predict pancakes.jpg photos/ --json
    """
    from healthyluncher.photos import ImageFailure, find_images

    lun = luncher(ctx)
    given = with_stdin(images)
    # The photos inside folders, to size the columns and the bar (paths give paths back),
    # each with its name as given.
    found = [(item, cast("Path", path)) for item in given for path in find_images([item])]
    found = found or [(item, item) for item in given]
    paths = [path for _, path in found]
    names = [spelled(item, path) for item, path in found]
    failed = 0
    which = "personalized" if lun.personalized and not base else "base"
    rows = RowPrinter(f"Predictions ({which} model)", lun.labels if not base else None, names)
    with counting(len(paths)) as done:
        for result, name in zip(lun.predict_each(paths, base=base), names, strict=True):
            done()
            if isinstance(result, ImageFailure):
                failed += 1
                if as_json:
                    json_line({**to_json(result), "path": name})
                err.print(f"[red]error:[/red] {escape(result.error)}")
            elif as_json:
                json_line({**to_json(result), "path": name})
            else:
                rows.print(result, name)
    if failed:
        raise typer.Exit(1)


@app.command()
@reporting
def retrain(
    ctx: typer.Context,
    images: Annotated[list[Path], PHOTOS],
    label: Annotated[
        str, typer.Option(metavar="LABEL", help="What these photos are.", show_default=False)
    ],
    epochs: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            metavar="N",
            min=1,
            max=MAX_EPOCHS,
            help="Passes over the examples (default: the model's setting).",
        ),
    ] = None,
    learning_rate: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            parser=bounded(0.0, MAX_LEARNING_RATE, above=True),
            metavar="LR",
            help=f"Step size (default: the model's setting).  [0<x<={MAX_LEARNING_RATE:g}]",
        ),
    ] = None,
    views: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            metavar="N",
            min=1,
            max=MAX_VIEWS,
            help="Augmented views per photo; 1 turns augmentation off. Default: "
            f"{HP.view_budget} per retrain shared by the new photos (up to "
            f"{HP.augment_views} each), 1 from {HP.view_budget // 2 + 1} photos on.",
        ),
    ] = None,
    memory_strength: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            parser=bounded(0.0, MAX_MEMORY_STRENGTH),
            metavar="S",
            help="How strongly photos like the ones you taught take their label (0: off; "
            f"default 40). Kept for later retrains.  [0<=x<={MAX_MEMORY_STRENGTH:g}]",
        ),
    ] = None,
    new_label: Annotated[
        bool, typer.Option("--new-label", help="LABEL is new: add it to the model.")
    ] = False,
    save: Annotated[
        bool,
        typer.Option("--save", help="Keep --epochs, --learning-rate and --views for later."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Teach the model that these photos are LABEL.

    Example: luncher retrain --label healthy my-pancakes/
    """
    try:
        with progress_bars() as report:
            result = luncher(ctx).retrain(
                label,
                with_stdin(images),
                new_label=new_label,
                epochs=epochs,
                learning_rate=learning_rate,
                views=views,
                memory_strength=memory_strength,
                save=save,
                progress=report,
            )
    except UnknownLabelError as exc:  # a typo must not become a class forever
        raise LuncherError(exc.message("add --new-label")) from None
    for failure in result.failures:
        err.print(f"[yellow]skipped:[/yellow] {escape(failure.error)}")
    if as_json:
        json_line(result)
    elif not result.changed:  # every photo a duplicate, with the last retrain's settings
        out.print(f"Nothing changed (no new undo step): {duplicates(result.duplicates)}.")
    else:
        if result.duplicates:
            note(f"Skipped {duplicates(result.duplicates)}.")
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
        some_new = result.cached < len(result.photos)  # else none got views
        new = f"{result.views} view(s) per new photo; " if some_new else ""
        note(
            f"Trained {result.hyperparameters.epochs} epochs on your examples ({escape(counts)}); "
            f"{new}{result.cached} photo(s) came from the cache."
        )
    if result.failures:
        raise typer.Exit(1)


@app.command()
@reporting
def reset(
    ctx: typer.Context,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge", help="Also remove every undo step and your photos' thumbnails for good."
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JSON = False,
) -> None:
    """Predict with the base model again; `luncher undo` brings your personalization back.

    Example: luncher reset
    """
    lun = luncher(ctx)
    if not yes and sys.stdin.isatty() and _reset_has_something_to_lose(lun, purge):
        question = (
            "Remove your personalization, its undo steps and your photos' thumbnails for good?"
            if purge
            else f"Predict with the base model again (`{command_line(UNDO.cli)}` brings this back)?"
        )
        if not ask(question, default=not purge):
            declined = "Nothing was changed: you answered no."
            if as_json:  # every exit with --json prints one object
                json_line({"error": declined})
            err.print(declined)
            raise typer.Exit(1)
    result = lun.reset(purge=purge)
    if as_json:
        json_line(result)
        return
    files = (
        f"{result.removed_thumbnails} thumbnail(s) and {result.removed_cache_files} cached "
        "embedding file(s)"
    )
    if not result.removed_model:
        if result.removed_undo_steps:  # what `undo` would have brought back after a reset
            out.print(
                f"Predictions already came from the base model. Removed the "
                f"{result.removed_undo_steps} undo step(s) (your earlier personalization), "
                f"{files} for good."
            )
            return
        leftovers = result.removed_thumbnails + result.removed_cache_files
        extra = f" Removed {files} of earlier examples." if leftovers else ""
        out.print(f"Nothing to reset: predictions already come from the base model.{extra}")
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.removed_examples.items()))
    if result.undoable:
        out.print(
            f"Predictions now come from the base model. Your personalization "
            f"({escape(counts) or 'no examples'}) is one {suggest(UNDO)} away; "
            f"{suggest(RESET_PURGE)} removes it and your photos' thumbnails for good."
        )
        return
    out.print(
        f"Removed the personalized model and your examples ({escape(counts) or 'none'}), "
        f"{result.removed_undo_steps} undo step(s), {files}. Predictions now come from the "
        "base model."
    )


def _reset_has_something_to_lose(lun: Any, purge: bool) -> bool:
    """A personalization, or (for a purge) what `undo` could bring back after an earlier
    reset; asked only at a terminal, where a question is worth these reads."""
    try:
        return bool(lun.personalized or (purge and lun.status().undo_steps > 0))
    except LuncherError:  # a damaged directory: reset is the way out; ask as usual
        return True


@app.command()
@reporting
def repair(ctx: typer.Context, as_json: JSON = False) -> None:
    """Rebuild a damaged state.json from the models directory; remove leftovers.

    Damaged saved views of your photos are embedded again from their thumbnails.

    Example: luncher repair
    """
    with progress_bars() as report:
        result = luncher(ctx).repair(progress=report)
    if as_json:
        json_line(result)
        return
    if result.reembedded:
        lost = f"; {result.lost} without a thumbnail are gone" if result.lost else ""
        out.print(
            f"The saved views of your photos were damaged: embedded {result.reembedded} "
            f"photo(s) again from their thumbnails and retrained{lost}."
        )
    if not result.repaired:
        out.print("state.json is intact, and nothing is left of interrupted commands.")
        return
    which = "your personalized model" if result.personal else "the base model"
    out.print(
        f"state.json was damaged: rebuilt it from the newest complete state. Predictions come "
        f"from {which}; {result.undo_steps} undo step(s)."
    )


@app.command()
@reporting
def undo(ctx: typer.Context, as_json: JSON = False) -> None:
    """Go back one change: a retrain, import, reset, rename or new base.

    A forget cleared the history: undo never brings forgotten photos back.

    Example: luncher undo
    """
    result = luncher(ctx).undo()
    if as_json:
        json_line(result)
        return
    base = f" {escape(result.base_changed)}" if result.base_changed else ""
    if result.restored == "base":
        out.print(f"Back to the base model{base} (no personalization).")
    else:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
        base = f", on the base model{base} again" if base else ""
        out.print(
            f"Restored the personalized model trained {result.trained_at} ({escape(counts)}){base}."
        )
    out.print(f"{result.remaining_undos} more undo step(s) available.")


@app.command()
@reporting
def forget(
    ctx: typer.Context,
    images: Annotated[list[Path], FORGOTTEN],
    as_json: JSON = False,
) -> None:
    """Remove photos from your examples and retrain without them.

    The undo history is cleared too, so `luncher undo` cannot bring them back.

    Example: luncher forget my-pancakes/burnt.jpg
    """
    with progress_bars() as report:
        result = luncher(ctx).forget(with_stdin(images), progress=report)
    if as_json:
        json_line(result)
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    if result.retrained:
        out.print(
            f"Forgot {result.forgotten} photo(s) and retrained on the rest ({escape(counts)})."
        )
    elif counts:  # only undo steps held them: the model is unchanged
        out.print(
            f"Forgot {result.forgotten} photo(s) that only undo steps held (they are gone "
            f"with the undo history); your examples are unchanged ({escape(counts)})."
        )
    else:
        out.print(f"Forgot {result.forgotten} photo(s); no examples remain, so the base predicts.")


@app.command()
@reporting
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show the base, your examples, the trainer and the version.

    Example: luncher status --json
    """
    result = luncher(ctx).status()
    if as_json:
        json_line(result)
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
    set_aside = ", ".join(f"{k}: {v}" for k, v in sorted(result.undo_examples_per_label.items()))
    if not examples and set_aside:  # after a reset: one undo away, not gone
        examples = f"none in use; `luncher undo` brings back {set_aside}"
    out.print(f"[bold]your examples[/bold]     {escape(examples) or 'none'}")
    if result.memory_summarized:
        out.print(
            f"[bold]memory[/bold]            your {result.memory_photos} newest photos one by "
            f"one; {result.memory_summarized} older ones summarized (averages of photos taught "
            "together)"
        )
    size = result.disk_bytes  # in bytes below 1 MiB, as export says it: not '0.0 MiB'
    held = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"
    out.print(
        f"[bold]undo steps[/bold]        {result.undo_steps}; the models directory holds {held}"
    )
    if result.last_retrain:
        used = result.last_retrain_hyperparameters
        out.print(
            f"[bold]last retrain[/bold]      {result.last_retrain} ({result.retrains} in all; "
            f"{training_settings(used)})"
        )
        if used != result.hyperparameters:  # it ran with one-off options
            out.print(f"[bold]next retrain[/bold]      {training_settings(result.hyperparameters)}")
    out.print(f"[bold]trainer[/bold]           {result.trainer}; healthyluncher {result.version}")
    if result.warning:
        err.print(f"[yellow]warning:[/yellow] {escape(result.warning)}")


if __name__ == "__main__":
    main()
