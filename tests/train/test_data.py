"""Digits splits: disjoint, stratified, deterministic; the forget set is what the recipe says."""

from __future__ import annotations

import torch

from negmerge_cli.recipes import DataConfig
from negmerge_cli.train.data import load_digits_data


def _rows(split) -> set[bytes]:
    return {
        row.numpy().tobytes() + bytes([int(label)])
        for row, label in zip(split.x, split.y, strict=True)
    }


def test_class_forgetting_puts_exactly_the_forgotten_classes_in_the_forget_sets():
    data = load_digits_data(DataConfig(forget_classes=(3, 8)))
    assert set(data.forget.y.tolist()) == {3, 8}
    assert set(data.val_forget.y.tolist()) == {3, 8}
    assert set(data.test_forget.y.tolist()) == {3, 8}
    for split in (data.retain, data.val_retain, data.test_retain):
        assert not ({3, 8} & set(split.y.tolist()))
    assert len(data.forget) + len(data.retain) == len(data.train)
    assert len(data.train) + len(data.validation) + len(data.test) == 1797
    assert len(data.test) == 450  # 25% of 1797, rounded up by scikit-learn
    assert data.forget.x.shape[1:] == (1, 8, 8)
    assert float(data.train.x.min()) >= 0.0 and float(data.train.x.max()) <= 1.0


def test_train_validation_and_test_are_disjoint():
    data = load_digits_data(DataConfig(forget_classes=(0,)))
    # Digits holds a few duplicate images; compare index-free by content and allow those.
    train, val, test = _rows(data.train), _rows(data.validation), _rows(data.test)
    assert len(train & val) + len(train & test) + len(val & test) <= 5


def test_random_forgetting_takes_the_fraction_of_training_data():
    data = load_digits_data(DataConfig(forget_fraction=0.1))
    assert len(data.forget) == round(0.1 * len(data.train))
    assert len(data.forget) + len(data.retain) == len(data.train)
    assert len(set(data.forget.y.tolist())) == 10  # a random 10% covers every class
    assert torch.equal(data.val_forget.x, data.forget.x)
    assert torch.equal(data.test_retain.y, data.test.y)
    assert len(data.test_forget) == 0


def test_splits_depend_only_on_the_split_seed():
    a = load_digits_data(DataConfig(forget_fraction=0.1, split_seed=3))
    b = load_digits_data(DataConfig(forget_fraction=0.1, split_seed=3))
    c = load_digits_data(DataConfig(forget_fraction=0.1, split_seed=4))
    assert torch.equal(a.forget.x, b.forget.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.forget.x, c.forget.x)
