"""Paired statistics for patched-minus-baseline: bootstrap interval, McNemar's test, macro-F1.

Both runs score the same examples, so the comparison is paired: the bootstrap
resamples examples (the same indices for both runs) and McNemar's test looks
only at the discordant pairs (examples one run gets right and the other wrong).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from attnedit.lazy import np

N_BOOTSTRAP = 10_000
_CHUNK = 500  # resamples per vectorised step (bounds memory at CHUNK x n indices)


def macro_f1(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in `gold` or `pred`."""
    g = np.asarray(gold, dtype=np.int64)
    p = np.asarray(pred, dtype=np.int64)
    return float(_macro_f1_batch(g[None], p[None], n_classes)[0])


def _macro_f1_batch(gold: np.ndarray, pred: np.ndarray, C: int) -> np.ndarray:
    """(R, n) gold and pred -> (R,) macro-F1, one per row (resample)."""
    R = gold.shape[0]
    offset = (np.arange(R) * C)[:, None]
    tp = np.bincount((offset + gold)[gold == pred], minlength=R * C).reshape(R, C)
    n_gold = np.bincount((offset + gold).ravel(), minlength=R * C).reshape(R, C)
    n_pred = np.bincount((offset + pred).ravel(), minlength=R * C).reshape(R, C)
    denom = n_gold + n_pred
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(1) / np.maximum(present.sum(1), 1)


def paired_bootstrap(
    stat: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of a paired statistic over resampled example indices.

    Args:
        stat: maps (R, n) index arrays to (R,) values of patched-minus-baseline.
        n: the number of examples.
        n_boot: resamples; seed: their seed (numpy PCG64).
        level: the interval's coverage.
    Returns:
        (low, high).
    """
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.Generator(np.random.PCG64(seed))
    values = []
    for start in range(0, n_boot, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, n_boot - start), n))
        values.append(stat(idx))
    v = np.concatenate(values)
    alpha = (1 - level) / 2
    return float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))


def mean_diff_interval(base: Sequence[float], patched: Sequence[float], **kw) -> tuple[float, float]:
    """Bootstrap interval of mean(patched) - mean(base) on paired per-example values."""
    d = np.asarray(patched, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return paired_bootstrap(lambda idx: d[idx].mean(1), len(d), **kw)


def f1_diff_interval(
    gold: Sequence[int], base: Sequence[int], patched: Sequence[int], n_classes: int, **kw
) -> tuple[float, float]:
    """Bootstrap interval of macro-F1(patched) - macro-F1(base) on the same resampled examples."""
    g, b, p = (np.asarray(x, dtype=np.int64) for x in (gold, base, patched))
    return paired_bootstrap(
        lambda idx: _macro_f1_batch(g[idx], p[idx], n_classes) - _macro_f1_batch(g[idx], b[idx], n_classes),
        len(g),
        **kw,
    )


def mcnemar(base: Sequence[bool], patched: Sequence[bool]) -> dict[str, float]:
    """McNemar's exact test on the discordant pairs.

    Returns:
        ``b`` (baseline right, patched wrong), ``c`` (the reverse), ``p`` (exact two-sided binomial
        p-value), ``p_mid`` (mid-p: less conservative, recommended by Fagerland et al. 2013).
    """
    b = sum(1 for x, y in zip(base, patched) if x and not y)
    c = sum(1 for x, y in zip(base, patched) if y and not x)
    n, k = b + c, min(b, c)
    if n == 0:
        return {"b": 0, "c": 0, "p": 1.0, "p_mid": 1.0}
    tail = 2 * _binom_cdf(k, n)
    p, p_mid = min(1.0, tail), min(1.0, tail - _binom_pmf(k, n))
    return {"b": b, "c": c, "p": p, "p_mid": p_mid}


def _binom_pmf(k: int, n: int) -> float:
    """P(X = k), X ~ Binomial(n, 1/2), in log space (n may be large)."""
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2))


def _binom_cdf(k: int, n: int) -> float:
    return min(1.0, sum(_binom_pmf(i, n) for i in range(k + 1)))
