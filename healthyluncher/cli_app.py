"""The `luncher` application object and its global options, shared by the command modules."""

# No `from __future__ import annotations` here: typer reads the annotations at run time.

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from healthyluncher.cli_output import debug_requested

if TYPE_CHECKING:
    from healthyluncher.api import Luncher

CONTEXT = {"help_option_names": ["-h", "--help"]}


app = typer.Typer(
    context_settings=CONTEXT,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: wraps at any width instead of cutting names
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
    debug_requested[0] = debug
    ctx.obj = {"models_dir": models_dir}


def luncher(ctx: typer.Context) -> "Luncher":
    from healthyluncher import api

    return api.open((ctx.obj or {}).get("models_dir"))


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, got {text!r}") from None


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Preset(str, Enum):
    """Pixel normalizations by name (modelsetup.PRESETS)."""

    imagenet = "imagenet"
    inception = "inception"
    unit = "unit"
    raw = "raw"
