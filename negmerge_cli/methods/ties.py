"""TIES-merging: trim, elect sign, disjoint mean.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708. Follows the reference implementation: the elected sign
is the sign of the sum of the trimmed vectors, and an elected zero takes the majority sign
(the sign of the sum of all elected signs over the trimming scope).
"""

from __future__ import annotations

import torch

from negmerge_cli.methods.common import elected_sign, trim


def ties(taus: torch.Tensor, *, thresholds: torch.Tensor, majority_sign: float) -> torch.Tensor:
    """Disjoint mean of the trimmed entries that agree with the elected sign.

    ``thresholds[i]`` is task vector ``i``'s magnitude cut (see ``kth_magnitude``) and
    ``majority_sign`` the sign given to elements whose elected sign is zero; both depend on
    the whole trimming scope, so the engine computes them before calling this.
    """
    trimmed = trim(taus, thresholds)
    sign = elected_sign(trimmed)
    positive = torch.where(sign == 0, majority_sign > 0, sign > 0)
    # Row by row (contiguous passes, in input order) rather than reductions over dim 0.
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for row in trimmed:
        agree = torch.where(positive, row > 0, row < 0)
        total += torch.where(agree, row, 0.0)
        count += agree
    return total / count.clamp(min=1)


def majority_contribution(taus: torch.Tensor, thresholds: torch.Tensor) -> int:
    """The sum of elected signs over these elements: summed over the scope, its sign is the
    majority sign."""
    return int(elected_sign(trim(taus, thresholds)).sum(dtype=torch.float64).item())
