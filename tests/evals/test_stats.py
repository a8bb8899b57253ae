"""Paired statistics: McNemar's exact test, the bootstrap interval, macro-F1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnedit.evals import stats


def _binom_two_sided(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (10, 10), (40, 61), (200, 260)])
def test_mcnemar_matches_exact_binomial(b, c):
    base = [True] * b + [False] * c + [True] * 7 + [False] * 4
    edit = [False] * b + [True] * c + [True] * 7 + [False] * 4
    out = stats.mcnemar(base, edit)
    assert (out["b"], out["c"]) == (b, c)
    assert out["p"] == pytest.approx(_binom_two_sided(b, c), rel=1e-9)
    assert out["p_mid"] <= out["p"]


def test_mcnemar_known_value():
    # 1 vs 9 discordant pairs: p = 2 * P(X <= 1) = 2 * (1 + 10) / 2**10; mid-p = 2 * (P(X < 1) + P(X = 1) / 2)
    out = stats.mcnemar([True] + [False] * 9, [False] + [True] * 9)
    assert out["p"] == pytest.approx(22 / 1024)
    assert out["p_mid"] == pytest.approx(12 / 1024)


def test_bootstrap_interval_is_seeded_and_covers_the_difference():
    rng = np.random.default_rng(3)
    base = (rng.random(300) < 0.6).astype(float)
    edit = np.where(rng.random(300) < 0.15, 1 - base, base)
    a = stats.mean_diff_interval(base, edit, n_boot=2000, seed=5)
    b = stats.mean_diff_interval(base, edit, n_boot=2000, seed=5)
    c = stats.mean_diff_interval(base, edit, n_boot=2000, seed=6)
    assert a == b and a != c
    diff = edit.mean() - base.mean()
    assert a[0] < diff < a[1]
    # the paired interval is about +-1.96 * sd(d) / sqrt(n)
    half = 1.96 * (edit - base).std() / np.sqrt(300)
    assert (a[1] - a[0]) / 2 == pytest.approx(half, rel=0.15)


def test_identical_runs_have_a_zero_interval():
    x = [1.0, 0.0, 1.0, 1.0]
    assert stats.mean_diff_interval(x, x, n_boot=500) == (0.0, 0.0)


def test_macro_f1_against_hand_count():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    # class 0: tp 2, fp 0, fn 1 -> 0.8; class 1: tp 1, fp 1, fn 1 -> 0.5; class 2: tp 1, fp 1, fn 0 -> 2/3
    assert stats.macro_f1(gold, pred, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class in neither gold nor pred does not count
    assert stats.macro_f1([0, 1], [0, 1], 5) == 1.0


def test_f1_interval_matches_plain_resampling():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 80)
    base = np.where(rng.random(80) < 0.6, gold, rng.integers(0, 3, 80))
    edit = np.where(rng.random(80) < 0.7, gold, rng.integers(0, 3, 80))
    lo, hi = stats.f1_diff_interval(gold, base, edit, 3, n_boot=300, seed=1)
    # the same resamples, one at a time
    g = np.random.Generator(np.random.PCG64(1))
    idx = g.integers(0, 80, size=(300, 80))
    vals = [stats.macro_f1(gold[i], edit[i], 3) - stats.macro_f1(gold[i], base[i], 3) for i in idx]
    assert (lo, hi) == pytest.approx((np.quantile(vals, 0.025), np.quantile(vals, 0.975)))
