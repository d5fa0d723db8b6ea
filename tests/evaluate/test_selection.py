"""Lambda selection on hand-made metric tables: the rule, its ties, and nothing passing."""

from __future__ import annotations

import math

from negmerge_cli.evaluate.selection import (
    Curve,
    best_of,
    better,
    retain_threshold,
    select_lambda,
)


def curve(rows: list[tuple[float, float, float]]) -> Curve:
    return Curve(*(tuple(column) for column in zip(*rows, strict=True)))


def test_the_lowest_forget_accuracy_that_keeps_retain_above_the_threshold_wins():
    table = curve([
        (0.0, 0.95, 1.00),
        (0.5, 0.40, 0.97),
        (1.0, 0.10, 0.96),
        (1.5, 0.00, 0.80),  # forgets everything but breaks the constraint
    ])  # fmt: skip
    chosen = select_lambda(table, retain_threshold(1.0, 0.95))
    assert (chosen.index, chosen.lam, chosen.forget, chosen.retain) == (2, 1.0, 0.10, 0.96)
    assert chosen.feasible and chosen.reason == ""


def test_retain_exactly_at_the_threshold_passes():
    threshold = retain_threshold(0.96, 0.95)  # 0.912
    table = curve([(0.0, 0.9, 0.96), (1.0, 0.2, 0.912), (2.0, 0.1, 0.9119)])
    assert select_lambda(table, threshold).lam == 1.0


def test_a_tie_on_forget_goes_to_the_higher_retain_then_to_the_smaller_lambda():
    table = curve([(0.0, 0.9, 1.0), (0.4, 0.0, 0.96), (0.6, 0.0, 0.99), (0.8, 0.0, 0.99)])
    assert select_lambda(table, 0.95).lam == 0.6
    flat = curve([(0.0, 0.9, 1.0), (0.4, 0.0, 0.99), (0.6, 0.0, 0.99)])
    assert select_lambda(flat, 0.95).lam == 0.4


def test_when_no_lambda_meets_the_constraint_the_selection_says_so():
    table = curve([(0.2, 0.5, 0.90), (0.4, 0.1, 0.70)])
    chosen = select_lambda(table, 0.95)
    assert not chosen.feasible
    assert chosen.index is None and chosen.lam is None and math.isinf(chosen.score)
    assert chosen.reason == (
        "no lambda keeps validation retain accuracy >= 0.950; best was 0.900 at lambda 0.2"
    )
    assert chosen.as_dict()["score"] is None  # JSON-safe


def test_match_heldout_picks_forget_accuracy_closest_to_held_out_accuracy():
    table = curve([(0.0, 1.00, 0.97), (0.1, 0.98, 0.97), (0.2, 0.90, 0.96)])
    chosen = select_lambda(table, 0.9, objective="match_heldout")
    assert chosen.lam == 0.1 and abs(chosen.score - 0.01) < 1e-9


def test_feasible_beats_infeasible_and_lower_score_beats_higher():
    good = select_lambda(curve([(1.0, 0.1, 0.97)]), 0.95)
    better_one = select_lambda(curve([(1.0, 0.05, 0.96)]), 0.95)
    same_forget_more_retain = select_lambda(curve([(1.0, 0.1, 0.99)]), 0.95)
    none = select_lambda(curve([(1.0, 0.0, 0.5)]), 0.95)
    assert better(better_one, good) and not better(good, better_one)
    assert better(same_forget_more_retain, good)
    assert better(good, none) and not better(none, good)
    assert not better(good, good)  # greedy keeps a run only on a strict improvement
    assert best_of([none, good, better_one, good]) == 2
    assert best_of([none]) == 0 and best_of([]) is None
