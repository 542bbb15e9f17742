"""`luncher examples` and `luncher labels`: seeing and managing what you taught."""

# No `from __future__ import annotations` here: typer reads the annotations at run time.

from typing import Annotated, Optional

import typer

from healthyluncher.cli_app import JSON, app, luncher
from healthyluncher.cli_output import (
    Column,
    escape,
    json_line,
    note,
    out,
    print_table,
    progress_bars,
    reporting,
    suggest,
)
from healthyluncher.errors import UNDO

NO_EXAMPLES = "No examples: the model is not personalized."


@app.command("examples")
@reporting
def examples(
    ctx: typer.Context,
    label: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            metavar="LABEL", help="Only the photos taught this label.", show_default=False
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the photos you taught: label, digest, file name, date, thumbnail.

    `luncher forget DIGEST` (the first 8 digits are enough) or `luncher forget THUMBNAIL`
    forgets a photo whose file is gone.

    Example: luncher examples --label healthy
    """
    found = luncher(ctx).examples(label)
    if as_json:
        for item in found:
            json_line(item)
        return
    if not found:
        # Of one label, the model may be personalized with others ('not personalized' was
        # said of a model with photos of every label but this one).
        note(f"No examples of {escape(repr(label))}." if label else NO_EXAMPLES)
        return
    print_table(
        f"Your examples ({len(found)})",
        [Column("label"), Column("digest"), Column("file"), Column("taught"), Column("thumbnail")],
        [
            [
                (item.label, "bold"),
                (item.digest[:12], ""),
                (item.name or "?", ""),
                (item.taught or "?", "dim"),
                (str(item.thumbnail) if item.thumbnail else "(none)", "dim"),
            ]
            for item in found
        ],
    )


labels_app = typer.Typer(
    name="labels",
    invoke_without_command=True,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(labels_app)


@labels_app.callback()
@reporting
def labels_list(ctx: typer.Context, as_json: JSON = False) -> None:
    """List the labels with their examples; rename or remove one.

    Without a command: every label, with how many of your photos have it.

    Example: luncher labels rename pancake pancakes
    """
    if ctx.invoked_subcommand is not None:
        return
    found = luncher(ctx).label_info()
    if as_json:
        json_line({"labels": found})
        return
    print_table(
        "Labels",
        [Column("label"), Column("your photos", right=True), Column("")],
        [
            [
                (info.label, "bold"),
                (str(info.examples), ""),
                ("from the base" if info.from_base else "yours", "dim"),
            ]
            for info in found
        ],
    )


@labels_app.command("rename")
@reporting
def labels_rename(
    ctx: typer.Context,
    old: Annotated[str, typer.Argument(metavar="OLD", show_default=False)],
    new: Annotated[str, typer.Argument(metavar="NEW", show_default=False)],
    as_json: JSON = False,
) -> None:
    """Rename a label you added; `luncher undo` reverses it.

    Example: luncher labels rename pancake pancakes
    """
    result = luncher(ctx).rename_label(old, new)
    if as_json:
        json_line(result)
        return
    out.print(
        f"Renamed {escape(result.old)!r} to {escape(result.new)!r} ({result.examples} "
        f"example(s)); {suggest(UNDO)} goes back."
    )


@labels_app.command("remove")
@reporting
def labels_remove(
    ctx: typer.Context,
    label: Annotated[str, typer.Argument(metavar="LABEL", show_default=False)],
    as_json: JSON = False,
) -> None:
    """Forget every example of LABEL and retrain; a label you added goes with them.

    As with `luncher forget`, the undo history is cleared: undo cannot bring them back.

    Example: luncher labels remove dessert
    """
    with progress_bars() as report:
        result = luncher(ctx).remove_label(label, progress=report)
    if as_json:
        json_line(result)
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.examples_per_label.items()))
    if not result.forgotten:  # a label of yours that no photo has
        out.print(
            f"Removed the label {escape(label)!r}, which no photo had, and retrained "
            f"({escape(counts)}); {suggest(UNDO)} goes back."
        )
        return
    out.print(
        f"Forgot the {result.forgotten} example(s) of {escape(label)!r}"
        + (f"; retrained on the rest ({escape(counts)})." if result.retrained else ".")
    )
