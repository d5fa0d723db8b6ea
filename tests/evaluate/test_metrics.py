"""Each metric on cases small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from negmerge_cli.evaluate.metrics import (
    accuracy,
    average_gap,
    mia_efficacy,
    mia_features,
    predict_logits,
)


def test_accuracy_of_class_indices_and_of_logits():
    labels = torch.tensor([0, 1, 2, 3])
    assert accuracy(torch.tensor([0, 1, 0, 0]), labels) == 0.5
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [5.0, 0, 0, 0]])
    assert accuracy(logits, labels) == 0.75
    assert math.isnan(accuracy(torch.empty(0), torch.empty(0, dtype=torch.long)))


def test_mia_features_are_true_label_confidence_and_entropy():
    uniform = torch.zeros(1, 10)
    confident = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    feats = mia_features(uniform, torch.tensor([4]))
    assert feats[0, 0] == pytest.approx(0.1)
    assert feats[0, 1] == pytest.approx(math.log(10))
    feats = mia_features(confident, torch.tensor([1]))
    assert feats[0, 0] == pytest.approx(0.75)
    assert feats[0, 1] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_mia_efficacy_is_the_share_of_targets_called_non_members():
    # Members are confident with low entropy, non-members the opposite: separable.
    members = np.array([[0.99, 0.05], [0.98, 0.08], [0.97, 0.1], [0.99, 0.04]])
    non_members = np.array([[0.4, 1.5], [0.5, 1.2], [0.3, 1.8], [0.45, 1.4]])
    like_members = np.array([[0.985, 0.06], [0.99, 0.05]])
    like_non_members = np.array([[0.35, 1.6], [0.42, 1.3], [0.5, 1.1]])
    assert mia_efficacy(members, non_members, like_members) == 0.0
    assert mia_efficacy(members, non_members, like_non_members) == 1.0
    mixed = np.concatenate([like_members, like_non_members])  # 3 of 5 look unseen
    assert mia_efficacy(members, non_members, mixed) == pytest.approx(0.6)


def test_mia_efficacy_balances_the_attackers_classes():
    # 100 members against 4 non-members: without balancing, everything would be "member".
    rng = np.random.default_rng(0)
    members = np.column_stack([rng.uniform(0.95, 1.0, 100), rng.uniform(0.0, 0.2, 100)])
    non_members = np.array([[0.4, 1.5], [0.5, 1.2], [0.3, 1.8], [0.45, 1.4]])
    targets = np.array([[0.4, 1.4], [0.35, 1.6]])
    assert mia_efficacy(members, non_members, targets) == 1.0
    assert math.isnan(mia_efficacy(members, non_members, np.empty((0, 2))))


def test_average_gap_is_the_mean_absolute_difference_over_the_four_numbers():
    method = {"retain": 0.90, "forget": 0.80, "test": 0.85, "mia": 0.30, "lambda": 9.0}
    retrained = {"retain": 1.00, "forget": 0.90, "test": 0.95, "mia": 0.10}
    assert average_gap(method, retrained) == pytest.approx((0.1 + 0.1 + 0.1 + 0.2) / 4)
    assert average_gap(retrained, retrained) == 0.0
    assert math.isnan(average_gap({**method, "mia": math.nan}, retrained))


def test_predict_logits_runs_in_eval_mode_in_batches():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(64, 10))
    model.train()
    x = torch.rand(5, 1, 8, 8)
    a = predict_logits(model, x, batch_size=2)
    b = predict_logits(model, x, batch_size=5)
    assert a.shape == (5, 10) and torch.allclose(a, b)  # dropout off: deterministic
    assert not model.training
