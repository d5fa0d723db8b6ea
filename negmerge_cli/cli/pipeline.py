"""``negmerge sweep | tune | run RECIPE`` and ``negmerge demo``: the whole unlearning loop.

The commands check their flags, load the recipe (every problem reported at once, exit 2)
and call the library: :func:`negmerge_cli.train.sweep.run_sweep` and
:func:`negmerge_cli.evaluate.tune.run_tune`. torch, scikit-learn and matplotlib are
imported inside the commands, never at start-up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from negmerge_cli.cli.app import app
from negmerge_cli.cli.options import QuietOpt
from negmerge_cli.cli.recipes_cmd import RecipeArg, SetOpt
from negmerge_cli.errors import Interrupted, OutputError, UsageError
from negmerge_cli.signals import interrupts_raise

DEMO_RECIPE = "digits"

OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="DIR",
        help="Output folder (overrides the recipe's output).",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda",
        help="Where to train and evaluate (overrides the recipe's device; auto: CUDA when "
        "available).",
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="'local' (one run after another in this process) or 'ray': one Ray task per "
        "run, with the recipe's resources (the output folder must be shared by every node).",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        metavar="auto|HOST:PORT",
        help="ray: the cluster to join ('auto': the one this machine belongs to); "
        "default: start a local Ray.",
    ),
]


def _require_train_extra() -> None:
    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"the training pipeline needs {', '.join(missing)}: pip install 'negmerge[train]'"
        )


def _load(
    recipe: str, overrides: list[str] | None, output: Path | None, device: str | None = None
) -> Any:
    from negmerge_cli.errors import ConfigError
    from negmerge_cli.recipes import check_files, load_recipe

    sets = list(overrides or [])
    if output is not None:
        sets.append(f"output={output}")
    if device is not None:
        sets.append(f"device={device}")
    loaded = load_recipe(recipe, sets)
    missing = check_files(loaded)  # data folders and CLIP weights, before any work
    if missing:
        raise ConfigError(missing, source=loaded.source)
    _require_train_extra()
    if loaded.model.arch in ("clip", "resnet18") or loaded.data.dataset != "digits":
        _require_vision_extra(loaded.model.arch == "clip")
    return loaded


def _require_vision_extra(clip: bool) -> None:
    needed = ["torchvision", "PIL"] + (["open_clip"] if clip else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        extra = "clip" if clip else "train"
        raise UsageError(f"this recipe needs {', '.join(missing)}: pip install 'negmerge[{extra}]'")


@contextlib.contextmanager
def _stoppable(what: str) -> Iterator[None]:
    """SIGINT and SIGTERM stop the work cleanly (temp folders removed) and exit 130; OS
    errors become one line naming the file."""
    try:
        with interrupts_raise(what):
            yield
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(what) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise OutputError(f"{where}{exc.strerror or exc}") from None


def _check_backend(backend: str, address: str | None) -> None:
    if backend not in ("local", "ray"):
        raise typer.BadParameter("choose local or ray", param_hint="'--backend'")
    if address is not None and backend != "ray":
        raise typer.BadParameter("only with --backend ray", param_hint="'--address'")


def _sweep(recipe: Any, quiet: bool, backend: str = "local", address: str | None = None) -> None:
    stopped = (
        f"sweep interrupted; finished runs in {recipe.output} are kept, run it again to resume"
    )
    if backend == "ray":
        from negmerge_cli.train.ray_sweep import failure_error, run_sweep_on_ray

        with _stoppable(stopped):
            summary = run_sweep_on_ray(recipe, address=address, quiet=quiet)
        if summary.failed:
            raise failure_error(summary, recipe.output)
        return
    from negmerge_cli.train.sweep import run_sweep

    with _stoppable(stopped):
        run_sweep(recipe, quiet=quiet)


def _tune(recipe: Any, quiet: bool) -> None:
    from negmerge_cli.evaluate.tune import run_tune

    with _stoppable("tuning interrupted; rerun `negmerge tune` (the runs are kept)"):
        results = run_tune(recipe, quiet=quiet)
    typer.echo(results["table"])
    if not quiet:
        notes = [f"{row['name']}: {n}" for row in results["rows"] for n in row["notes"]]
        for note in notes:
            typer.echo(f"note: {note}", err=True)
        typer.echo(f"wrote {', '.join(results['files'])}", err=True)


@app.command(no_args_is_help=True)
def sweep(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: OutputOpt = None,
    backend: BackendOpt = "local",
    address: AddressOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune the pre-trained model on the forget set once per run of the recipe.

    Each run is written to OUT/seed-S/runs/RUN-ID/{model.safetensors, run.json}. Finished
    runs are skipped, so an interrupted sweep resumes where it stopped.
    """
    _check_backend(backend, address)
    _sweep(_load(recipe, overrides, output, device), quiet, backend, address)


@app.command(no_args_is_help=True)
def tune(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: OutputOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Choose lambda for every method on the finished runs and write the report.

    Writes results.json, results.md, curves.png and methods.png to the output folder and
    prints the table.
    """
    _tune(_load(recipe, overrides, output, device), quiet)


@app.command(no_args_is_help=True)
def run(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output: OutputOpt = None,
    backend: BackendOpt = "local",
    address: AddressOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sweep, then tune, then report: the whole recipe (with --backend ray, the sweep runs
    on Ray and the tuning here)."""
    _check_backend(backend, address)
    loaded = _load(recipe, overrides, output, device)
    _sweep(loaded, quiet, backend, address)
    _tune(loaded, quiet)


@app.command()
def demo(
    overrides: SetOpt = None,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the bundled digits recipe: forget two digit classes from a small CNN (~40 s).

    The same as `negmerge run digits`; needs no download (scikit-learn ships the data).
    """
    loaded = _load(DEMO_RECIPE, overrides, output)
    if not quiet:
        print(f"negmerge demo: {loaded.description} -> {loaded.output}", file=sys.stderr)
    _sweep(loaded, quiet)
    _tune(loaded, quiet)
