"""scikit-learn's digits, split into what to forget, what to retain, validation and test.

The digits data ships inside scikit-learn (1797 8x8 images, 10 classes), so the demo runs
anywhere without a download. The splits depend only on ``data.split_seed``: every seed of a
recipe sees the same forget set, so seeds measure the spread of training, not of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from negmerge_cli.errors import ConfigError
from negmerge_cli.recipes import DataConfig


@dataclass(frozen=True)
class Split:
    """Images ``x`` (float32, ``[N, 1, 8, 8]``, pixels in [0, 1]) and labels ``y`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class UnlearningData:
    """Every set the pipeline trains or evaluates on.

    ``train`` = ``forget`` + ``retain`` (what the original model saw). ``val_forget`` and
    ``val_retain`` choose lambda and runs: for class forgetting they are the validation
    images of the forgotten and kept classes; for random forgetting there is no held-out
    copy of a forgotten sample, so ``val_forget`` is the forget set itself and
    ``val_retain`` the whole validation split. ``test_forget`` / ``test_retain`` are the
    test images of the forgotten / kept classes (class forgetting; for random forgetting
    ``test_retain`` is the whole test set and ``test_forget`` is empty).
    """

    scenario: str
    train: Split
    forget: Split
    retain: Split
    validation: Split
    val_forget: Split
    val_retain: Split
    test: Split
    test_forget: Split
    test_retain: Split
    forget_classes: tuple[int, ...]


def random_forget_mask(count: int, fraction: float, seed: int) -> np.ndarray:
    """The training samples to forget in random forgetting: ``round(count * fraction)`` of
    them (at least one), drawn with ``seed`` so that every run forgets the same ones."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(count, dtype=bool)
    chosen[rng.permutation(count)[: max(1, round(count * fraction))]] = True
    return chosen


def _split(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> Split:
    images = torch.from_numpy(x[index].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Split(images.contiguous(), torch.from_numpy(y[index].astype(np.int64)))


def load_data(config: DataConfig) -> UnlearningData:
    """The recipe's data as in-memory tensors: digits, or an image dataset from disk."""
    if config.dataset == "digits":
        return load_digits_data(config)
    from negmerge_cli.train.vision import load_unlearning_data

    return load_unlearning_data(config)


def load_digits_data(config: DataConfig) -> UnlearningData:
    """Load digits and split it as ``config`` says (deterministic in ``split_seed``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if config.dataset != "digits":
        raise ConfigError(f"data.dataset: unsupported dataset {config.dataset!r}")
    bunch = load_digits()
    x, y = np.asarray(bunch.data), np.asarray(bunch.target)
    everything = np.arange(len(y))
    rest, test_index = train_test_split(
        everything, test_size=config.test_fraction, random_state=config.split_seed, stratify=y
    )
    val_share = config.validation_fraction / (1.0 - config.test_fraction)
    train_index, val_index = train_test_split(
        rest, test_size=val_share, random_state=config.split_seed + 1, stratify=y[rest]
    )
    train_index, val_index, test_index = (np.sort(i) for i in (train_index, val_index, test_index))

    if config.forget_classes:
        classes = np.array(sorted(config.forget_classes))
        in_forget = np.isin(y[train_index], classes)
        forget_index, retain_index = train_index[in_forget], train_index[~in_forget]
        val_in = np.isin(y[val_index], classes)
        test_in = np.isin(y[test_index], classes)
        val_forget, val_retain = _split(x, y, val_index[val_in]), _split(x, y, val_index[~val_in])
        test_forget = _split(x, y, test_index[test_in])
        test_retain = _split(x, y, test_index[~test_in])
        scenario = "class"
    else:
        assert config.forget_fraction is not None
        chosen = random_forget_mask(len(train_index), config.forget_fraction, config.split_seed)
        forget_index, retain_index = train_index[chosen], train_index[~chosen]
        val_forget = _split(x, y, forget_index)
        val_retain = _split(x, y, val_index)
        test_forget = _split(x, y, test_index[:0])
        test_retain = _split(x, y, test_index)
        scenario = "random"
    return UnlearningData(
        scenario=scenario,
        train=_split(x, y, train_index),
        forget=_split(x, y, forget_index),
        retain=_split(x, y, retain_index),
        validation=_split(x, y, val_index),
        val_forget=val_forget,
        val_retain=val_retain,
        test=_split(x, y, test_index),
        test_forget=test_forget,
        test_retain=test_retain,
        forget_classes=tuple(sorted(config.forget_classes)),
    )
