"""Choosing lambda from validation curves, and comparing choices.

The rule (the paper's): among the lambdas whose validation retain accuracy stays at or
above ``retain_ratio`` times the pre-trained model's, take the one with the lowest
validation forget accuracy; on a tie, the higher retain accuracy, then the smaller lambda
(the smaller edit). With ``objective="match_heldout"`` (random forgetting) the score is
instead how far forget accuracy is from the model's own held-out accuracy: a model that
never saw the forget set should do on it what it does on unseen data. When no lambda
meets the constraint the selection says so instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Accuracies are shares of a few hundred samples; compare with a little slack so that a
# float32/float64 rounding difference cannot flip a choice.
EPSILON = 1e-9


@dataclass(frozen=True)
class Curve:
    """Validation accuracies on the forget and retain sets at each lambda."""

    lambdas: tuple[float, ...]
    forget: tuple[float, ...]
    retain: tuple[float, ...]

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "lambda": list(self.lambdas),
            "forget": list(self.forget),
            "retain": list(self.retain),
        }


@dataclass(frozen=True)
class Selection:
    """The chosen lambda of one curve (``index`` None when nothing met the constraint)."""

    index: int | None
    lam: float | None
    forget: float | None
    retain: float | None
    score: float
    threshold: float
    reason: str = ""

    @property
    def feasible(self) -> bool:
        return self.index is not None

    def key(self) -> tuple[int, float, float]:
        """Sort key, lower is better: feasible first, then score, then higher retain."""
        if self.index is None:
            return (1, math.inf, 0.0)
        assert self.retain is not None
        return (0, round(self.score, 12), -round(self.retain, 12))

    def as_dict(self) -> dict[str, object]:
        return {
            "lambda": self.lam,
            "index": self.index,
            "val_forget": self.forget,
            "val_retain": self.retain,
            "score": None if math.isinf(self.score) else self.score,
            "threshold": self.threshold,
            "feasible": self.feasible,
            "reason": self.reason,
        }


def retain_threshold(reference_retain: float, retain_ratio: float) -> float:
    """The validation retain accuracy a lambda must keep: ratio x the pre-trained model's."""
    return retain_ratio * reference_retain


def score(forget: float, retain: float, objective: str = "min_forget") -> float:
    """Lower is better: forget accuracy, or its distance to held-out (retain) accuracy."""
    if objective == "min_forget":
        return forget
    if objective == "match_heldout":
        return abs(forget - retain)
    raise ValueError(f"unknown objective {objective!r}")


def select_lambda(curve: Curve, threshold: float, objective: str = "min_forget") -> Selection:
    """Pick the best lambda of ``curve`` under ``retain >= threshold`` (see module doc)."""
    best: tuple[float, float, float, int] | None = None
    for i, (lam, forget, retain) in enumerate(
        zip(curve.lambdas, curve.forget, curve.retain, strict=True)
    ):
        if math.isnan(retain) or retain < threshold - EPSILON:
            continue
        key = (round(score(forget, retain, objective), 12), -round(retain, 12), abs(lam), i)
        if best is None or key < best:
            best = key
    if best is None:
        top = max(range(len(curve.lambdas)), key=lambda i: curve.retain[i], default=None)
        detail = (
            f"; best was {curve.retain[top]:.3f} at lambda {curve.lambdas[top]:g}"
            if top is not None
            else ""
        )
        return Selection(
            None, None, None, None, math.inf, threshold,
            f"no lambda keeps validation retain accuracy >= {threshold:.3f}{detail}",
        )  # fmt: skip
    i = best[-1]
    return Selection(
        i, curve.lambdas[i], curve.forget[i], curve.retain[i], best[0], threshold,
    )  # fmt: skip


def better(candidate: Selection, current: Selection) -> bool:
    """True when ``candidate`` is strictly better than ``current`` (used by greedy)."""
    return candidate.key() < current.key()


def best_of(selections: Sequence[Selection]) -> int | None:
    """Index of the best selection (the first on a tie); None for an empty list."""
    if not selections:
        return None
    return min(range(len(selections)), key=lambda i: selections[i].key())
