"""Uniform merge: the plain mean of the task vectors (the NegMerge paper's "Uniform Merge").

With a single task vector this is task-vector negation (Ilharco et al., "Editing Models
with Task Arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089).
"""

from __future__ import annotations

import torch

from negmerge_cli.methods.common import ordered_mean


def mean(taus: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over the task vectors (summed in input order)."""
    return ordered_mean(taus)
