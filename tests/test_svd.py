"""Truncated SVD: planted rank, exactness at full rank, determinism, the predicted error curve."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.factorize.svd import TruncatedSVD, spectrum_of


def planted(groups: int, out_dim: int, in_dim: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((groups, out_dim, rank)) @ rng.standard_normal((groups, rank, in_dim))


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    out_dim=st.integers(1, 24),
    in_dim=st.integers(1, 24),
    data=st.data(),
)
def test_planted_rank_is_exact(groups, out_dim, in_dim, data):
    rank = data.draw(st.integers(1, min(out_dim, in_dim)))
    matrices = planted(groups, out_dim, in_dim, rank, seed=data.draw(st.integers(0, 1000)))
    svd = TruncatedSVD(matrices)
    factors = svd.factorize(rank)
    assert factors.first.shape == (groups, rank, in_dim)
    assert factors.second.shape == (groups, out_dim, rank)
    np.testing.assert_allclose(factors.reconstruct(), matrices, atol=1e-9 * max(1.0, np.abs(matrices).max()))
    assert factors.predicted_error < 1e-20
    assert factors.params == groups * rank * (out_dim + in_dim)


def test_full_rank_reproduces_any_matrix():
    matrices = np.random.default_rng(1).standard_normal((2, 7, 5))
    factors = TruncatedSVD(matrices).factorize(5)
    np.testing.assert_allclose(factors.reconstruct(), matrices, atol=1e-12)


def test_predicted_error_is_the_relative_dropped_energy():
    matrices = np.random.default_rng(2).standard_normal((3, 10, 8))
    svd = TruncatedSVD(matrices)
    for rank in range(1, 9):
        factors = svd.factorize(rank)
        measured = np.sum((factors.reconstruct() - matrices) ** 2) / np.sum(matrices**2)
        assert factors.predicted_error == pytest.approx(measured, rel=1e-9, abs=1e-15)
    assert svd.spectrum.dropped[0] == pytest.approx(1.0)
    assert svd.spectrum.dropped[-1] == pytest.approx(0.0, abs=1e-15)
    assert np.all(np.diff(svd.spectrum.dropped) <= 1e-15)


def test_deterministic_and_sign_fixed():
    matrices = np.random.default_rng(3).standard_normal((1, 12, 9))
    a, b = TruncatedSVD(matrices).factorize(4), TruncatedSVD(matrices.copy()).factorize(4)
    np.testing.assert_array_equal(a.first, b.first)
    np.testing.assert_array_equal(a.second, b.second)
    # flipping the sign of the input flips the right factor only: the convention pins the left one
    c = TruncatedSVD(-matrices).factorize(4)
    np.testing.assert_allclose(c.second, a.second, atol=1e-12)
    np.testing.assert_allclose(c.first, -a.first, atol=1e-12)


def test_factors_are_balanced():
    """Singular values split evenly: both factors have the same column/row norms (keeps fp16 in range)."""
    matrices = 1e3 * np.random.default_rng(4).standard_normal((1, 20, 30))
    factors = TruncatedSVD(matrices).factorize(6)
    np.testing.assert_allclose(
        np.linalg.norm(factors.first, axis=2), np.linalg.norm(factors.second, axis=1), rtol=1e-10
    )


def test_zero_weight_has_zero_error():
    spectrum = spectrum_of(np.zeros((1, 4, 4)))
    assert np.all(spectrum.dropped == 0)
    assert spectrum.effective_rank == 0.0
    assert spectrum.rank_for_energy(0.99) == 0


def test_rank_for_energy_and_effective_rank():
    matrices = np.diag([3.0, 2.0, 1.0, 0.0])[None]
    spectrum = spectrum_of(matrices)
    assert spectrum.rank_for_energy(9 / 14) == 1
    assert spectrum.rank_for_energy(13 / 14) == 2
    assert spectrum.rank_for_energy(1.0) == 3
    assert spectrum_of(np.eye(5)[None]).effective_rank == pytest.approx(5.0)


def test_rank_out_of_range_is_refused():
    svd = TruncatedSVD(np.ones((1, 3, 4)))
    with pytest.raises(ValueError):
        svd.factorize(0)
    with pytest.raises(ValueError):
        svd.factorize(4)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.integers(1, 2),
    out_dim=st.integers(2, 40),
    in_dim=st.integers(2, 40),
    decay=st.sampled_from([0.3, 1.0, 3.0, 10.0]),  # singular values 10^(-decay * i / k), distinct: the
    # last well below sqrt(eps) of the first, where squaring the matrix loses them
    data=st.data(),
)
def test_leading_components_match_the_full_svd(groups, out_dim, in_dim, decay, data):
    """The partial decomposition (top eigenpairs of the Gram matrix) offers the same leading ranks as
    the full SVD: the same predicted errors, and factors that multiply back to the same matrices."""
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    full_rank = min(out_dim, in_dim)
    u = np.linalg.qr(rng.standard_normal((groups, out_dim, full_rank)))[0]
    v = np.linalg.qr(rng.standard_normal((groups, in_dim, full_rank)))[0]
    sigma = 10.0 ** (-decay * np.arange(full_rank) / full_rank)
    matrices = (u * sigma[None, None, :]) @ np.swapaxes(v, 1, 2)
    ranks = data.draw(st.integers(1, max(full_rank - 1, 1)))
    full, partial = TruncatedSVD(matrices), TruncatedSVD(matrices, ranks=ranks)
    assert len(partial.options()) == min(ranks, full_rank)
    np.testing.assert_allclose(partial.spectrum.dropped[: ranks + 1], full.spectrum.dropped[: ranks + 1], atol=1e-12)
    for rank in sorted({1, ranks}):
        expected, got = full.factorize(rank).reconstruct(), partial.factorize(rank).reconstruct()
        np.testing.assert_allclose(got, expected, atol=1e-8)  # below sqrt(eps) of the first, the Gram matrix loses them (1.2e-9 seen)


def test_partial_svd_of_a_large_layer_is_used_only_for_the_rank_search():
    """methods.py asks for the shrinking ranks only when the search will choose (eager) and both sides
    are at least PARTIAL_MIN_SIDE; explicit ranks and energies see the whole spectrum."""
    from onnx_lowrank.factorize import registry as methods
    from onnx_lowrank.factorize import svd

    rng = np.random.default_rng(0)
    side = svd.PARTIAL_MIN_SIDE
    matrices = rng.standard_normal((1, side, side + 8))
    from test_ranks import make_unit

    unit = make_unit("big", matrices)
    searched = methods._decomposers(unit, "svd", None, "input", eager=True).primary
    explicit = methods._decomposers(unit, "svd", None, "input", eager=False).primary
    assert len(searched.options()) == unit.break_even
    assert len(explicit.options()) == side
    np.testing.assert_allclose(searched.spectrum.dropped[: unit.break_even + 1],
                               explicit.spectrum.dropped[: unit.break_even + 1], atol=1e-12)
