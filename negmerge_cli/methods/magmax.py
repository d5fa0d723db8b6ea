"""MagMax: per element, the task vector entry of largest magnitude.

Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024, https://arxiv.org/abs/2407.06322
"""

from __future__ import annotations

import torch


def magmax(taus: torch.Tensor) -> torch.Tensor:
    """Entry of largest ``|tau_i|``; on a tie the later task vector wins."""
    best = taus[0]
    for tau in taus[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best
