"""``negmerge recipes list | show NAME | validate FILE``: the bundled recipes and checking one.

Only the standard library and PyYAML are used here, so these answer without torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from negmerge_cli.cli.app import app

recipes_app = typer.Typer(
    name="recipes",
    help="List, show and validate YAML recipes (the bundled ones or your own).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(recipes_app, name="recipes")

RecipeArg = Annotated[
    str,
    typer.Argument(
        metavar="RECIPE",
        help="A recipe file (my.yaml) or the name of a bundled recipe (digits).",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set sweep.base.lr=0.01 --set seeds=[0] "
        "(the value is read as YAML; repeatable).",
    ),
]


@recipes_app.command("list")
def list_recipes() -> None:
    """List the bundled recipes with what each does."""
    from negmerge_cli.recipes import bundled_recipes, recipe_summary

    recipes = bundled_recipes()
    if not recipes:
        typer.echo("no bundled recipes found (is negmerge installed completely?)", err=True)
        raise typer.Exit(1)
    width = max(len(name) for name in recipes)
    for name, text in recipes.items():
        typer.echo(f"{name:<{width}}  {recipe_summary(text)}")


@recipes_app.command("show", no_args_is_help=True)
def show_recipe(recipe: RecipeArg) -> None:
    """Print a recipe's YAML (copy it to a file to make your own)."""
    from negmerge_cli.recipes import read_recipe_text

    text, _source = read_recipe_text(recipe)
    typer.echo(text, nl=not text.endswith("\n"))


@recipes_app.command("validate", no_args_is_help=True)
def validate_recipe(recipe: RecipeArg, overrides: SetOpt = None) -> None:
    """Check a recipe completely without running it; every problem is reported at once.

    This includes what must be on disk: data folders, CLIP weights and class-name files.
    """
    from negmerge_cli.errors import ConfigError
    from negmerge_cli.recipes import check_files, describe, load_recipe

    loaded = load_recipe(recipe, overrides or [])
    missing = check_files(loaded)
    if missing:
        raise ConfigError(missing, source=loaded.source)
    typer.echo(describe(loaded))
    typer.echo("ok")
