"""recipes, sweep, tune, run and demo through the real entry point, end to end on digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from negmerge_cli.cli import main
from negmerge_cli.recipes import bundled_recipes

# The digits recipe at a reduced size: one seed, four fine-tunes.
SMALL = [
    "--set", "seeds=[0]",
    "--set", "sweep.grid={lr: [0.003, 0.01], epochs: [5], augment: [none, shift+noise]}",
]  # fmt: skip


def test_help_and_recipe_commands_do_not_import_torch_sklearn_or_matplotlib():
    code = (
        "import sys\n"
        "from negmerge_cli.cli import main\n"
        "for argv in (['--help'], ['recipes', 'list'], ['recipes', 'validate', 'digits']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert not e.code, e\n"
        "heavy = [m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for command in ("sweep", "tune", "run", "demo", "recipes"):
        assert command in done.stdout


def test_recipes_list_names_each_bundled_recipe_with_its_summary(cli):
    code, out, _ = cli("recipes", "list")
    assert code == 0
    rows = [line.split(None, 1) for line in out.splitlines()]
    assert [name for name, _ in rows] == list(bundled_recipes())
    assert dict(rows)["digits"].startswith("Class forgetting on scikit-learn's digits")
    assert dict(rows)["digits-random"].startswith("Random forgetting on digits")


def test_recipes_show_prints_the_yaml_as_shipped(cli):
    code, out, _ = cli("recipes", "show", "digits")
    assert code == 0 and out == bundled_recipes()["digits"]


def test_recipes_validate_reports_every_problem_and_exits_2(cli, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenario: class\noutput: o\ndata: {forget_classes: [11]}\nsweep: {bas: {}}\n")
    code, out, err = cli("recipes", "validate", bad)
    assert code == 2 and out == ""
    assert err.startswith(f"negmerge: error: {bad}: 2 problems:")
    assert "data.forget_classes[0] (line 3): 11 is out of range [0, 9]" in err
    assert "sweep.bas (line 4): unknown key (did you mean 'base'?)" in err
    assert "Traceback" not in err


def test_recipes_validate_describes_a_good_recipe_with_overrides(cli):
    code, out, _ = cli("recipes", "validate", "digits", "--set", "seeds=[4]")
    assert code == 0
    assert "16 fine-tunes x 1 seed(s) [4]" in out and out.endswith("ok\n")


def test_tune_before_the_sweep_says_what_to_run(cli, tmp_path: Path):
    code, _, err = cli("tune", "digits", *SMALL, "-o", tmp_path / "none")
    assert code == 1
    assert "4 of 4 runs not finished for seed 0" in err and "negmerge sweep" in err


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> tuple[Path, str, str]:
    """`negmerge demo` at a reduced size, run once for the tests below."""
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.raises(SystemExit) as stop:
        main(["demo", *SMALL, "-o", str(out)])
    assert not stop.value.code
    return out, "", ""


def test_demo_forgets_the_two_classes_and_keeps_the_rest(demo_output):
    out, _, _ = demo_output
    results = json.loads((out / "results.json").read_text())
    seed = results["per_seed"][0]
    pre = seed["pretrained"]["test"]
    assert pre["forget"] > 0.95 and pre["test_forget"] > 0.9
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == ["pre-trained", "negmerge", "mean", "ties", "magmax", "single", "greedy"]
    for method, entry in seed["methods"].items():
        selection = entry["selection"]
        assert selection["feasible"], method
        # Chosen under the constraint: validation retain >= 95% of the pre-trained model's.
        assert selection["val_retain"] >= 0.95 * seed["pretrained"]["validation"]["retain"]
        assert entry["test"]["retain"] >= 0.9, method
        assert len(entry["curve"]["lambda"]) == 41
    # Forgetting happened: forget accuracy far below the pre-trained model's.
    best = min(entry["test"]["forget"] for entry in seed["methods"].values())
    assert best < 0.2 * pre["forget"]
    assert seed["methods"]["mean"]["test"]["forget"] < 0.5 * pre["forget"]
    assert seed["methods"]["negmerge"]["models_merged"] == 4
    assert seed["methods"]["single"]["models_merged"] == 1
    assert 1 <= seed["methods"]["greedy"]["models_merged"] <= 4


def test_single_keeps_the_best_run_and_greedy_starts_from_it(demo_output):
    out, _, _ = demo_output
    methods = json.loads((out / "results.json").read_text())["per_seed"][0]["methods"]
    single, greedy = methods["single"], methods["greedy"]
    candidates = single["candidates"]
    assert len(candidates) == 4
    best = min(candidates, key=lambda c: (c["score"], -c["val_retain"]))
    assert single["runs"] == [best["run"]]
    assert single["lambda"] == best["lambda"]
    steps = greedy["steps"]
    assert steps[0]["added"] == best["run"] and steps[0]["kept"]
    assert sorted(step["added"] for step in steps) == sorted(c["run"] for c in candidates)
    assert greedy["models_merged"] == sum(step["kept"] for step in steps)
    # Greedy only ever keeps an improvement: it is never worse than single on validation.
    g, s = greedy["selection"], single["selection"]
    assert (g["score"], -g["val_retain"]) <= (s["score"], -s["val_retain"])


def test_demo_writes_the_report_files(demo_output):
    out, _, _ = demo_output
    for name in ("curves.png", "methods.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "| method | forget acc | retain acc | test acc |" in markdown
    assert "| negmerge |" in markdown and "| greedy |" in markdown
    assert (
        "negmerge run digits --set 'seeds=[0]' --set 'sweep.grid={lr: [0.003, 0.01], epochs: [5], "
        f"augment: [none, shift+noise]}}' --set output={out}`"
    ) in markdown
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["runs"] == [
        "00-lr0.003-ep5-none",
        "01-lr0.003-ep5-shift+noise",
        "02-lr0.01-ep5-none",
        "03-lr0.01-ep5-shift+noise",
    ]
    assert (out / "seed-0" / "tune.json").is_file()


def test_tune_again_prints_the_table_and_marks_methods_without_a_valid_lambda(cli, demo_output):
    out, _, _ = demo_output
    # No lambda, not even 0, keeps retain >= 1.5 x the pre-trained model's: never a crash.
    code, stdout, err = cli("tune", "digits", *SMALL, "-o", out, "--set", "tune.retain_ratio=1.5")
    assert code == 0, err
    assert "| negmerge (no lambda) | n/a |" in stdout
    assert "no lambda keeps validation retain accuracy >=" in err
    results = json.loads((out / "results.json").read_text())
    assert all(row["seeds_chosen"] == 0 for row in results["rows"][1:])
    assert "no lambda keeps" in (out / "results.md").read_text()


def test_run_of_the_random_recipe_reports_mia_and_the_gap_to_retraining(cli, tmp_path: Path):
    code, stdout, err = cli(
        "run", "digits-random", *SMALL, "--set", "tune.methods=[negmerge, single]",
        "-o", tmp_path / "random", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # --quiet: no progress
    assert "| method | forget acc | retain acc | test acc | MIA efficacy | avg gap |" in stdout
    results = json.loads((tmp_path / "random" / "results.json").read_text())
    seed = results["per_seed"][0]
    retrained = seed["retrained"]["test"]
    assert retrained["gap"] == 0.0
    for entry in [seed["pretrained"]["test"], *(m["test"] for m in seed["methods"].values())]:
        assert 0.0 <= entry["mia"] <= 1.0
        expected = sum(abs(entry[k] - retrained[k]) for k in ("retain", "forget", "test", "mia"))
        assert entry["gap"] == pytest.approx(expected / 4)
    # The retrained model never saw the forget set: it scores there about as on test data.
    assert abs(retrained["forget"] - retrained["test"]) < 0.05


def test_an_interrupted_sweep_exits_130_and_says_how_to_resume(cli, tmp_path: Path, monkeypatch):
    import negmerge_cli.train.sweep as sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "train_model", interrupted)
    code, _, err = cli("sweep", "digits", *SMALL, "-o", tmp_path / "o")
    assert code == 130
    assert "sweep interrupted; finished runs in" in err and "run it again to resume" in err


def test_an_output_that_is_a_file_is_one_line_naming_it(cli, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = cli("sweep", "digits", *SMALL, "-o", blocker, "--quiet")
    assert code == 1
    assert err.startswith(f"negmerge: error: {blocker}: File exists")
    assert len(err.strip().splitlines()) == 1


def test_sigterm_stops_a_sweep_cleanly(tmp_path: Path):
    import os
    import signal
    import time

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "negmerge_cli", "sweep", "digits", *SMALL, "-o", str(out)]
    # Long pre-training so that the signal lands while work is going on.
    proc = subprocess.Popen(
        [*argv, "--set", "pretrain.epochs=400"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not out.is_dir() and time.monotonic() < deadline:  # made when the sweep starts
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "sweep interrupted; finished runs in" in err and "Traceback" not in err
    assert not list(out.rglob(".tmp-*"))
    assert not list(out.rglob("run.json"))
