"""MagMax: per element, the task vector entry of largest magnitude.

Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024, https://arxiv.org/abs/2407.06322
"""

from __future__ import annotations

import torch


def magmax(taus: torch.Tensor) -> torch.Tensor:
    """Entry of largest ``|tau_i|``; on a tie the later task vector wins."""
    best, best_abs = taus[0], taus[0].abs()
    for tau in taus[1:]:
        size = tau.abs()
        best = torch.where(size >= best_abs, tau, best)
        torch.maximum(best_abs, size, out=best_abs)
    return best
