"""The merge methods, one pure function each, in one registry.

A method maps the stacked float32 task vectors ``taus`` (shape ``[N, ...]``,
``tau_i = ft_i - base``) to one merged task vector of shape ``[...]``; the engine then
writes ``base - lambda * merged``. Methods never read or write files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from negmerge_cli.errors import UsageError
from negmerge_cli.methods.common import consensus_mask, elected_sign, kth_magnitude, trim
from negmerge_cli.methods.magmax import magmax
from negmerge_cli.methods.mean import mean
from negmerge_cli.methods.negmerge import negmerge
from negmerge_cli.methods.ties import majority_contribution, ties


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, a one-line summary and where it comes from."""

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    paper: str
    trims: bool = False
    """True when the method needs per-task-vector magnitude thresholds (TIES)."""
    precomputed: frozenset[str] = frozenset()
    """Keyword arguments the method accepts precomputed by the engine, which forms them
    while the task vectors are in cache: ``consensus`` (``consensus_mask(taus)``) and
    ``total`` (``ordered_sum(taus)``)."""


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "negmerge",
            negmerge,
            "mean where all task vectors agree in sign, 0 elsewhere",
            "https://arxiv.org/abs/2410.05583",
            precomputed=frozenset({"consensus", "total"}),
        ),
        MergeMethod(
            "mean",
            mean,
            "uniform mean of the task vectors (one input: task-vector negation)",
            "https://arxiv.org/abs/2212.04089",
            precomputed=frozenset({"total"}),
        ),
        MergeMethod(
            "magmax",
            magmax,
            "per element the entry of largest magnitude",
            "https://arxiv.org/abs/2407.06322",
        ),
        MergeMethod(
            "ties",
            ties,
            "trim to top density, elect sign, disjoint mean",
            "https://arxiv.org/abs/2306.01708",
            trims=True,
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(
            f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}"
        ) from None


__all__ = [
    "METHODS",
    "MergeMethod",
    "consensus_mask",
    "elected_sign",
    "get_method",
    "kth_magnitude",
    "magmax",
    "majority_contribution",
    "mean",
    "negmerge",
    "ties",
    "trim",
]
