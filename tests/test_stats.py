"""negkd.stats: bootstrap, sign-flip test, Holm, kappa and overlap against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from negkd.stats import cohen_kappa, hierarchical_bootstrap, holm, mean_std, overlap, sign_flip_test


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02, None, 0.04]) == pytest.approx([0.04, None, 0.04])  # None is not in the family
    assert holm([0.3]) == [0.3] and holm([]) == []


def test_kappa_and_overlap_on_hand_made_sets():
    a = np.array([1, 1, 1, 0], bool)
    b = np.array([1, 1, 0, 0], bool)
    # p_o = 3/4, pA = 3/4, pB = 1/2, p_e = 3/8 + 1/8 = 1/2 -> kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert cohen_kappa(a, b) == pytest.approx(0.5)
    o = overlap(a, b)
    assert (o["shared"], o["only_a"], o["only_b"], o["neither"], o["n"]) == (2, 1, 0, 1, 4)
    assert o["expected_shared"] == pytest.approx(4 * 0.75 * 0.5)
    assert o["observed_over_expected"] == pytest.approx(2 / 1.5)
    # independent-looking solves: kappa 0, observed = expected
    x, y = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    assert cohen_kappa(x, y) == pytest.approx(0.0) and overlap(x, y)["observed_over_expected"] == pytest.approx(1.0)
    assert cohen_kappa(x, ~x) == pytest.approx(-1.0) and cohen_kappa(x, x) == pytest.approx(1.0)
    ones = np.ones(4, bool)
    assert cohen_kappa(ones, ones) is None  # chance agreement is 1: kappa undefined
    assert overlap(~ones, ~ones)["observed_over_expected"] is None


def test_sign_flip_exact_and_monte_carlo():
    assert sign_flip_test(np.zeros(10))[0] == 1.0  # no difference at all
    # 3 problems all +1: of 8 sign patterns only ++ + and --- reach |sum| = 3
    assert sign_flip_test(np.array([1.0, 1.0, 1.0, 0.0]))[0] == pytest.approx(2 / 8)
    assert sign_flip_test(np.array([1.0, -1.0]))[0] == pytest.approx(1.0)
    # 60 problems all better: no random flip reaches it -> the smallest Monte Carlo p
    p = sign_flip_test(np.ones(60), n_perm=999, seed=3)[0]
    assert p == pytest.approx(1 / 1000)
    # several metrics at once, deterministic for a seed
    d = np.random.default_rng(0).normal(0.05, 1.0, size=(200, 3))
    assert np.array_equal(sign_flip_test(d, 2000, seed=1), sign_flip_test(d, 2000, seed=1))


def test_bootstrap_identical_and_shifted():
    rng = np.random.default_rng(0)
    x = (rng.random((2, 300)) < 0.5).astype(float)
    r = hierarchical_bootstrap(x, x.copy(), n_boot=500)
    assert r["diff"][0] == 0.0 and r["lo"][0] == 0.0 and r["hi"][0] == 0.0
    y = x.copy()
    y[:, :60] = 0.0
    x[:, :60] = 1.0  # x solves 60 more problems of 300 in both seeds: +0.2
    r = hierarchical_bootstrap(x, y, n_boot=2000, seed=1)
    assert r["diff"][0] == pytest.approx(0.2, abs=1e-12) and 0.0 < r["lo"][0] < 0.2 < r["hi"][0]
    r2 = hierarchical_bootstrap(x, y, n_boot=2000, seed=1)
    assert np.array_equal(r["boot"], r2["boot"])  # seeded: deterministic


def test_bootstrap_spread_matches_the_standard_error():
    """One seed: the replicates' std is the standard error of the mean paired difference."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(1, 400))
    y = rng.normal(0.0, 1.0, size=(1, 400))
    r = hierarchical_bootstrap(x, y, n_boot=4000, seed=0)
    se = (x - y)[0].std(ddof=1) / np.sqrt(400)
    assert r["boot"][:, 0].std() == pytest.approx(se, rel=0.08)


def test_seed_noise_widens_the_interval():
    """Two seeds that disagree by a constant offset: resampling seeds must widen the CI beyond
    what resampling problems of the seed-averaged scores gives."""
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 0.2, size=400)
    x = np.stack([base + 0.3, base - 0.3])  # (2, 400): seed-to-seed offset of 0.6
    y = np.zeros((2, 400))
    wide = hierarchical_bootstrap(x, y, n_boot=2000, seed=0)
    narrow = hierarchical_bootstrap(x.mean(axis=0, keepdims=True), y[:1], n_boot=2000, seed=0)
    assert wide["hi"][0] - wide["lo"][0] > 3 * (narrow["hi"][0] - narrow["lo"][0])
    m, s = mean_std(np.array([[0.2], [0.4]]))
    assert m[0] == pytest.approx(0.3) and s[0] == pytest.approx(np.sqrt(0.02))
    assert mean_std(np.array([[0.2]]))[1] is None


def test_bootstrap_shapes_checked():
    with pytest.raises(ValueError):
        hierarchical_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(ValueError):
        hierarchical_bootstrap(np.zeros((2, 5)), np.zeros((3, 5)), paired_seeds=True)
    r = hierarchical_bootstrap(np.ones((2, 5, 3)), np.zeros((3, 5, 3)), n_boot=200)  # unpaired seeds, 3 metrics
    assert r["boot"].shape == (200, 3) and np.allclose(r["boot"], 1.0)
