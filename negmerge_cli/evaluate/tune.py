"""Lambda tuning: every method's merged vector, its validation curve, its choice, its test metrics.

For the merge methods (negmerge, mean, ties, magmax) the merge engine writes the merged
task vector of all runs once (``merge(..., output=None, save_vector=...)``); the model
``base - lambda * vector`` is then evaluated in memory for every lambda of the grid.
``single`` tunes each run's own task vector and keeps the best run on validation (the
paper's "single best model"); ``greedy`` adds runs in order of their single-run score and
keeps a run only when the uniform mean of the kept task vectors scores strictly better.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from negmerge_cli.evaluate.metrics import (
    accuracy,
    average_gap,
    mia_efficacy,
    mia_features,
    predict_logits,
)
from negmerge_cli.evaluate.selection import (
    Curve,
    Selection,
    best_of,
    better,
    retain_threshold,
    select_lambda,
)
from negmerge_cli.recipes import MERGE_METHODS, Recipe
from negmerge_cli.train.data import UnlearningData, load_data
from negmerge_cli.train.loop import resolve_device
from negmerge_cli.train.models import build_model
from negmerge_cli.train.sweep import (
    finished_runs,
    pretrained_path,
    retrained_path,
    seed_dir,
)

State = dict[str, torch.Tensor]


def make_evaluator(recipe: Recipe, data: Any, base: State, seed: int) -> Any:
    """The evaluator of the recipe's setting: CLIP zero-shot heads, or logits of a classifier."""
    if recipe.model.arch == "clip":
        from negmerge_cli.evaluate.zeroshot import ClipEvaluator

        return ClipEvaluator(recipe, data, base)
    return Evaluator(recipe, data, base, recipe.mia, seed)


def load_tune_data(recipe: Recipe) -> Any:
    """What tuning evaluates on, loaded once for every seed, method and lambda."""
    if recipe.model.arch == "clip":
        from negmerge_cli.evaluate.zeroshot import load_eval_data

        return load_eval_data(recipe)
    return load_data(recipe.data)


class Evaluator:
    """Evaluates ``base - lambda * vector`` on the validation and test sets, in memory."""

    def __init__(
        self, recipe: Recipe, data: UnlearningData, base: State, mia: bool, seed: int
    ) -> None:
        self.data = data
        self.base = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
        self.model = build_model(recipe.model, seed=0).to(resolve_device(recipe.device))
        self.mia = mia
        self.seed = seed

    def edited(self, vector: State, lam: float) -> State:
        """The weights ``base - lam * vector`` (tensors missing from the vector stay as base)."""
        return {
            name: (value - lam * vector[name]) if name in vector else value
            for name, value in self.base.items()
        }

    def load(self, state: State) -> None:
        self.model.load_state_dict(state, strict=True)

    def validation(self, state: State) -> tuple[float, float]:
        """(forget, retain) accuracy on the validation sets."""
        self.load(state)
        forget = accuracy(
            predict_logits(self.model, self.data.val_forget.x), self.data.val_forget.y
        )
        retain = accuracy(
            predict_logits(self.model, self.data.val_retain.x), self.data.val_retain.y
        )
        return forget, retain

    def curve(self, vector: State, lambdas: Sequence[float]) -> Curve:
        points = [self.validation(self.edited(vector, lam)) for lam in lambdas]
        return Curve(tuple(lambdas), tuple(p[0] for p in points), tuple(p[1] for p in points))

    def test(self, state: State) -> dict[str, float]:
        """Forget / retain accuracy (training sets), test accuracy, and MIA efficacy if asked."""
        self.load(state)
        d = self.data
        logits = {
            name: predict_logits(self.model, split.x)
            for name, split in (
                ("forget", d.forget),
                ("retain", d.retain),
                ("test", d.test_retain),
                ("test_forget", d.test_forget),
            )
        }
        out = {
            "forget": accuracy(logits["forget"], d.forget.y),
            "retain": accuracy(logits["retain"], d.retain.y),
            "test": accuracy(logits["test"], d.test_retain.y),
        }
        if len(d.test_forget):
            out["test_forget"] = accuracy(logits["test_forget"], d.test_forget.y)
        if self.mia:
            out["mia"] = mia_efficacy(
                mia_features(logits["retain"], d.retain.y),
                mia_features(logits["test"], d.test_retain.y),
                mia_features(logits["forget"], d.forget.y),
                seed=self.seed,
            )
        return out


@dataclass
class MethodResult:
    """One method on one seed: its curve, choice and test metrics."""

    method: str
    selection: Selection
    curve: Curve
    test: dict[str, float] | None
    runs: list[str]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "lambda": self.selection.lam,
            "selection": self.selection.as_dict(),
            "curve": self.curve.as_dict(),
            "test": self.test,
            "models_merged": len(self.runs),
            "runs": self.runs,
            "seconds": round(self.seconds, 3),
            **self.details,
        }


class _Vectors:
    """Merged task vectors through the engine, written to a temp folder and read back."""

    def __init__(self, recipe: Recipe, base: Path, folder: Path) -> None:
        self.recipe = recipe
        self.base = base
        self.folder = folder
        self.count = 0
        self.last_seconds = 0.0
        """How long the engine took for the latest merge (reported as the merge time)."""

    def __call__(self, method: str, runs: Sequence[Path]) -> State:
        from negmerge_cli import merge
        from negmerge_cli.io import load_state_dict

        self.count += 1
        path = self.folder / f"{self.count:04d}-{method}.safetensors"
        began = time.perf_counter()
        merge(
            self.base, list(runs), None, method=method, density=self.recipe.tune.ties_density,
            save_vector=path, quiet=True, device=self.recipe.device,
        )  # fmt: skip
        self.last_seconds = time.perf_counter() - began
        vector = load_state_dict(path)
        path.unlink()
        return vector


def _run_id(path: Path) -> str:
    return path.parent.name


def tune_seed(
    recipe: Recipe, seed: int, data: UnlearningData, log: TextIO | None = None
) -> dict[str, Any]:
    """Tune every method of the recipe on one seed's finished runs; a JSON-able dict."""
    from negmerge_cli.io import load_state_dict

    def say(message: str) -> None:
        if log is not None:
            log.write(f"tune seed {seed}: {message}\n")
            log.flush()

    runs = finished_runs(recipe, seed)
    base_file = pretrained_path(recipe, seed)
    base_state = load_state_dict(base_file)
    evaluator = make_evaluator(recipe, data, base_state, seed)
    lambdas = recipe.tune.lambdas
    pre_forget, pre_retain = evaluator.validation(evaluator.base)
    threshold = retain_threshold(pre_retain, recipe.tune.retain_ratio)
    pretrained = evaluator.test(evaluator.base)
    retrained = None
    if recipe.retrain:
        reference = retrained_path(recipe, seed)
        if not reference.is_file():
            from negmerge_cli.errors import UsageError

            raise UsageError(f"{reference}: the retrained reference is missing; run the sweep")
        retrained = evaluator.test(load_state_dict(reference))
    say(
        f"pre-trained validation forget {pre_forget:.3f}, retain {pre_retain:.3f} "
        f"(retain must stay >= {threshold:.3f})"
    )

    results: dict[str, MethodResult] = {}
    singles: list[tuple[str, Selection, Curve, State]] = []
    single_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="negmerge-tune-") as temp:
        vectors = _Vectors(recipe, base_file, Path(temp))

        def finish(
            method: str,
            vector: State,
            run_paths: Sequence[Path],
            started: float,
            *,
            details: dict[str, Any] | None = None,
            curve: Curve | None = None,
            selection: Selection | None = None,
            earlier_seconds: float = 0.0,
        ) -> None:
            """Choose lambda (unless given), measure the test sets there, record, log."""
            if curve is None:
                curve = evaluator.curve(vector, lambdas)
            if selection is None:
                selection = select_lambda(curve, threshold, recipe.tune.objective)
            test = None
            if selection.feasible:
                assert selection.lam is not None
                test = evaluator.test(evaluator.edited(vector, selection.lam))
            results[method] = MethodResult(
                method, selection, curve, test, [_run_id(p) for p in run_paths],
                time.perf_counter() - started + earlier_seconds, details or {},
            )  # fmt: skip
            if selection.feasible:
                say(
                    f"{method:<8} lambda {selection.lam:g}: validation forget "
                    f"{selection.forget:.3f}, retain {selection.retain:.3f} "
                    f"({len(run_paths)} model(s), {results[method].seconds:.1f}s)"
                )
            else:
                say(f"{method:<8} {selection.reason}")

        for method in recipe.tune.methods:
            if method not in MERGE_METHODS:
                continue
            started = time.perf_counter()
            vector = vectors(method, runs)
            finish(
                method, vector, runs, started,
                details={"merge_seconds": round(vectors.last_seconds, 3)},
            )  # fmt: skip

        if "single" in recipe.tune.methods or "greedy" in recipe.tune.methods:
            started = time.perf_counter()
            for path in runs:
                vector = vectors("mean", [path])
                curve = evaluator.curve(vector, lambdas)
                singles.append(
                    (_run_id(path), select_lambda(curve, threshold, recipe.tune.objective),
                     curve, vector)
                )  # fmt: skip
            single_seconds = time.perf_counter() - started
            candidates = [{"run": run_id, **sel.as_dict()} for run_id, sel, _curve, _v in singles]
            if "single" in recipe.tune.methods:
                best = best_of([s[1] for s in singles])
                assert best is not None
                _run, sel, curve, vector = singles[best]
                # Timed from the start of the single-run pass: choosing needs every run.
                finish(
                    "single", vector, [runs[best]], started,
                    details={"candidates": candidates}, curve=curve, selection=sel,
                )  # fmt: skip

        if "greedy" in recipe.tune.methods:
            started = time.perf_counter()
            order = sorted(range(len(runs)), key=lambda i: singles[i][1].key())
            kept = [order[0]]
            current_sel, current_curve, current_vector = singles[order[0]][1:]
            steps = [{"added": singles[order[0]][0], "kept": True, **current_sel.as_dict()}]
            for i in order[1:]:
                trial = [*kept, i]
                vector = vectors("mean", [runs[j] for j in trial])
                curve = evaluator.curve(vector, lambdas)
                sel = select_lambda(curve, threshold, recipe.tune.objective)
                keep = better(sel, current_sel)
                steps.append({"added": singles[i][0], "kept": keep, **sel.as_dict()})
                if keep:
                    kept, current_sel, current_curve, current_vector = trial, sel, curve, vector
            # Greedy needs the single-run scores first: its time counts that work too.
            finish(
                "greedy", current_vector, [runs[j] for j in kept], started,
                details={"steps": steps}, curve=current_curve, selection=current_sel,
                earlier_seconds=single_seconds,
            )  # fmt: skip

    ordered = {m: results[m].as_dict() for m in recipe.tune.methods if m in results}
    for entry in [*ordered.values()]:
        if retrained is not None and entry["test"] is not None:
            entry["test"]["gap"] = average_gap(entry["test"], retrained)
    if retrained is not None:
        pretrained["gap"] = average_gap(pretrained, retrained)
        retrained["gap"] = 0.0
    return {
        "seed": seed,
        "threshold": threshold,
        "pretrained": {
            "validation": {"forget": pre_forget, "retain": pre_retain},
            "test": pretrained,
        },
        "retrained": None if retrained is None else {"test": retrained},
        "methods": ordered,
    }


def run_tune(
    recipe: Recipe, *, quiet: bool = False, stream: TextIO | None = None
) -> dict[str, Any]:
    """Tune every seed of a finished sweep, write the report, and return the results."""
    from negmerge_cli.evaluate.report import write_report
    from negmerge_cli.train.loop import torch_threads

    log = None if quiet else (stream if stream is not None else sys.stderr)
    started = time.perf_counter()
    for seed in recipe.seeds:  # fail before any work when a seed's runs are missing
        finished_runs(recipe, seed)
    with torch_threads(recipe.threads):
        data = load_tune_data(recipe)
        per_seed = []
        for seed in recipe.seeds:
            result = tune_seed(recipe, seed, data, log)
            _write_json(seed_dir(recipe, seed) / "tune.json", result)
            per_seed.append(result)
        return write_report(recipe, per_seed, seconds=time.perf_counter() - started)


def _write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp then rename) so a killed tune never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".part")
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)


def json_safe(value: Any) -> Any:
    """A copy of ``value`` valid as strict JSON: NaN and Inf become null, paths strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
