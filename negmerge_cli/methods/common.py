"""Helpers shared by the merge methods: sign consensus, magnitude trimming, elected signs.

Every function here takes the stacked task vectors ``taus`` of shape ``[N, ...]`` in
float32 and is pure: no I/O, no in-place writes to its inputs.
"""

from __future__ import annotations

import torch


def ordered_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0, adding ``values[0], values[1], ...`` in order.

    ``torch.sum(dim=0)`` picks its reduction order by tensor size, so the same elements
    summed in chunks of another size can differ in the last bit; this order does not
    depend on the chunking, which keeps merges reproducible across memory budgets and
    workers.
    """
    total = values[0].clone()
    for row in values[1:]:
        total += row
    return total


def consensus_mask(taus: torch.Tensor) -> torch.Tensor:
    """True where every task vector has the same strict sign (a zero breaks consensus)."""
    low, high = torch.aminmax(taus, dim=0)
    return (low > 0) | (high < 0)


def kth_magnitude(values: torch.Tensor, density: float) -> float:
    """The magnitude threshold TIES trims at, computed in memory (the reference's way).

    With ``d`` elements and ``k = int(d * density)``, elements with ``|x| >=`` the
    ``(d - k)``-th smallest magnitude are kept. When ``d - k`` is 0 everything is kept.
    """
    flat = values.reshape(-1).abs()
    rank = flat.numel() - int(flat.numel() * density)
    if rank <= 0:
        return 0.0
    return float(flat.kthvalue(rank).values)


def trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of task vector ``i`` whose magnitude is below ``thresholds[i]``."""
    limits = thresholds.to(taus.device, torch.float32).reshape(-1, *([1] * (taus.dim() - 1)))
    return torch.where(taus.abs() >= limits, taus, 0.0)


def elected_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Per element, the sign of the sum of the trimmed task vectors (0 where it is 0)."""
    return torch.sign(ordered_sum(trimmed))
