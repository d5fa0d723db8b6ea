"""Recipe schema of the paper's settings: task negation, CLIP, ResNet-18, image datasets."""

from __future__ import annotations

import re

import pytest

from negmerge_cli.errors import ConfigError
from negmerge_cli.recipes import CLIP_EPOCHS, load_recipe, parse_recipe

TASK = """\
scenario: task
output: out/{dataset}-{finetune}
data: {dataset: dtd, root: data}
model: {arch: clip, pretrained: weights/ViT-B-32.pt}
sweep:
  grid: {randaug_magnitude: [1, 2], randaug_ops: [1, 3]}
"""


def problems(text: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_recipe(text, "bad.yaml", overrides)
    # Without the "(line N)" the messages carry, so that the tests read as the rules.
    return [re.sub(r" \(line \d+\)", "", p) for p in caught.value.problems]


def test_a_clip_recipe_gets_the_reference_fine_tuning_with_the_tasks_epochs():
    recipe = parse_recipe(TASK)
    base = recipe.sweep.base
    assert (base.optimizer, base.lr, base.weight_decay, base.batch_size) == (
        "adamw",
        1e-5,
        0.1,
        128,
    )
    assert (base.schedule, base.warmup_steps, base.epochs) == ("cosine", 500, CLIP_EPOCHS["dtd"])
    assert [r.run_id for r in recipe.sweep.runs] == ["00-m1-n1", "01-m1-n3", "02-m2-n1", "03-m2-n3"]
    assert str(recipe.output) == "out/dtd-full"
    assert recipe.data.control is None and not recipe.retrain and not recipe.mia
    other = parse_recipe(TASK, overrides=["data.dataset=svhn", "sweep.base.lr=3e-5"])
    assert (other.sweep.base.epochs, other.sweep.base.lr) == (4, 3e-5)


def test_the_bundled_clip_recipe_sweeps_30_randaugment_settings():
    recipe = load_recipe("clip-vit-b32")
    assert len(recipe.sweep.runs) == 30
    varied = {(r.params.randaug_magnitude, r.params.randaug_ops) for r in recipe.sweep.runs}
    assert varied == {(m, n) for m in range(1, 11) for n in (1, 2, 3)}
    assert len(recipe.tune.lambdas) == 21 and recipe.tune.retain_ratio == 0.95
    assert recipe.precision == "bf16" and recipe.device == "auto"


def test_the_bundled_resnet_recipe_sweeps_27_runs_with_sgd_and_cosine():
    recipe = load_recipe("resnet18-cifar10-random")
    assert len(recipe.sweep.runs) == 27
    grid = {(r.params.epochs, r.params.weight_decay, r.params.label_smoothing)
            for r in recipe.sweep.runs}  # fmt: skip
    assert grid == {(e, w, s) for e in (40, 50, 60) for w in (1e-4, 5e-5, 1e-5)
                    for s in (0.0, 0.05, 0.1)}  # fmt: skip
    assert all(r.params.optimizer == "sgd" and r.params.schedule == "cosine"
               for r in recipe.sweep.runs)  # fmt: skip
    assert recipe.model.arch == "resnet18" and recipe.data.forget_fraction == 0.1
    assert recipe.retrain and recipe.mia


def test_task_negation_rules_are_all_reported_at_once():
    found = problems(
        TASK,
        "data.forget_fraction=0.1",
        "data.control=dtd",
        "model.arch=resnet18",
        "model.quick_gelu=false",
    )
    assert "data.forget_fraction: not for scenario 'task' (the whole task is forgotten)" in found
    assert "data.control: the control task must differ from 'dtd'" in found
    assert "model.arch: scenario 'task' needs arch clip (a zero-shot head)" in found
    assert "model.quick_gelu: only for arch clip" in found


def test_clip_needs_weights_and_image_data_needs_a_root():
    found = problems(TASK, "model.pretrained=null", "data={dataset: dtd}")
    assert any(p.startswith("model.pretrained: required for arch clip") for p in found)
    assert any(p.startswith("data.root: required for dataset 'dtd'") for p in found)


def test_architectures_must_fit_their_data():
    text = "scenario: random\noutput: o\ndata: {forget_fraction: 0.1}\nsweep: {}\n"
    assert "model.arch: resnet18 is for the image datasets (e.g. cifar10)" in problems(
        text, "model.arch=resnet18"
    )
    found = problems(text, "data.dataset=cifar10", "data.root=d")
    assert "model.arch: small_cnn reads 8x8 digits; use resnet18 for cifar10" in found
    assert "model.arch: clip is for scenario 'task' (task negation)" in problems(
        text, "model={arch: clip, pretrained: w.pt}"
    )


def test_an_unknown_output_placeholder_lists_the_known_ones():
    found = problems(TASK, "output=out/{task}")
    assert found == [
        "output: cannot fill in 'out/{task}' ('task'); the placeholders are "
        "{dataset}, {arch}, {model}, {finetune}"
    ]


def test_new_training_keys_are_checked_like_the_others():
    found = problems(TASK, "sweep.base.schedule=linear", "sweep.grid.randaug_ops=[0]")
    assert any("sweep.base.schedule: unknown value 'linear'" in p for p in found)
    assert any(p.startswith("sweep.grid.randaug_ops[0]: 0 is out of range") for p in found)
