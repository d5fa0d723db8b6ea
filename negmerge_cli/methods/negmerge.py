"""NegMerge: the mean task vector where all task vectors agree in sign, zero elsewhere.

Kim et al., "NegMerge: Sign-Consensual Weight Merging for Machine Unlearning",
ICML 2025, https://arxiv.org/abs/2410.05583
"""

from __future__ import annotations

import math

import torch

from negmerge_cli.methods.common import consensus_mask, ordered_sum


def negmerge(
    taus: torch.Tensor,
    *,
    consensus: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of ``taus`` where every one is strictly positive or every one strictly negative.

    ``consensus`` is ``consensus_mask(taus)`` and ``total`` is ``ordered_sum(taus)`` when
    the caller has them already (the engine forms both while reading).
    """
    mask = consensus_mask(taus) if consensus is None else consensus
    mean = (ordered_sum(taus) if total is None else total) / taus.shape[0]
    # torch.where(mask, mean, 0.0), computed as a product: where's kernel branches per
    # element and costs several times more on the scattered masks of real models. Where
    # the mask holds, mean * 1 is the mean (never -0.0: the values agree in strict sign);
    # elsewhere mean * 0 is +-0.0, and adding +0.0 makes it +0.0. Only an infinite mean
    # (a sum past float32's range) makes the product differ, and then where is used.
    kept = mean * mask
    if math.isfinite(float(kept.sum())):
        return kept.add_(0.0)
    return torch.where(mask, mean, 0.0)
