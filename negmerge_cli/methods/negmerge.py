"""NegMerge: the mean task vector where all task vectors agree in sign, zero elsewhere.

Kim et al., "NegMerge: Sign-Consensual Weight Merging for Machine Unlearning",
ICML 2025, https://arxiv.org/abs/2410.05583
"""

from __future__ import annotations

import torch

from negmerge_cli.methods.common import consensus_mask, ordered_mean


def negmerge(taus: torch.Tensor, *, consensus: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``taus`` where every one is strictly positive or every one strictly negative.

    ``consensus`` is ``consensus_mask(taus)`` when the caller has it already (the engine
    computes it while reading, for its statistics).
    """
    mask = consensus_mask(taus) if consensus is None else consensus
    return torch.where(mask, ordered_mean(taus), 0.0)
