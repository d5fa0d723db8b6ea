"""Image datasets from local folders, the CIFAR ResNet-18 and its training, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from negmerge_cli.errors import ConfigError
from negmerge_cli.recipes import DataConfig, ModelConfig, load_recipe
from negmerge_cli.train.loop import augment, lr_factor, random_shift
from negmerge_cli.train.models import build_model
from negmerge_cli.train.vision import load_unlearning_data, open_split, split_validation
from tests.vision_helpers import write_dataset

CLASSES = ["airplane", "automobile", "bird"]

RESNET_RECIPE = """\
scenario: random
output: {out}
seeds: [0]
device: cpu
data:
  dataset: cifar10
  root: {root}
  forget_fraction: 0.25
  validation_fraction: 0.2
model:
  arch: resnet18
pretrain: {{optimizer: sgd, lr: 0.05, epochs: 1, batch_size: 8, schedule: cosine,
           augment: crop+flip}}
reference: {{retrain: true, mia: true}}
sweep:
  base: {{optimizer: sgd, lr: 0.01, batch_size: 8, schedule: cosine, augment: crop+flip}}
  grid:
    epochs: [1]
    label_smoothing: [0.0, 0.1]
tune:
  methods: [negmerge, mean]
  lambdas: {{start: 0, stop: 1, count: 3}}
  objective: match_heldout
  retain_ratio: 0.1
"""


# --------------------------------------------------------------------------- datasets


def test_an_image_folder_dataset_reads_classes_from_folder_names(tmp_path: Path):
    write_dataset(tmp_path, "eurosat", ["annual_crop", "forest"], train_per_class=4)
    train = open_split("eurosat", tmp_path, train=True)
    test = open_split("eurosat", tmp_path, train=False)
    assert train.classes == ["annual crop", "forest"]
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(test) == 6
    image = train.image(5)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(image)[..., 1].mean() > np.asarray(image)[..., 0].mean()  # green = class 1


def test_the_validation_split_is_ten_percent_of_train_at_most_5000_with_a_fixed_seed():
    train, val = split_validation(1000, 0.1, None, seed=0)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val)
    assert len(split_validation(100_000, 0.1, None, seed=0)[1]) == 5000
    assert len(split_validation(100_000, 0.1, 300, seed=0)[1]) == 300
    assert np.array_equal(split_validation(1000, 0.1, None, 0)[1], val)
    assert not np.array_equal(split_validation(1000, 0.1, None, 1)[1], val)


def test_missing_data_says_which_folder_and_which_layouts(tmp_path: Path):
    with pytest.raises(ConfigError, match=rf"no cars data: the folder {tmp_path}/cars does not"):
        open_split("cars", tmp_path, train=True)
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(ConfigError) as caught:
        open_split("cifar10", tmp_path, train=True)
    message = str(caught.value)
    assert "torchvision.datasets.CIFAR10" in message and "nothing is downloaded" in message
    assert f"{tmp_path}/cifar10/train/<class>/*.png" in message
    (tmp_path / "sun397").mkdir()
    with pytest.raises(ConfigError, match="torchvision has no train/test split of sun397"):
        open_split("sun397", tmp_path, train=True)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_the_torchvision_layout_is_read_without_downloading(tmp_path: Path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 7), ("t10k", 3)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (count, 28, 28)),
                   2051)  # fmt: skip
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10, 2049)
    train = open_split("mnist", tmp_path, train=True)
    assert len(train) == 7 and train.labels.tolist() == list(range(7))
    assert train.classes == [str(i) for i in range(10)]
    assert train.image(0).mode == "RGB"
    assert len(open_split("mnist", tmp_path, train=False)) == 3


def test_random_forgetting_on_cifar_folders_splits_train_validation_forget_and_test(tmp_path):
    write_dataset(tmp_path, "cifar10", CLASSES, train_per_class=10, test_per_class=2)
    config = DataConfig(dataset="cifar10", root=tmp_path, forget_fraction=0.2,
                        validation_fraction=0.1)  # fmt: skip
    data = load_unlearning_data(config)
    assert len(data.validation) == 3 and len(data.train) == 27
    assert len(data.forget) == 5 and len(data.retain) == 22 and len(data.test) == 6
    assert data.train.x.shape == (27, 3, 32, 32) and data.train.x.dtype == torch.float32
    assert abs(float(data.train.x.mean())) < 3  # normalised with CIFAR's statistics
    assert data.val_forget is data.forget and data.test_retain is data.test


# --------------------------------------------------------------------------- model and loop


def test_the_cifar_resnet18_has_a_3x3_stem_and_no_max_pool():
    model = build_model(ModelConfig(arch="resnet18"), seed=0)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert "bn1.running_mean" in model.state_dict()


def test_warm_up_then_cosine_reaches_zero_at_the_last_step():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(25, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_crop_and_flip_moves_each_image_within_four_pixels_and_keeps_the_shape():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = augment(x, "crop+flip", torch.Generator().manual_seed(0), 0.0)
    assert out.shape == x.shape
    shifted = random_shift(x, torch.Generator().manual_seed(1), max_shift=4)
    # Every output pixel is 0 (padding) or a value of the same image and channel.
    for i in range(2):
        for c in range(3):
            values = set(shifted[i, c].flatten().tolist()) - {0.0}
            assert values <= set(x[i, c].flatten().tolist())


# --------------------------------------------------------------------------- end to end


def test_the_resnet_random_forgetting_recipe_runs_end_to_end(tmp_path: Path, capsys):
    from negmerge_cli.cli import main
    from negmerge_cli.io import load_state_dict

    # 8x8 images: ResNet-18 runs on any size, and 16 times faster than on 32x32.
    write_dataset(tmp_path / "data", "cifar10", CLASSES, 8, 2, size=8)
    path = tmp_path / "r.yaml"
    path.write_text(RESNET_RECIPE.format(out=tmp_path / "out", root=tmp_path / "data"))
    recipe = load_recipe(path)
    assert recipe.model.arch == "resnet18" and recipe.retrain and recipe.mia
    with pytest.raises(SystemExit) as stop:
        main(["run", str(path), "-q", "--set", "threads=2"])
    assert (stop.value.code or 0) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    seed = out / "seed-0"
    assert sorted(p.name for p in (seed / "runs").iterdir()) == ["00-ep1-ls0", "01-ep1-ls0.1"]
    pre = load_state_dict(seed / "pretrained" / "model.safetensors")
    tuned = load_state_dict(seed / "runs" / "00-ep1-ls0" / "model.safetensors")
    assert not torch.equal(pre["conv1.weight"], tuned["conv1.weight"])
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["pre-trained", "retrained", "negmerge",
                                                         "mean"]  # fmt: skip
    retrained = results["rows"][1]["metrics"]
    assert retrained["gap"]["mean"] == 0.0
    assert set(retrained) == {"forget", "retain", "test", "mia", "gap"}
    for row in results["rows"]:
        for key in ("forget", "retain", "test"):
            value = row["metrics"][key]["mean"]
            assert value is None or 0.0 <= value <= 1.0


def test_image_datasets_default_to_the_task_vectors_validation_split(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(RESNET_RECIPE.format(out=tmp_path / "out", root=tmp_path / "data"))
    recipe = load_recipe(path, ["data={dataset: cifar10, root: data, forget_fraction: 0.1}"])
    assert recipe.data.validation_fraction == 0.1 and recipe.data.validation_max is None
    assert load_recipe("digits").data.validation_fraction == 0.15  # digits is unchanged


def test_an_image_dataset_survives_pickling_for_spawned_loader_workers(tmp_path: Path):
    import pickle

    from negmerge_cli.train.vision import ImageDataset

    write_dataset(tmp_path, "eurosat", ["forest", "river"], train_per_class=2)
    images = open_split("eurosat", tmp_path, train=True)
    dataset = ImageDataset(images, [0, 3], lambda image: np.asarray(image).shape)
    copy = pickle.loads(pickle.dumps(ImageDataset(images, [0, 3], np.asarray)))
    assert dataset[1] == ((32, 32, 3), 1)
    assert copy[1][0].shape == (32, 32, 3) and copy[1][1] == 1
