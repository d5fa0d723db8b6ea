"""Exact k-th smallest magnitude of each task vector, streamed with bounded memory.

TIES trims each task vector at the magnitude of rank ``d - int(d * density)`` over all its
merged elements (the whole model, in the reference). Sorting a 7B-element vector is not an
option, so this is a two-pass radix select on the float32 bit patterns, whose order equals
the order of non-negative floats: pass one counts the high 16 bits, pass two the low 16
bits inside the bin that holds the rank. Memory: three counters of 64K entries per task
vector, whatever the model's size. The result equals ``torch.kthvalue`` exactly.
"""

from __future__ import annotations

import torch

_BINS = 1 << 16


def trim_rank(numel: int, density: float) -> int:
    """1-based rank of the threshold magnitude; 0 means "keep everything"."""
    return numel - int(numel * density)


def _magnitude_bits(taus: torch.Tensor) -> torch.Tensor:
    return taus.abs().to(torch.float32).reshape(taus.shape[0], -1).view(torch.int32)


class MagnitudeSelector:
    """Feed every chunk of the task vectors to ``coarse``, then again to ``fine``."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks
        self._coarse = torch.zeros((len(ranks), _BINS), dtype=torch.int64)
        self._fine = torch.zeros((len(ranks), _BINS), dtype=torch.int64)
        self._bin: list[int] = []
        self._below: list[int] = []

    def partial(self) -> MagnitudeSelector:
        """An empty copy that knows the ranks and the chosen bins: a worker fills it with its
        share of the elements and the driver ``absorb``s the counts."""
        copy = MagnitudeSelector(self.ranks)
        copy._bin, copy._below = list(self._bin), list(self._below)
        return copy

    def absorb(self, other: MagnitudeSelector) -> None:
        """Add another selector's counts (from the same pass) to these."""
        self._coarse += other._coarse
        self._fine += other._fine

    @property
    def needed(self) -> bool:
        """False when every rank is 0: no pass over the data is needed."""
        return any(self.ranks)

    def coarse(self, taus: torch.Tensor) -> None:
        high = (_magnitude_bits(taus) >> 16).cpu()
        for i in range(len(self.ranks)):
            self._coarse[i] += torch.bincount(high[i], minlength=_BINS)

    def end_coarse(self) -> None:
        self._bin, self._below = [], []
        for i, rank in enumerate(self.ranks):
            cumulative = self._coarse[i].cumsum(0)
            index = int(torch.searchsorted(cumulative, max(rank, 1)))
            self._bin.append(index)
            self._below.append(int(cumulative[index - 1]) if index > 0 else 0)

    def fine(self, taus: torch.Tensor) -> None:
        bits = _magnitude_bits(taus).cpu()
        for i in range(len(self.ranks)):
            row = bits[i]
            low = row[(row >> 16) == self._bin[i]] & 0xFFFF
            self._fine[i] += torch.bincount(low, minlength=_BINS)

    def thresholds(self) -> torch.Tensor:
        """Per task vector the magnitude at its rank (0.0 where the rank is 0)."""
        values = []
        for i, rank in enumerate(self.ranks):
            if rank == 0:
                values.append(0)
                continue
            cumulative = self._fine[i].cumsum(0) + self._below[i]
            low = int(torch.searchsorted(cumulative, rank))
            values.append((self._bin[i] << 16) | low)
        return torch.tensor(values, dtype=torch.int32).view(torch.float32)
