"""NegMerge: the mean task vector where all task vectors agree in sign, zero elsewhere.

Kim et al., "NegMerge: Sign-Consensual Weight Merging for Machine Unlearning",
ICML 2025, https://arxiv.org/abs/2410.05583
"""

from __future__ import annotations

import torch

from negmerge_cli.methods.common import consensus_mask, ordered_mean


def negmerge(taus: torch.Tensor) -> torch.Tensor:
    """Mean of ``taus`` where every one is strictly positive or every one strictly negative."""
    return torch.where(consensus_mask(taus), ordered_mean(taus), 0.0)
