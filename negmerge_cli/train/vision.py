"""Image datasets from local folders: the CLIP tasks, ImageNet as control, CIFAR-10.

Nothing is ever downloaded. Each dataset lives in ``data.root/<name>/`` in one of two
layouts, tried in this order:

1. image folders: ``<name>/train/<class>/*.png`` and ``<name>/test/<class>/*.png``
   (``val/`` is accepted in place of ``test/``, as ImageNet ships it);
2. the files of the torchvision dataset class, opened with ``download=False``
   (StanfordCars, DTD, GTSRB, MNIST, SVHN, CIFAR10; EuroSAT, RESISC45 and SUN397 have
   no train/test split in torchvision and need layout 1).

The validation split follows the task-vectors protocol: 10% of the training images, at
most 5,000, drawn with a fixed seed (``data.validation_fraction``, ``data.validation_max``,
``data.split_seed``); the rest is used for training.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from negmerge_cli.errors import ConfigError
from negmerge_cli.recipes import DATA_LAYOUT_HINT, DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_VALIDATION_MAX = 5000

# torchvision class and how to ask it for the train / test split.
_TORCHVISION: dict[str, tuple[str, Callable[[bool], dict[str, Any]]]] = {
    "cars": ("StanfordCars", lambda train: {"split": "train" if train else "test"}),
    "dtd": ("DTD", lambda train: {"split": "train" if train else "test"}),
    "gtsrb": ("GTSRB", lambda train: {"split": "train" if train else "test"}),
    "mnist": ("MNIST", lambda train: {"train": train}),
    "svhn": ("SVHN", lambda train: {"split": "train" if train else "test"}),
    "cifar10": ("CIFAR10", lambda train: {"train": train}),
    "imagenet": ("ImageNet", lambda train: {"split": "train" if train else "val"}),
}
_DIGIT_NAMES = [str(i) for i in range(10)]


@dataclass
class ImageSet:
    """A list of labelled images that decodes each one on demand to an RGB PIL image."""

    name: str
    classes: list[str]
    _get: Callable[[int], tuple[Any, int]]
    labels: np.ndarray
    array: np.ndarray | None = None
    """All images as one ``[N, H, W, 3]`` uint8 array when the files hold them so (CIFAR)."""

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Any:
        image, _label = self._get(int(index))
        if not hasattr(image, "convert"):  # a numpy array (CIFAR-10's in-memory batches)
            from PIL import Image

            image = Image.fromarray(np.asarray(image))
        return image.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` for the given indices of an :class:`ImageSet`."""

    def __init__(self, images: ImageSet, indices: Sequence[int], transform: Callable) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        return self.transform(self.images.image(index)), int(self.images.labels[index])


def _pretty(name: str) -> str:
    return name.replace("_", " ").strip()


def _image_folder(folder: Path, name: str) -> ImageSet:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"data.root: {folder} holds no class folders ({DATA_LAYOUT_HINT})")
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise ConfigError(f"data.root: no images under {folder} ({DATA_LAYOUT_HINT})")

    get = _FileReader(files, labels)
    return ImageSet(name, [_pretty(c) for c in classes], get, np.asarray(labels, dtype=np.int64))


class _FileReader:
    """Opens image ``i`` from its file (a class, not a closure: loader workers pickle it)."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files = files
        self.labels = labels

    def __call__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            image.load()
            return image, self.labels[index]


class _DatasetReader:
    """Item ``i`` of a torchvision dataset (picklable, unlike a lambda)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index]


def _torchvision_set(dataset: str, folder: Path, train: bool) -> ImageSet:
    import torchvision.datasets as tvd

    if dataset not in _TORCHVISION:
        raise ConfigError(
            f"data.root: no {dataset} image folders in {folder}: expected {folder}/train/<class>/"
            f"*.png and {folder}/test/<class>/*.png (torchvision has no train/test split of "
            f"{dataset} to read instead)"
        )
    class_name, split = _TORCHVISION[dataset]
    kwargs = split(train)
    if dataset != "imagenet":
        kwargs["download"] = False
    try:
        ds = getattr(tvd, class_name)(str(folder), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"data.root: no {dataset} data in {folder}: expected {folder}/train/<class>/*.png and "
            f"{folder}/test/<class>/*.png, or the files torchvision.datasets.{class_name} reads "
            f"there (it said: {detail}); nothing is downloaded"
        ) from None
    labels = _labels_of(ds)
    classes = getattr(ds, "classes", None)
    if dataset in ("mnist", "svhn"):
        classes = _DIGIT_NAMES
    elif dataset == "imagenet" and classes:
        classes = [c[0] if isinstance(c, tuple) else c for c in classes]
    names = [_pretty(str(c)) for c in classes] if classes else []
    array = getattr(ds, "data", None) if dataset == "cifar10" else None
    return ImageSet(dataset, names, _DatasetReader(ds), labels, array)


def _labels_of(ds: Any) -> np.ndarray:
    for attr in ("targets", "labels", "_labels"):
        value = getattr(ds, attr, None)
        if value is not None:
            return np.asarray(value, dtype=np.int64)
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples is not None:
        return np.asarray([s[1] for s in samples], dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def open_split(dataset: str, root: Path, train: bool) -> ImageSet:
    """The train or test images of ``dataset`` from ``root/<dataset>`` (see module docs)."""
    folder = Path(root) / dataset
    if not folder.is_dir():
        raise ConfigError(
            f"data.root: no {dataset} data: the folder {folder} does not exist; put {dataset} "
            f"there ({DATA_LAYOUT_HINT})"
        )
    names = ["train"] if train else ["test", "val"]
    for sub in names:
        if (folder / sub).is_dir() and (folder / "train").is_dir():
            return _image_folder(folder / sub, dataset)
    return _torchvision_set(dataset, folder, train)


def read_class_names(path: Path, count: int, key: str) -> list[str]:
    """One class name per line (blank lines ignored); the count must match the data."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    names = [n for n in names if n]
    if len(names) != count:
        raise ConfigError(f"{key}: {path} has {len(names)} names but the data has {count} classes")
    return names


def class_names(images: ImageSet, override: Path | None, key: str) -> list[str]:
    """The names the zero-shot head is built from: the override file, else the dataset's."""
    count = int(images.labels.max()) + 1 if len(images.labels) else 0
    if override is not None:
        return read_class_names(override, max(count, len(images.classes)), key)
    if not images.classes:
        raise ConfigError(
            f"{key}: the {images.name} files carry no class names; write them to a text file, "
            f"one per line in label order, and set {key} to it"
        )
    if all(re.fullmatch(r"n\d{8}", c) for c in images.classes[:20]):
        raise ConfigError(
            f"{key}: the {images.name} class folders are WordNet ids ({images.classes[0]}, ...); "
            f"give a file with one readable class name per line in folder order via {key}"
        )
    return images.classes


def split_validation(
    count: int, fraction: float, most: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: ``fraction`` of ``count``, at most ``most``, seeded."""
    size = min(round(count * fraction), most if most is not None else DEFAULT_VALIDATION_MAX)
    size = max(1, min(size, count - 1))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[size:]), np.sort(order[:size])


def limited(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``indices`` (a seeded choice), in order."""
    if limit is None or len(indices) <= limit:
        return indices
    pick = np.random.default_rng(seed + 7).permutation(len(indices))[:limit]
    return np.sort(indices[pick])


# --------------------------------------------------------------------------- CIFAR-10 tensors

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def images_to_tensor(
    images: ImageSet, indices: np.ndarray, size: int | None = None
) -> torch.Tensor:
    """Decode ``indices`` to a ``[N, 3, size, size]`` uint8 tensor (fast path for CIFAR-10).

    ``size`` defaults to the first image's width (CIFAR-10: 32); other sizes are resized.
    """
    if size is None:
        first = images.array[0] if images.array is not None else None
        size = first.shape[0] if first is not None else images.image(indices[0]).size[0]
        size = int(size)
    if images.array is not None and images.array.shape[1:] == (size, size, 3):
        chosen = np.ascontiguousarray(images.array[indices])
        return torch.from_numpy(chosen).permute(0, 3, 1, 2).contiguous()
    out = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    for row, index in enumerate(indices):
        image = images.image(index)
        if image.size != (size, size):
            image = image.resize((size, size))
        out[row] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 CIFAR images to float32 with the CIFAR-10 mean and standard deviation."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((x.float() / 255.0) - mean) / std


def load_unlearning_data(config: DataConfig) -> Any:
    """Class or random forgetting on an image dataset as in-memory tensors (ResNet path).

    Returns the same :class:`~negmerge_cli.train.data.UnlearningData` as digits: the test
    set is the dataset's own test split, validation is carved out of train (see module
    docs), and the random forget set is ``forget_fraction`` of what remains.
    """
    from negmerge_cli.train.data import Split, UnlearningData, random_forget_mask

    assert config.root is not None
    train_set = open_split(config.dataset, config.root, train=True)
    test_set = open_split(config.dataset, config.root, train=False)
    train_all = limited(np.arange(len(train_set)), config.limit, config.split_seed)
    test_index = limited(np.arange(len(test_set)), config.limit, config.split_seed + 1)
    train_pos, val_pos = split_validation(
        len(train_all), config.validation_fraction, config.validation_max, config.split_seed
    )
    train_index, val_index = train_all[train_pos], train_all[val_pos]
    y_train, y_test = train_set.labels, test_set.labels

    def split(images: ImageSet, labels: np.ndarray, index: np.ndarray) -> Split:
        x = normalise(images_to_tensor(images, index)).contiguous()
        return Split(x, torch.from_numpy(labels[index].astype(np.int64)))

    train = split(train_set, y_train, train_index)
    validation = split(train_set, y_train, val_index)
    test = split(test_set, y_test, test_index)

    def take(s: Split, mask: np.ndarray) -> Split:
        m = torch.from_numpy(mask)
        return Split(s.x[m].contiguous(), s.y[m])

    if config.forget_classes:
        classes = np.array(sorted(config.forget_classes))
        in_train = np.isin(train.y.numpy(), classes)
        in_val = np.isin(validation.y.numpy(), classes)
        in_test = np.isin(test.y.numpy(), classes)
        forget, retain = take(train, in_train), take(train, ~in_train)
        val_forget, val_retain = take(validation, in_val), take(validation, ~in_val)
        test_forget, test_retain = take(test, in_test), take(test, ~in_test)
        scenario = "class"
    else:
        assert config.forget_fraction is not None
        chosen = random_forget_mask(len(train), config.forget_fraction, config.split_seed)
        forget, retain = take(train, chosen), take(train, ~chosen)
        val_forget, val_retain = forget, validation
        test_forget, test_retain = take(test, np.zeros(len(test), dtype=bool)), test
        scenario = "random"
    return UnlearningData(
        scenario=scenario, train=train, forget=forget, retain=retain, validation=validation,
        val_forget=val_forget, val_retain=val_retain, test=test, test_forget=test_forget,
        test_retain=test_retain, forget_classes=tuple(sorted(config.forget_classes)),
    )  # fmt: skip
