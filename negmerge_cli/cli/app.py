"""The typer application: each command group lives in its own module and registers here."""

from __future__ import annotations

import typer

from negmerge_cli import __version__

app = typer.Typer(
    name="negmerge",
    help=(
        "Machine unlearning by sign-consensual weight negation (NegMerge, ICML 2025).\n\n"
        "Fine-tune a model on the data to forget several times, then merge the task vectors "
        "where they agree in sign and subtract the result from the original model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"negmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """negmerge: unlearning by sign-consensual weight negation."""


# Command modules register themselves on import; keep imports light (no torch at import).
from negmerge_cli.cli import merge_cmd  # noqa: E402,F401

# --- pipeline commands (recipes, sweep, tune, run, demo) register below this line ---
# isort: split
from negmerge_cli.cli import pipeline, recipes_cmd  # noqa: E402,F401
