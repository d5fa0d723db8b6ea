"""Uniform merge: the plain mean of the task vectors (the NegMerge paper's "Uniform Merge").

With a single task vector this is task-vector negation (Ilharco et al., "Editing Models
with Task Arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089).
"""

from __future__ import annotations

import torch

from negmerge_cli.methods.common import ordered_sum


def mean(taus: torch.Tensor, *, total: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise mean over the task vectors (summed in input order); ``total`` is
    ``ordered_sum(taus)`` when the caller has it already."""
    return (ordered_sum(taus) if total is None else total) / taus.shape[0]
