"""CLIP task negation on a tiny open_clip model: heads, linearization, messages, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("torchvision")

from negmerge_cli.errors import CheckpointError, ConfigError
from negmerge_cli.recipes import check_files, load_recipe
from tests.vision_helpers import (
    TINY_CLIP,
    register_tiny_clip,
    save_tiny_clip_weights,
    write_dataset,
)

RECIPE = """\
name: tiny-clip
scenario: task
output: {out}/{{dataset}}-{{finetune}}
seeds: [0]
device: cpu
data:
  dataset: eurosat
  root: {root}
  validation_fraction: 0.25
model:
  arch: clip
  name: negmerge-tiny-clip
  pretrained: {weights}
sweep:
  base: {{epochs: 2, batch_size: 8, warmup_steps: 2, lr: 0.001}}
  grid:
    randaug_magnitude: [1, 9]
tune:
  methods: [negmerge, mean, single]
  lambdas: {{start: 0, stop: 1, count: 3}}
  retain_ratio: 0.5
"""


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights of a tiny CLIP, EuroSAT with 3 classes, ImageNet with 2 (val/ as test)."""
    register_tiny_clip()
    root = tmp_path_factory.mktemp("world")
    weights = save_tiny_clip_weights(root / "weights" / "tiny.safetensors")
    write_dataset(root / "data", "eurosat", ["forest", "river", "sea_lake"])
    write_dataset(root / "data", "imagenet", ["goldfish", "tabby cat"], test_folder="val")
    return {"root": root / "data", "weights": weights, "base": root}


def recipe_file(world: dict[str, Path], out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    text = RECIPE.format(out=out, root=world["root"], weights=world["weights"])
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- zero-shot head


def test_the_zero_shot_head_matches_a_hand_computed_case():
    from negmerge_cli.train.clip import zeroshot_weights

    # Class 0: templates (3, 4) and (0, 2) -> normalised (0.6, 0.8) and (0, 1) -> mean
    # (0.3, 0.9) -> /sqrt(0.9) -> (0.316228, 0.948683). Class 1: one template (-2, 0).
    head = zeroshot_weights([torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[-2.0, 0.0]])],
                            100.0)  # fmt: skip
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], [-1.0, 0.0]]) * 100
    assert torch.allclose(head, expected, atol=1e-4)


def test_build_head_averages_normalised_text_embeddings_of_every_template():
    import open_clip

    from negmerge_cli.train.clip import build_head

    register_tiny_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    head = build_head(model, ["cat", "dog"], templates, torch.device("cpu"), TINY_CLIP)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a photo of a dog.", "a drawing of a dog."]))
    text = text / text.norm(dim=-1, keepdim=True)
    mean = text.mean(0)
    expected = mean / mean.norm() * model.logit_scale.exp()
    assert head.shape == (2, 16)
    assert torch.allclose(head[1], expected, atol=1e-5)
    assert torch.allclose(head.norm(dim=-1), model.logit_scale.exp().expand(2), atol=1e-4)


# --------------------------------------------------------------------------- linearization


def test_the_linearized_model_is_the_first_order_expansion_of_the_encoder():
    import open_clip
    from torch.func import functional_call, jvp

    from negmerge_cli.train.linearize import LinearizedModel

    register_tiny_clip()
    torch.manual_seed(0)
    encoder = open_clip.create_model(TINY_CLIP, pretrained=None).visual.eval()
    base = {k: v.detach().clone() for k, v in encoder.named_parameters()}
    linear = LinearizedModel(encoder).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(linear(x), encoder(x), atol=1e-5)  # p = p0: the model itself
        delta = {k: 0.01 * torch.randn_like(v) for k, v in base.items()}
        for name, p in linear.model.named_parameters():
            p.add_(delta[name])

    reference = open_clip.create_model(TINY_CLIP, pretrained=None).visual.eval()
    reference.load_state_dict(base)
    names = list(base)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The model's own jvp, computed directly (kernels with forward-mode derivatives).
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            out, tangent = jvp(
                lambda *p: functional_call(reference, dict(zip(names, p, strict=True)), (x,)),
                tuple(base[n] for n in names),
                tuple(delta[n] for n in names),
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        got = linear(x)
    assert torch.allclose(got, out + tangent, atol=1e-5)
    # ... which differs from the non-linear model at the same weights (second order).
    with torch.no_grad():
        moved = linear.model(x)
    assert not torch.allclose(got, moved, atol=1e-7)
    assert set(linear.state_dict()) == set(encoder.state_dict())


def test_linearized_training_updates_only_the_trainable_copy():
    import open_clip

    from negmerge_cli.train.linearize import LinearizedModel

    register_tiny_clip()
    torch.manual_seed(0)
    encoder = open_clip.create_model(TINY_CLIP, pretrained=None).visual
    linear = LinearizedModel(encoder).train()
    before = {k: v.clone() for k, v in linear.reference.state_dict().items()}
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    linear(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in linear.reference.state_dict().items())
    moved = [k for k, v in linear.state_dict().items() if not torch.equal(before[k], v)]
    assert moved and len(list(linear.parameters())) == len(list(encoder.parameters()))


# --------------------------------------------------------------------------- clear messages


def test_missing_weights_and_data_are_reported_together_with_what_to_put_where(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(
        RECIPE.format(out=tmp_path / "out", root=tmp_path / "nodata", weights=tmp_path / "w.pt")
    )
    problems = check_files(load_recipe(path))
    assert len(problems) == 3
    assert problems[0].startswith(f"data.root: no eurosat data: the folder {tmp_path}/nodata/")
    assert "train/<class>/*.png" in problems[0]
    assert problems[1].startswith("data.control: no imagenet data")
    assert problems[2].startswith(f"model.pretrained: no open_clip weights at {tmp_path}/w.pt")
    assert "nothing is downloaded" in problems[2]


def test_a_weights_folder_resolves_to_its_one_weights_file_and_refuses_ambiguity(tmp_path: Path):
    from negmerge_cli.recipes import ModelConfig
    from negmerge_cli.train.clip import resolve_weights

    snapshot = tmp_path / "cache" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"x")
    config = ModelConfig(arch="clip", pretrained=tmp_path / "cache")
    assert resolve_weights(config) == snapshot / "open_clip_pytorch_model.bin"
    (snapshot / "other.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="holds several weights files"):
        resolve_weights(config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"the folder .*empty holds no weights file; put"):
        resolve_weights(ModelConfig(arch="clip", pretrained=empty))


def test_weights_of_another_model_are_refused_with_the_file_name(tmp_path: Path):
    from negmerge_cli.io import save_state_dict
    from negmerge_cli.recipes import ModelConfig
    from negmerge_cli.train.clip import create_clip

    register_tiny_clip()
    path = tmp_path / "wrong.safetensors"
    save_state_dict({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: does not fit open_clip model {TINY_CLIP}"):
        create_clip(ModelConfig(arch="clip", name=TINY_CLIP, pretrained=path))


def test_an_unknown_open_clip_name_is_a_config_error():
    from negmerge_cli.recipes import ModelConfig
    from negmerge_cli.train.clip import create_clip

    with pytest.raises(ConfigError, match=r"model.name: open_clip has no model 'ViT-Q-99'"):
        create_clip(ModelConfig(arch="clip", name="ViT-Q-99", pretrained=Path("x")))


# --------------------------------------------------------------------------- end to end


def test_the_clip_recipe_runs_end_to_end_full_and_linear(tiny_world, tmp_path: Path, cli):
    from negmerge_cli.io import load_state_dict

    register_tiny_clip()
    recipe = recipe_file(tiny_world, tmp_path / "out")
    code, stdout, stderr = cli("run", recipe, "--device", "cpu", "-q")
    assert code == 0, stderr
    out = tmp_path / "out" / "eurosat-full"
    runs = sorted(p.name for p in (out / "seed-0" / "runs").iterdir())
    assert runs == ["00-m1", "01-m9"]
    info = json.loads((out / "seed-0" / "runs" / "01-m9" / "run.json").read_text())
    assert info["hyperparameters"]["randaug_magnitude"] == 9
    assert info["hyperparameters"]["optimizer"] == "adamw"
    assert info["hyperparameters"]["weight_decay"] == 0.1
    assert (info["dataset"], info["finetune"]) == ("eurosat", "full")
    assert info["train_samples"] == 14  # 18 training images minus 25% (rounded) validation
    base = load_state_dict(out / "zeroshot" / "model.safetensors")
    tuned = load_state_dict(out / "seed-0" / "runs" / "00-m1" / "model.safetensors")
    assert set(base) == set(tuned) and "conv1.weight" in base  # the image encoder only
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["pre-trained", "negmerge", "mean", "single"]
    for row in results["rows"]:
        assert set(row["metrics"]) == {"forget", "control"}
    negmerge = results["rows"][1]
    assert negmerge["merge_seconds"]["mean"] > 0
    assert "| method | forget acc | control acc |" in stdout

    # Each run starts from the zero-shot weights: run 01 trained first in a process (run 00
    # copied as finished) gives the checkpoint it gave when trained after run 00.
    import shutil

    solo = tmp_path / "solo"
    shutil.copytree(out / "zeroshot", solo / "zeroshot")
    shutil.copy(out / "heads.safetensors", solo / "heads.safetensors")
    shutil.copytree(out / "seed-0" / "runs" / "00-m1", solo / "seed-0" / "runs" / "00-m1")
    code, _, stderr = cli("sweep", recipe, "--set", f"output={solo}")
    assert code == 0, stderr
    assert "run 00-m1: finished earlier, skipped" in stderr
    alone = load_state_dict(solo / "seed-0" / "runs" / "01-m9" / "model.safetensors")
    after = load_state_dict(out / "seed-0" / "runs" / "01-m9" / "model.safetensors")
    assert all(torch.equal(alone[k], after[k]) for k in alone)

    code, stdout, stderr = cli("run", recipe, "--device", "cpu", "-q", "--set",
                               "model.finetune=linear")  # fmt: skip
    assert code == 0, stderr
    linear = tmp_path / "out" / "eurosat-linear"
    info = json.loads((linear / "seed-0" / "runs" / "00-m1" / "run.json").read_text())
    assert info["finetune"] == "linear"
    assert (linear / "results.md").is_file()


def test_the_recipes_validate_command_checks_files_and_passes_with_them(tiny_world, tmp_path, cli):
    good = recipe_file(tiny_world, tmp_path / "out")
    code, stdout, stderr = cli("recipes", "validate", good)
    assert code == 0, stderr
    assert "task eurosat (control imagenet)" in stdout
    code, stdout, stderr = cli("recipes", "validate", good, "--set", "data.dataset=dtd")
    assert code == 2
    assert "data.root: no dtd data: the folder" in stderr


def test_imagenet_folders_named_by_wordnet_id_need_a_class_name_file(tiny_world, tmp_path):
    from negmerge_cli.train.clip import class_names_of, task_splits

    root = tmp_path / "data"
    write_dataset(root, "imagenet", ["n01443537", "n01440764"], 2, 1, test_folder="val")
    recipe = load_recipe(recipe_file(tiny_world, tmp_path / "out"), [f"data.root={root}"])
    images = task_splits(recipe, "imagenet").train_images
    with pytest.raises(ConfigError, match=r"data\.control_class_names: the imagenet class folders"):
        class_names_of(recipe, images, control=True)
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\n")
    recipe = load_recipe(
        recipe_file(tiny_world, tmp_path / "out"),
        [f"data.root={root}", f"data.control_class_names={names}"],
    )
    assert class_names_of(recipe, images, control=True) == ["tench", "goldfish"]
    names.write_text("tench\n")
    with pytest.raises(ConfigError, match="has 1 names but the data has 2 classes"):
        class_names_of(recipe, images, control=True)


def test_evaluation_images_are_decoded_once_the_same_with_or_without_workers(tiny_world):
    from negmerge_cli.evaluate.zeroshot import decode_images
    from negmerge_cli.train.vision import open_split

    images = open_split("eurosat", tiny_world["root"], train=False)
    cpu = torch.device("cpu")
    alone = decode_images(images, [0, 4, 8], 16, 0, cpu)
    pooled = decode_images(images, [0, 4, 8], 16, 2, cpu)
    assert alone.x.dtype == torch.uint8 and alone.x.shape == (3, 3, 16, 16)
    assert torch.equal(alone.x, pooled.x) and alone.y.tolist() == [0, 1, 2]


def test_the_evaluator_scores_base_minus_lambda_vector_like_a_hand_built_classifier(
    tiny_world, tmp_path, cli
):
    from negmerge_cli.evaluate.zeroshot import ClipEvaluator, load_eval_data
    from negmerge_cli.io import load_state_dict
    from negmerge_cli.train.clip import load_encoder, read_heads

    recipe_path = recipe_file(tiny_world, tmp_path / "out")
    code, _, stderr = cli("sweep", recipe_path, "-q")
    assert code == 0, stderr
    recipe = load_recipe(recipe_path)
    out = recipe.output
    base = load_state_dict(out / "zeroshot" / "model.safetensors")
    tuned = load_state_dict(out / "seed-0" / "runs" / "01-m9" / "model.safetensors")
    data = load_eval_data(recipe)
    assert len(data.val_forget) == 4 and len(data.test_forget) == 9  # 25% of 18; 3 x 3
    assert len(data.val_control) == 3 and len(data.test_control) == 6
    evaluator = ClipEvaluator(recipe, data, base)
    tau = {k: tuned[k] - base[k] for k in base}

    def by_hand(state, images, task):
        encoder = load_encoder(recipe, state).eval()
        head = read_heads(recipe)[task][0]
        mean = torch.tensor(data.mean).view(1, 3, 1, 1)
        std = torch.tensor(data.std).view(1, 3, 1, 1)
        with torch.no_grad():
            features = encoder((images.x.float() / 255 - mean) / std)
        logits = (features / features.norm(dim=-1, keepdim=True)) @ head.T
        return float((logits.argmax(-1) == images.y).float().mean())

    # lambda = -1 adds the task vector back: the fine-tuned encoder itself.
    forget, control = evaluator.validation(evaluator.edited(tau, -1.0))
    assert forget == pytest.approx(by_hand(tuned, data.val_forget, "eurosat"))
    assert control == pytest.approx(by_hand(tuned, data.val_control, "imagenet"))
    negated = {k: base[k] - 0.5 * tau[k] for k in base}
    test = evaluator.test(evaluator.edited(tau, 0.5))
    assert test["forget"] == pytest.approx(by_hand(negated, data.test_forget, "eurosat"))
    assert test["control"] == pytest.approx(by_hand(negated, data.test_control, "imagenet"))
    curve = evaluator.curve(tau, [0.0, 0.5])
    assert (curve.forget[0], curve.retain[0]) == evaluator.validation(evaluator.base)


def test_new_class_names_rebuild_the_heads_and_refuse_runs_trained_under_the_old(
    tiny_world, tmp_path, cli
):
    from negmerge_cli.train.clip import read_heads

    recipe_path = recipe_file(tiny_world, tmp_path / "out")
    code, _, stderr = cli("sweep", recipe_path, "-q")
    assert code == 0, stderr
    recipe = load_recipe(recipe_path)
    assert read_heads(recipe)["eurosat"][1] == ["forest", "river", "sea lake"]
    names = tmp_path / "names.txt"
    names.write_text("woodland\nstream\nlake\n")
    code, _, stderr = cli("sweep", recipe_path, "-q", "--set", f"data.class_names={names}")
    assert code == 1
    assert "holds a run of another task, fine-tuning mode or class names" in stderr
    assert read_heads(recipe)["eurosat"][1] == ["woodland", "stream", "lake"]
