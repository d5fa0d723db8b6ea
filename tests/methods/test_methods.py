"""Each merge method against a straightforward float64 reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negmerge_cli.cli.options import METHOD_NAMES
from negmerge_cli.errors import UsageError
from negmerge_cli.methods import (
    METHODS,
    consensus_mask,
    get_method,
    kth_magnitude,
    magmax,
    mean,
    negmerge,
    ties,
)
from negmerge_cli.methods.common import ordered_sum
from negmerge_cli.methods.select import MagnitudeSelector, trim_rank


def ref_negmerge(taus: np.ndarray) -> np.ndarray:
    flat = taus.reshape(taus.shape[0], -1)
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        column = flat[:, j]
        if all(v > 0 for v in column) or all(v < 0 for v in column):
            out[j] = sum(column) / len(column)
    return out.reshape(taus.shape[1:])


def ref_magmax(taus: np.ndarray) -> np.ndarray:
    flat = taus.reshape(taus.shape[0], -1)
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        best = flat[0, j]
        for v in flat[1:, j]:
            if abs(v) >= abs(best):
                best = v
        out[j] = best
    return out.reshape(taus.shape[1:])


def ref_ties(taus: np.ndarray, density: float) -> np.ndarray:
    """The TIES reference implementation's steps, on the flattened task vectors."""
    flat = taus.reshape(taus.shape[0], -1)
    n, d = flat.shape
    k = d - int(d * density)
    trimmed = flat.copy()
    if k > 0:
        for i in range(n):
            kth = np.sort(np.abs(flat[i]))[k - 1]
            trimmed[i] = np.where(np.abs(flat[i]) >= kth, flat[i], 0.0)
    elected = np.sign(trimmed.sum(axis=0))
    elected[elected == 0] = np.sign(elected.sum())
    keep = np.where(elected > 0, trimmed > 0, trimmed < 0)
    counts = np.maximum(keep.sum(axis=0), 1)
    return ((trimmed * keep).sum(axis=0) / counts).reshape(taus.shape[1:])


def random_taus(shape: tuple[int, ...], count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    taus = torch.randn((count, *shape), generator=g)
    taus[torch.rand(taus.shape, generator=g) < 0.1] = 0.0  # exact zeros break consensus
    return taus


SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4)]


def test_registry_lists_every_method_under_the_names_the_cli_shows():
    assert tuple(METHODS) == METHOD_NAMES


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(UsageError, match="negmerge, mean, magmax, ties"):
        get_method("tie")


def test_negmerge_keeps_the_mean_only_where_all_signs_agree_strictly():
    taus = torch.tensor([[1.0, 2.0, -1.0, 0.0, 3.0], [3.0, 4.0, -3.0, 5.0, -1.0]])
    assert negmerge(taus).tolist() == [2.0, 3.0, -2.0, 0.0, 0.0]


def test_a_single_zero_anywhere_breaks_consensus():
    taus = torch.tensor([[0.5], [0.0], [0.5]])
    assert not bool(consensus_mask(taus)[0])
    assert negmerge(taus).item() == 0.0


def test_magmax_takes_the_largest_magnitude_and_the_later_input_on_ties():
    taus = torch.tensor([[2.0, -3.0, 1.0], [-2.0, 3.0, -4.0]])
    assert magmax(taus).tolist() == [-2.0, 3.0, -4.0]


def test_ties_hand_computed_case():
    # density 0.5 of 4 elements: keep |x| >= the 2nd smallest magnitude of each row
    taus = torch.tensor([[4.0, -1.0, 2.0, 0.5], [-3.0, 2.0, 0.1, 1.0]])
    thresholds = torch.tensor([kth_magnitude(t, 0.5) for t in taus])
    assert thresholds.tolist() == [1.0, 1.0]
    # trimmed: [4, -1, 2, 0], [-3, 2, 0, 1]; elected signs +, +, +, +
    merged = ties(taus, thresholds=thresholds, majority_sign=1.0)
    assert merged.tolist() == [4.0, 2.0, 2.0, 1.0]


def test_ties_elected_zero_takes_the_majority_sign():
    taus = torch.tensor([[2.0, 1.0], [-2.0, 1.0]])
    zero = torch.zeros(2)
    assert ties(taus, thresholds=zero, majority_sign=1.0).tolist() == [2.0, 1.0]
    assert ties(taus, thresholds=zero, majority_sign=-1.0).tolist() == [-2.0, 1.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 5])
def test_elementwise_methods_match_the_float64_reference(shape, count):
    taus = random_taus(shape, count, seed=count)
    wide = taus.double().numpy()
    np.testing.assert_allclose(negmerge(taus).numpy(), ref_negmerge(wide), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mean(taus).numpy(), wide.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(magmax(taus).numpy(), ref_magmax(wide).astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_the_reference_implementation(shape, density):
    taus = random_taus(shape, 4, seed=7)
    thresholds = torch.tensor([kth_magnitude(t, density) for t in taus])
    flat = taus.reshape(4, -1)
    votes = torch.sign(
        torch.where(flat.abs() >= thresholds[:, None], flat, torch.tensor(0.0)).sum(0)
    ).sum()
    merged = ties(taus, thresholds=thresholds, majority_sign=float(torch.sign(votes)))
    np.testing.assert_allclose(
        merged.numpy(), ref_ties(taus.double().numpy(), density), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32_match_float64(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, generator=g).to(dtype)
    tunes = [(base.float() + 0.01 * torch.randn(64, generator=g)).to(dtype) for _ in range(12)]
    taus = torch.stack([t.float() - base.float() for t in tunes])
    wide = torch.stack([t.double() - base.double() for t in tunes]).numpy()
    np.testing.assert_allclose(negmerge(taus).numpy(), ref_negmerge(wide), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mean(taus).numpy(), wide.mean(axis=0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_streamed_magnitude_selection_equals_kthvalue_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(1, 3000, (1,), generator=g))
    taus = torch.randn(3, d, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
    taus[:, : d // 4] = 0.0
    if seed % 2:
        taus = taus.round()  # many equal magnitudes
    density = float(torch.rand(1, generator=g))
    selector = MagnitudeSelector([trim_rank(d, density)] * 3)
    chunks = [taus[:, i : i + 257] for i in range(0, d, 257)]
    for chunk in chunks:
        selector.coarse(chunk)
    selector.end_coarse()
    for chunk in chunks:
        selector.fine(chunk)
    expected = torch.tensor([kth_magnitude(t, density) for t in taus])
    assert torch.equal(selector.thresholds(), expected)


def test_negmerge_equals_where_bit_for_bit_with_zeros_and_a_sum_past_float32():
    """The product form must give torch.where's bits: +0.0 where consensus fails (also under
    a negative mean), the smallest subnormal mean kept, and where's result when a sum
    overflows to infinity with or without consensus."""
    big = 3e38
    tiny = 2.0**-149
    taus = torch.tensor(
        [
            [-1.0, 2.0, -tiny, big, big],
            [-3.0, -7.0, -tiny, big, big],
            [-2.0, 2.0, -tiny, big, -1.0],
        ],
        dtype=torch.float32,
    )

    def reference(values: torch.Tensor) -> torch.Tensor:
        return torch.where(consensus_mask(values), ordered_sum(values) / 3, 0.0)

    for values in (taus[:, :3], taus):  # finite sums (the product), then sums past float32
        for given in ({}, {"consensus": consensus_mask(values), "total": ordered_sum(values)}):
            got = negmerge(values, **given)
            assert torch.equal(got, reference(values))
            assert torch.equal(torch.signbit(got), torch.signbit(reference(values)))
    got = negmerge(taus)
    assert got[0] == -2.0 and got[1] == 0.0 and not torch.signbit(got[1])
    assert got[2] == -tiny and torch.isinf(got[3]) and got[4] == 0.0
