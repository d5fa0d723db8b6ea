"""Accuracy, membership-inference efficacy (as in SalUn) and the gap to a retrained model.

MIA efficacy follows SalUn (Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508,
``evaluation/SVC_MIA.py``): an attacker learns to tell members (retain samples) from
non-members (test samples) by the model's confidence in the true label and the entropy of
its prediction; the efficacy is the share of forget samples it calls non-members. Higher
means the forget set looks less like training data. Here the attacker is a logistic
regression on standardised features, trained on balanced classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

GAP_KEYS = ("retain", "forget", "test", "mia")
"""The four numbers SalUn's average gap is taken over."""


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``predictions`` (class indices or logits) equal to ``labels``; NaN when empty."""
    if labels.numel() == 0:
        return math.nan
    if predictions.dim() == labels.dim() + 1:
        predictions = predictions.argmax(-1)
    return float((predictions == labels).double().mean())


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """The model's logits for ``x`` in eval mode, in batches."""
    model.eval()
    if len(x) == 0:
        return torch.empty(0, 10)
    device = next(model.parameters()).device
    if device == x.device:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    # CPU data, GPU model: move batch by batch and bring the logits back as float32.
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device, non_blocking=True)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def mia_features(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per sample: the softmax probability of the true label and the prediction's entropy."""
    probs = torch.softmax(logits.double(), dim=-1)
    confidence = probs.gather(1, labels.long()[:, None])[:, 0]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return torch.stack([confidence, entropy], dim=1).numpy()


def mia_efficacy(
    members: np.ndarray, non_members: np.ndarray, targets: np.ndarray, seed: int = 0
) -> float:
    """Share of ``targets`` an attacker trained on members vs non-members calls non-members.

    Each argument is an ``[n, features]`` array (see :func:`mia_features`). The larger class
    is subsampled (seeded) so the attacker trains on balanced classes, as SalUn does.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(targets) == 0:
        return math.nan
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("the attacker needs both members and non-members")
    rng = np.random.default_rng(seed)
    count = min(len(members), len(non_members))
    members = members[rng.permutation(len(members))[:count]]
    non_members = non_members[rng.permutation(len(non_members))[:count]]
    features = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(count, dtype=int), np.zeros(count, dtype=int)])
    attacker = make_pipeline(StandardScaler(), LogisticRegression())
    attacker.fit(features, is_member)
    return float(np.mean(attacker.predict(targets) == 0))


def average_gap(
    metrics: Mapping[str, float], reference: Mapping[str, float], keys: Sequence[str] = GAP_KEYS
) -> float:
    """Mean absolute difference to the reference (the retrained model) over ``keys``."""
    gaps = [abs(metrics[k] - reference[k]) for k in keys if k in metrics and k in reference]
    if not gaps or any(math.isnan(g) for g in gaps):
        return math.nan
    return float(sum(gaps) / len(gaps))
