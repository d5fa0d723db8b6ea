"""The report aggregates seeds as mean and spread, and says when a method found no lambda."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from negmerge_cli.evaluate.report import aggregate, format_table, spread, write_report
from negmerge_cli.recipes import load_recipe


def _method(lam, forget, retain, test, merged=3, seconds=1.0):
    chosen = lam is not None
    return {
        "lambda": lam,
        "selection": {"feasible": chosen, "reason": "" if chosen else "no lambda keeps it"},
        "curve": {"lambda": [0.0, 1.0], "forget": [1.0, forget or 0.0], "retain": [1.0, 0.9]},
        "test": {"forget": forget, "retain": retain, "test": test, "test_forget": forget}
        if chosen
        else None,
        "models_merged": merged,
        "seconds": seconds,
    }


def _seed(seed, negmerge, mean):
    return {
        "seed": seed,
        "threshold": 0.95,
        "pretrained": {
            "validation": {"forget": 1.0, "retain": 1.0},
            "test": {"forget": 1.0, "retain": 0.99, "test": 0.98, "test_forget": 0.97},
        },
        "retrained": None,
        "methods": {"negmerge": negmerge, "mean": mean},
    }


@pytest.fixture
def recipe(tmp_path: Path):
    return load_recipe("digits", ["tune.methods=[negmerge, mean]", f"output={tmp_path}"])


def test_spread_is_the_mean_and_sample_standard_deviation_of_finite_values():
    stat = spread([0.1, 0.3, float("nan"), None])
    assert stat["mean"] == pytest.approx(0.2) and stat["std"] == pytest.approx(0.1414213562)
    assert stat["n"] == 2
    assert spread([0.5])["std"] == 0.0
    assert spread([])["mean"] is None


def test_rows_aggregate_over_seeds_and_note_seeds_without_a_lambda(recipe):
    per_seed = [
        _seed(0, _method(1.0, 0.10, 0.96, 0.95), _method(0.5, 0.0, 0.98, 0.97)),
        _seed(1, _method(1.5, 0.30, 0.94, 0.93), _method(None, None, None, None)),
    ]
    rows = {row["name"]: row for row in aggregate(recipe, per_seed)}
    assert list(rows) == ["pre-trained", "negmerge", "mean"]
    negmerge = rows["negmerge"]
    assert negmerge["metrics"]["forget"]["mean"] == pytest.approx(0.2)
    assert negmerge["lambda"]["mean"] == pytest.approx(1.25)
    assert negmerge["seeds_chosen"] == 2 and negmerge["notes"] == []
    assert rows["mean"]["seeds_chosen"] == 1
    assert rows["mean"]["notes"] == ["seed(s) 1: no lambda keeps it"]
    table = format_table(recipe, list(rows.values())).splitlines()
    assert table[0] == (
        "| method | forget acc | retain acc | test acc | test acc (forgotten classes) | lambda "
        "| models merged | time (s) |"
    )
    assert table[2] == "| pre-trained | 100.0 | 99.0 | 98.0 | 97.0 | - | - | - |"
    assert table[3] == (
        "| negmerge | 20.0 ± 14.1 | 95.0 ± 1.4 | 94.0 ± 1.4 | 20.0 ± 14.1 | 1.25 ± 0.35 "
        "| 3 | 1.00 |"
    )
    assert table[4] == "| mean | 0.0 | 98.0 | 97.0 | 0.0 | 0.50 | 3 | 1.00 |"


def test_write_report_writes_strict_json_markdown_and_plots(recipe):
    per_seed = [_seed(0, _method(1.0, 0.1, 0.96, 0.95), _method(None, None, None, None))]
    results = write_report(recipe, per_seed, seconds=1.5)
    out = recipe.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}")

    loaded = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert loaded["command"] == (
        f"negmerge run digits --set 'tune.methods=[negmerge, mean]' --set output={out}"
    )
    assert "| mean (no lambda) | n/a | n/a |" in results["table"]
    assert "- mean: seed(s) 0: no lambda keeps it" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "methods.png").stat().st_size > 1000
