"""The report of a tuned recipe: results.json, results.md, PNG plots, and the terminal table.

Numbers are aggregated over seeds as mean +- sample standard deviation (the spread);
accuracies are printed in percent. Rows are the pre-trained model, the retrained
reference (when the recipe has one) and every method at its chosen lambda.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from negmerge_cli.recipes import Recipe

METRIC_LABELS = {
    "forget": "forget acc",
    "retain": "retain acc",
    "test": "test acc",
    "test_forget": "test acc (forgotten classes)",
    "control": "control acc",
    "mia": "MIA efficacy",
    "gap": "avg gap",
}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CURVES_PNG = "curves.png"
METHODS_PNG = "methods.png"


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value) of the finite ``values``."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite), "values": list(values)}


def metric_keys(recipe: Recipe) -> list[str]:
    """The metric columns a recipe's table shows."""
    if recipe.scenario == "task":
        return ["forget", "control"]
    keys = ["forget", "retain", "test"]
    if recipe.scenario == "class":
        keys.append("test_forget")
    if recipe.mia:
        keys.append("mia")
    if recipe.retrain:
        keys.append("gap")
    return keys


def aggregate(recipe: Recipe, per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model (pre-trained, retrained, each method) with mean and spread."""
    keys = metric_keys(recipe)
    rows: list[dict[str, Any]] = []

    def reference_row(name: str, pick: str) -> dict[str, Any]:
        tests = [s[pick]["test"] for s in per_seed]
        return {
            "name": name,
            "kind": "reference",
            "metrics": {k: spread([t.get(k, math.nan) for t in tests]) for k in keys},
            "lambda": None,
            "models_merged": None,
            "seconds": None,
            "seeds_chosen": len(tests),
            "notes": [],
        }

    rows.append(reference_row("pre-trained", "pretrained"))
    if recipe.retrain and all(s.get("retrained") for s in per_seed):
        rows.append(reference_row("retrained", "retrained"))
    for method in recipe.tune.methods:
        entries = [s["methods"][method] for s in per_seed if method in s["methods"]]
        chosen = [e for e in entries if e["test"] is not None]
        notes = []
        missing = [s["seed"] for s in per_seed if s["methods"][method]["test"] is None]
        if missing:
            reason = next(e["selection"]["reason"] for e in entries if e["test"] is None)
            notes.append(f"seed(s) {', '.join(map(str, missing))}: {reason}")
        rows.append(
            {
                "name": method,
                "kind": "method",
                "metrics": {k: spread([e["test"].get(k, math.nan) for e in chosen]) for k in keys},
                "lambda": spread([e["lambda"] for e in chosen]),
                "models_merged": spread([e["models_merged"] for e in entries]),
                "seconds": spread([e["seconds"] for e in entries]),
                "merge_seconds": spread(
                    [e["merge_seconds"] for e in entries if e.get("merge_seconds") is not None]
                ),
                "seeds_chosen": len(chosen),
                "notes": notes,
            }
        )
    return rows


def _fmt(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if stat is None or stat["mean"] is None:
        return "n/a"
    mean = stat["mean"] * scale
    if stat["n"] == 1 or stat["std"] == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _fmt_count(stat: dict[str, Any] | None) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    if stat["std"] == 0:
        return f"{stat['mean']:g}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def format_table(recipe: Recipe, rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (accuracies in percent)."""
    keys = metric_keys(recipe)
    header = ["method", *(METRIC_LABELS[k] for k in keys), "lambda", "models merged", "time (s)"]
    merge_column = recipe.scenario == "task"
    if merge_column:
        header.append("merge (s)")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows:
        cells = [row["name"] if row["seeds_chosen"] else f"{row['name']} (no lambda)"]
        cells += [_fmt(row["metrics"][k], 100.0) for k in keys]
        cells.append(_fmt(row["lambda"], 1.0, 2) if row["lambda"] else "-")
        cells.append(_fmt_count(row["models_merged"]))
        cells.append(_fmt(row["seconds"], 1.0, 2) if row["seconds"] else "-")
        if merge_column:
            merge_time = row.get("merge_seconds")
            cells.append(_fmt(merge_time, 1.0, 2) if merge_time else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rule(recipe: Recipe) -> str:
    goal = (
        "the lowest validation forget accuracy"
        if recipe.tune.objective == "min_forget"
        else "validation forget accuracy closest to held-out accuracy"
    )
    lams = recipe.tune.lambdas
    return (
        f"lambda chosen from {len(lams)} values in [{min(lams):g}, {max(lams):g}] for {goal}, "
        f"subject to validation retain accuracy >= {recipe.tune.retain_ratio:g} x the "
        "pre-trained model's"
    )


def _command(recipe: Recipe) -> str:
    """The command that reproduces these results, overrides included."""
    import shlex

    source = recipe.source
    name = source[len("bundled:") :] if source.startswith("bundled:") else source
    sets = "".join(f" --set {shlex.quote(item)}" for item in recipe.overrides)
    return f"negmerge run {shlex.quote(name)}{sets}"


def format_markdown(recipe: Recipe, rows: Sequence[dict[str, Any]], seconds: float) -> str:
    """results.md: what was run, the table, notes, and the plots."""
    seeds = ", ".join(map(str, recipe.seeds))
    if recipe.scenario == "class":
        what = f"forget classes {', '.join(map(str, recipe.data.forget_classes))}"
    elif recipe.scenario == "task":
        what = (
            f"negate task {recipe.data.dataset} from {recipe.model.name}, "
            f"{recipe.model.finetune} fine-tuning, control {recipe.data.control or 'imagenet'}"
        )
    else:
        what = f"forget a random {recipe.data.forget_fraction:.0%} of the training data"
    parts = [
        f"# negmerge results: {recipe.name}",
        "",
        f"- recipe: `{recipe.source}` ({recipe.scenario} forgetting: {what})",
        f"- command: `{_command(recipe)}`",
        f"- {len(recipe.sweep.runs)} fine-tunes per seed; seeds {seeds}; "
        "mean ± standard deviation over seeds",
        f"- {_rule(recipe)}",
        (
            "- forget / control acc: zero-shot accuracy on the test split of the forgotten "
            "task / of the control task; merge (s): the merge engine's time"
            if recipe.scenario == "task"
            else "- forget / retain acc: on the training images to forget / to keep; test acc: "
            "on test " + ("images of the kept classes" if recipe.scenario == "class" else "images")
        ),
        f"- tuning took {seconds:.1f}s; time (s) per method = merging + lambda search "
        "(single and greedy include tuning every run alone)",
        "",
        format_table(recipe, rows),
        "",
    ]
    notes = [f"- {row['name']}: {note}" for row in rows for note in row["notes"]]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    parts += [
        f"![validation accuracy against lambda]({CURVES_PNG})",
        "",
        f"![methods compared]({METHODS_PNG})",
        "",
    ]
    return "\n".join(parts)


def plot_curves(recipe: Recipe, per_seed: Sequence[dict[str, Any]], path: Path) -> None:
    """Validation forget and retain accuracy against lambda, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(recipe.tune.methods)
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for i, seed_result in enumerate(per_seed):
            entry = seed_result["methods"][method]
            curve = entry["curve"]
            label = i == 0
            ax.plot(curve["lambda"], [100 * v for v in curve["forget"]], color="tab:red",
                    alpha=0.8, label="forget (val)" if label else None)  # fmt: skip
            ax.plot(curve["lambda"], [100 * v for v in curve["retain"]], color="tab:blue",
                    alpha=0.8, label="retain (val)" if label else None)  # fmt: skip
            ax.axhline(100 * seed_result["threshold"], color="tab:blue", ls=":", lw=0.8)
            if entry["lambda"] is not None:
                ax.axvline(entry["lambda"], color="grey", ls="--", lw=0.8)
        ax.set_title(f"{method} ({per_seed[0]['methods'][method]['models_merged']} model(s))")
        ax.set_xlabel("lambda")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(
        f"{recipe.name}: validation accuracy against lambda (lines: seeds; dotted: retain "
        "constraint; dashed: chosen lambda)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_methods(recipe: Recipe, rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Test-time metrics of every row side by side, with the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in metric_keys(recipe) if k != "gap"]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 3.8))
    for j, key in enumerate(keys):
        means = [100 * (r["metrics"][key]["mean"] or 0.0) for r in rows]
        stds = [100 * (r["metrics"][key]["std"] or 0.0) for r in rows]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=METRIC_LABELS[key])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncols=len(keys), loc="upper center", bbox_to_anchor=(0.5, 1.15))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    recipe: Recipe, per_seed: Sequence[dict[str, Any]], seconds: float = 0.0
) -> dict[str, Any]:
    """Write results.json, results.md and the plots into the recipe's output folder."""
    from negmerge_cli.evaluate.tune import json_safe

    out = recipe.output
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(recipe, per_seed)
    table = format_table(recipe, rows)
    results = {
        "recipe": {
            "name": recipe.name,
            "source": recipe.source,
            "scenario": recipe.scenario,
            "seeds": list(recipe.seeds),
            "methods": list(recipe.tune.methods),
            "lambdas": list(recipe.tune.lambdas),
            "retain_ratio": recipe.tune.retain_ratio,
            "objective": recipe.tune.objective,
            "runs": [run.run_id for run in recipe.sweep.runs],
            "settings": recipe.raw,
        },
        "command": _command(recipe),
        "seconds": round(seconds, 3),
        "rows": rows,
        "per_seed": list(per_seed),
    }
    for name, text in (
        (RESULTS_JSON, json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n"),
        (RESULTS_MD, format_markdown(recipe, rows, seconds)),
    ):
        temp = out / (name + ".part")
        temp.write_text(text, encoding="utf-8")
        temp.replace(out / name)
    plot_curves(recipe, per_seed, out / CURVES_PNG)
    plot_methods(recipe, rows, out / METHODS_PNG)
    results["table"] = table
    results["files"] = [str(out / n) for n in (RESULTS_JSON, RESULTS_MD, CURVES_PNG, METHODS_PNG)]
    return results
