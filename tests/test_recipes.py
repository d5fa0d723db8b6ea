"""Recipes: every bundled one validates; bad files report every problem with its location."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from negmerge_cli.errors import ConfigError
from negmerge_cli.recipes import (
    TUNE_METHODS,
    ResourcesConfig,
    TrainConfig,
    apply_overrides,
    bundled_recipes,
    expand_grid,
    load_recipe,
    parse_recipe,
    recipe_summary,
)

MINIMAL = """\
scenario: class
output: out/x
data:
  forget_classes: [1]
sweep:
  base: {lr: 0.01, epochs: 2}
  grid:
    lr: [0.01, 0.02]
    augment: [none, shift, noise]
"""


def problems(text: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_recipe(text, "bad.yaml", overrides)
    return caught.value.problems


# --------------------------------------------------------------------------- bundled


def test_the_bundled_recipes_include_the_two_digits_scenarios():
    assert {"digits", "digits-random"} <= set(bundled_recipes())


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_validates_and_documents_itself(name: str):
    text = bundled_recipes()[name]
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.source == f"bundled:{name}"
    # The torchtune-style header: what it does, what must be on disk, the command, an override.
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert recipe_summary(text)
    assert "Needs on disk:" in header
    assert f"negmerge run {name}" in header
    override = re.search(r"# Override:\s+(negmerge run \S+ .*)", header)
    assert override is not None
    # The documented override itself is valid.
    sets = re.findall(r"--set (\S+)", override.group(1))
    assert sets
    load_recipe(name, sets)


def test_the_digits_recipe_meets_the_demo_requirements():
    recipe = load_recipe("digits")
    assert recipe.scenario == "class" and len(recipe.data.forget_classes) == 2
    assert len(recipe.sweep.runs) >= 8
    varied = set().union(*(run.varied for run in recipe.sweep.runs))
    assert {"lr", "epochs", "label_smoothing", "augment"} <= varied
    assert set(recipe.tune.methods) == set(TUNE_METHODS)
    assert len(recipe.seeds) >= 3
    assert recipe.tune.retain_ratio == 0.95


def test_the_random_recipe_retrains_a_reference_and_reports_mia():
    recipe = load_recipe("digits-random")
    assert recipe.scenario == "random" and recipe.data.forget_fraction == 0.1
    assert recipe.retrain and recipe.mia


def test_the_bundled_recipes_are_also_the_files_in_recipes_folder():
    folder = Path(__file__).resolve().parent.parent / "recipes"
    on_disk = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.yaml")}
    assert on_disk == bundled_recipes()


def test_an_unknown_recipe_name_lists_the_bundled_ones():
    bundled = "clip-vit-b32, digits, digits-random, resnet18-cifar10-random"
    with pytest.raises(ConfigError, match=f"bundled recipes: {bundled}"):
        load_recipe("digitz")


# --------------------------------------------------------------------------- good files


def test_a_minimal_recipe_fills_in_the_defaults(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path)
    assert recipe.name == "mine"
    assert recipe.seeds == (0,)
    assert recipe.tune.lambdas == tuple(i / 20 for i in range(21))
    assert recipe.tune.methods == TUNE_METHODS
    assert recipe.tune.retain_ratio == 0.95
    assert not recipe.retrain and not recipe.mia
    assert recipe.pretrain.optimizer == "adam"
    assert len(recipe.sweep.runs) == 6
    assert all(run.params.epochs == 2 for run in recipe.sweep.runs)


def test_a_grid_expands_to_its_cartesian_product_last_key_fastest():
    runs = parse_recipe(MINIMAL).sweep.runs
    assert [(r.params.lr, r.params.augment) for r in runs] == [
        (0.01, "none"),
        (0.01, "shift"),
        (0.01, "noise"),
        (0.02, "none"),
        (0.02, "shift"),
        (0.02, "noise"),
    ]
    assert [r.run_id for r in runs[:2]] == ["00-lr0.01-none", "01-lr0.01-shift"]
    assert runs[4].varied == {"lr": 0.02, "augment": "shift"}


def test_expand_grid_of_three_keys():
    combos = expand_grid({"a": [1, 2], "b": ["x"], "c": [True, False]})
    assert combos == [
        {"a": 1, "b": "x", "c": True},
        {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True},
        {"a": 2, "b": "x", "c": False},
    ]


def test_an_explicit_run_list_sets_each_run_over_the_base():
    text = (
        MINIMAL.split("  grid:")[0]
        + "  runs:\n    - {lr: 0.1}\n    - {epochs: 7, label_smoothing: 0.2}\n"
    )
    runs = parse_recipe(text).sweep.runs
    assert runs[0].params == TrainConfig(lr=0.1, epochs=2)
    assert runs[1].params == TrainConfig(lr=0.01, epochs=7, label_smoothing=0.2)
    assert [r.run_id for r in runs] == ["00-lr0.1", "01-ep7-ls0.2"]


def test_without_grid_or_runs_the_sweep_is_the_base_run_alone():
    text = MINIMAL.split("  grid:")[0]
    runs = parse_recipe(text).sweep.runs
    assert len(runs) == 1 and runs[0].run_id == "00"


def test_a_lambda_grid_is_start_stop_count_or_an_explicit_list():
    recipe = parse_recipe(MINIMAL + "tune:\n  lambdas: {start: 0.5, stop: 1.5, count: 3}\n")
    assert recipe.tune.lambdas == (0.5, 1.0, 1.5)
    recipe = parse_recipe(MINIMAL + "tune:\n  lambdas: [0, 0.3, 2]\n")
    assert recipe.tune.lambdas == (0.0, 0.3, 2.0)


def test_a_number_written_1e_3_is_read_as_a_float():
    # PyYAML reads 1e-3 (no dot) as a string; the schema accepts it as the number it is.
    recipe = parse_recipe(MINIMAL.replace("lr: 0.01, epochs", "lr: 1e-3, epochs"))
    assert recipe.sweep.base.lr == pytest.approx(0.001)


# --------------------------------------------------------------------------- overrides


def test_overrides_set_nested_values_parsed_as_yaml():
    recipe = parse_recipe(
        MINIMAL,
        overrides=["seeds=[3, 4]", "sweep.base.epochs=9", "tune.retain_ratio=0.9", "output=o"],
    )
    assert recipe.seeds == (3, 4)
    assert all(r.params.epochs == 9 for r in recipe.sweep.runs)
    assert recipe.tune.retain_ratio == 0.9
    assert str(recipe.output) == "o"


def test_an_override_can_replace_the_whole_grid():
    recipe = parse_recipe(MINIMAL, overrides=["sweep.grid={lr: [0.5]}"])
    assert [r.params.lr for r in recipe.sweep.runs] == [0.5]


def test_apply_overrides_leaves_the_input_untouched_and_creates_missing_sections():
    raw = {"tune": {"retain_ratio": 0.95}}
    out, errors = apply_overrides(raw, ["tune.objective=min_forget", "reference.mia=true"])
    assert errors == []
    assert raw == {"tune": {"retain_ratio": 0.95}}
    assert out == {
        "tune": {"retain_ratio": 0.95, "objective": "min_forget"},
        "reference": {"mia": True},
    }


def test_bad_overrides_are_reported_with_the_file_problems():
    found = problems(MINIMAL, "noequals", "data.forget_classes.x=1", "sweep.bse.lr=1", "a..b=1")
    assert "--set 'noequals': expected key.sub=value" in found
    assert "--set 'data.forget_classes.x=1': data.forget_classes is not a mapping" in found
    assert any(
        p.startswith("sweep.bse") and "unknown key (did you mean 'base'?)" in p for p in found
    )
    assert "--set 'a..b=1': expected key.sub=value" in found


# --------------------------------------------------------------------------- bad files

BAD = """\
scenario: class
output: out/bad
seeds: [0, zero]
threds: 2
data:
  forget_classes: [3, 12]
  test_fraction: 1.5
model:
  pretrained: /nonexistent/model.safetensors
sweep:
  base:
    lrr: 0.1
    epochs: 0
  grid:
    lr: [0.1, -1]
    dropout: [0.1]
    augment: rotate
tune:
  methods: [negmerge, negmerg]
  lambdas: {start: 0, stop: 1, count: 0}
  objective: best
"""


def test_every_problem_of_a_bad_file_is_reported_at_once_with_its_location():
    with pytest.raises(ConfigError) as caught:
        parse_recipe(BAD, "bad.yaml")
    found = caught.value.problems
    expected = [
        "seeds[1] (line 3): expected an integer, got str 'zero'",
        "threds (line 4): unknown key (did you mean 'threads'?)",
        "data.forget_classes[1] (line 6): 12 is out of range [0, 9]",
        "data.test_fraction (line 7): 1.5 is out of range (0.0, 0.9]",
        "model.pretrained (line 9): file not found: /nonexistent/model.safetensors",
        "sweep.base.lrr (line 12): unknown key (did you mean 'lr'?)",
        "sweep.base.epochs (line 13): 0 is out of range [1, 10000]",
        "sweep.grid.lr[1] (line 15): -1 is out of range (0.0, inf]",
        "sweep.grid.dropout (line 16): unknown hyperparameter",
        "sweep.grid.augment (line 17): expected a list, got str 'rotate'",
        "tune.methods[1] (line 19): unknown value 'negmerg'; choose one of: negmerge, mean, "
        "ties, magmax, single, greedy",
        "tune.lambdas.count (line 20): 0 is out of range [1, 100000]",
        "tune.objective (line 21): unknown value 'best'; choose one of: min_forget, match_heldout",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    assert len(found) == len(expected)
    # The message names the file and counts the problems; the CLI shows it as exit 2.
    assert str(caught.value).startswith(f"bad.yaml: {len(expected)} problems:")


def test_missing_required_keys_are_reported_together():
    found = problems("description: nothing else\n")
    assert found == [
        "scenario: missing required key",
        "output: missing required key",
        "data: missing required key",
        "sweep: missing required key",
    ]


def test_scenario_specific_keys_are_checked():
    found = problems(MINIMAL.replace("scenario: class", "scenario: random"))
    assert "data.forget_fraction (line 3): required for scenario 'random'" in found
    assert any(
        p.startswith("data.forget_classes") and "only for scenario 'class'" in p for p in found
    )
    all_classes = MINIMAL.replace("[1]", "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]")
    assert any("leaves nothing to retain" in p for p in problems(all_classes))


def test_grid_and_runs_together_and_duplicate_runs_are_refused():
    both = MINIMAL + "  runs:\n    - {lr: 0.1}\n"
    assert any("either grid" in p for p in problems(both))
    same = MINIMAL.split("  grid:")[0] + "  runs:\n    - {lr: 0.1}\n    - {lr: 0.1}\n"
    assert any("runs 0 and 1 have the same hyperparameters" in p for p in problems(same))


def test_wrong_types_in_sections_are_reported():
    found = problems(MINIMAL + "tune: [1, 2]\nreference: {retrain: yes please}\n")
    assert any(p.startswith("tune (line") and "expected a mapping" in p for p in found)
    assert any(p.startswith("reference.retrain") and "true or false" in p for p in found)


def test_invalid_yaml_names_the_line():
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line 2\)"):
        parse_recipe("scenario: class\noutput: [unclosed", "bad.yaml")


def test_a_top_level_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="expected a mapping at the top, got list"):
        parse_recipe(yaml.safe_dump([1, 2]), "bad.yaml")


def test_an_existing_pretrained_path_is_accepted(tmp_path: Path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    recipe = parse_recipe(MINIMAL, overrides=[f"model.pretrained={weights}"])
    assert recipe.model.pretrained == weights


def test_resources_for_ray_default_to_one_cpu_and_are_checked_strictly():
    assert parse_recipe(MINIMAL).resources == ResourcesConfig(cpus=1.0, gpus=0.0, retries=3)
    given = parse_recipe(MINIMAL + "resources: {cpus: 8, gpus: 0.5, retries: 0}\n").resources
    assert given == ResourcesConfig(cpus=8.0, gpus=0.5, retries=0)
    found = problems(MINIMAL + "resources: {gpu: 1, cpus: 1.5, retries: -1}\n")
    assert "resources.gpu (line 10): unknown key (did you mean 'gpus'?)" in found[0]
    assert found[1] == (
        "resources.cpus (line 10): 1.5: Ray takes a fraction below 1 or a whole number"
    )
    assert found[2] == "resources.retries (line 10): -1 is out of range [0, 100]"
