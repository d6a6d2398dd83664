"""Fisher's noncentral hypergeometric likelihood ratio: the exact conditional 2x2 e-value.

A stratum compares one group with the rest: the group has :math:`x` successes in :math:`n`
trials (TP out of TP + FN for the true positive rate, ...), the rest :math:`s - x` in :math:`m`.
Conditional on the margins :math:`(n, m, s)`, :math:`x` follows Fisher's noncentral
hypergeometric law with odds ratio :math:`\\psi` (the group's odds over the rest's):

.. math:: P_\\psi(x) = \\frac{\\binom{n}{x}\\binom{m}{s-x}\\psi^x}
                            {\\sum_k \\binom{n}{k}\\binom{m}{s-k}\\psi^k}.

Under equal rates :math:`\\psi = 1` *whatever the common rate is*, so the likelihood ratio
:math:`L = P_{\\psi_1}(x) / P_1(x)` has conditional expectation exactly 1 however the rate moves
between strata (a model-wide change is not a disparity). It is written by hand: scipy's
``nchypergeom_fisher`` evaluates one table at a time and no maintained library returns the
vectorised log ratio.

>>> import math
>>> lr = fisher_log_lr([3.0], [5.0], [5.0], [5.0], [math.log(2.0)])
>>> z = sum(math.comb(5, k) * math.comb(5, 5 - k) * 2.0**k for k in range(6))
>>> bool(abs(lr[0] - (3 * math.log(2.0) - math.log(z / 252))) < 1e-12)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.special import gammaln

__all__ = ["fisher_log_lr"]

_LOG_FACT = gammaln(np.arange(1.0, 4097.0))  # log k! for k < 4096, grown on demand


def _log_fact(k: NDArray[np.int64]) -> NDArray[np.float64]:
    global _LOG_FACT
    top = int(k.max(initial=0))
    if top >= _LOG_FACT.size:
        _LOG_FACT = gammaln(np.arange(1.0, 2.0 * top + 2.0))
    return _LOG_FACT[k]


def _log_binom(n: NDArray[np.int64], k: NDArray[np.int64]) -> NDArray[np.float64]:
    return _log_fact(n) - _log_fact(k) - _log_fact(n - k)


def _logsumexp(a: NDArray[np.float64]) -> NDArray[np.float64]:
    top = a.max(axis=1)
    return np.asarray(top + np.log(np.exp(a - top[:, None]).sum(axis=1)), dtype=np.float64)


def fisher_log_lr(
    x: Sequence[float] | NDArray[np.float64],
    n: Sequence[float] | NDArray[np.float64],
    m: Sequence[float] | NDArray[np.float64],
    s: Sequence[float] | NDArray[np.float64],
    log_psi: Sequence[float] | Sequence[Sequence[float]] | NDArray[np.float64],
) -> NDArray[np.float64]:
    """Log likelihood ratio of Fisher's noncentral hypergeometric (odds ratio psi) vs psi = 1.

    ``x`` successes of ``n`` trials against the rest's ``s - x`` of ``m``, elementwise; a 2-d
    ``log_psi`` (rows, alternatives) gives a (rows, alternatives) result sharing the support sums.
    Rows whose support is a single point (``n == 0``, ``m == 0``, ...) give exactly 0.

    >>> import math
    >>> fisher_log_lr([2.0, 0.0], [4.0, 0.0], [4.0, 3.0], [2.0, 1.0], [[math.log(2.0)], [1.0]]).shape
    (2, 1)
    """
    xa, lp = np.asarray(x, dtype=np.float64), np.asarray(log_psi, dtype=np.float64)
    na, ma, sa = (np.asarray(v, dtype=np.float64).astype(np.int64) for v in (n, m, s))
    if xa.size == 0:
        return np.zeros(lp.shape, dtype=np.float64)
    lo = np.maximum(0, sa - ma)
    hi = np.minimum(na, sa)
    lo, hi = _window(na, ma, sa, lo, hi, lp)
    # rows are padded to the widest support of their call: group them by width (powers of 4)
    width_class = np.ceil(np.log2(hi - lo + 1.0) / 2.0).astype(np.int64)
    classes = np.unique(width_class)
    if classes.size == 1:
        return _fisher(xa, na, ma, sa, lo, hi, lp)
    out = np.empty(lp.shape, dtype=np.float64)
    for c in classes.tolist():
        rows = np.flatnonzero(width_class == c)
        out[rows] = _fisher(xa[rows], na[rows], ma[rows], sa[rows], lo[rows], hi[rows], lp[rows])
    return out


_WIDE = 256  # supports wider than this are cut to where the terms matter
_SDS = 15.0  # half-width of the cut, in standard deviations of each law summed over


def _window(
    na: NDArray[np.int64],
    ma: NDArray[np.int64],
    sa: NDArray[np.int64],
    lo: NDArray[np.int64],
    hi: NDArray[np.int64],
    lp: NDArray[np.float64],
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Cut wide supports to the terms that matter for the sums (large strata of busy streams).

    Both sums (odds ratio 1 and each alternative) are sums of a unimodal law's weights; beyond
    15 standard deviations from its mean a term is below ``exp(-100)`` of the largest, so cutting
    there changes a log sum by less than 1e-40. Means and variances are Cornfield's large-sample
    approximations of Fisher's noncentral hypergeometric law, accurate exactly where a support is
    wide; the cut covers every law's window, plus a margin.
    """
    wide = (hi - lo) > _WIDE
    if not wide.any():
        return lo, hi
    n, m, s = (v[wide].astype(np.float64) for v in (na, ma, sa))
    psis = np.exp(np.concatenate([np.zeros((n.size, 1)), lp[wide].reshape(n.size, -1)], axis=1))
    low, high = hi[wide].astype(np.float64), lo[wide].astype(np.float64)
    for j in range(psis.shape[1]):
        psi = psis[:, j]
        a, b, c = 1.0 - psi, m - s + psi * (n + s), -psi * n * s
        with np.errstate(divide="ignore", invalid="ignore"):
            root = (-b + np.sqrt(np.maximum(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)
        mean = np.where(np.abs(a) < 1e-12, -c / b, root)
        mean = np.clip(mean, lo[wide], hi[wide])
        inv_var = sum(1.0 / np.maximum(v, 0.5) for v in (mean, n - mean, s - mean, m - s + mean))
        sd = np.sqrt(1.0 / inv_var)
        low = np.minimum(low, np.floor(mean - _SDS * sd - 10.0))
        high = np.maximum(high, np.ceil(mean + _SDS * sd + 10.0))
    lo, hi = lo.copy(), hi.copy()
    lo[wide] = np.maximum(lo[wide], low.astype(np.int64))
    hi[wide] = np.minimum(hi[wide], high.astype(np.int64))
    return lo, hi


def _fisher(
    xa: NDArray[np.float64],
    na: NDArray[np.int64],
    ma: NDArray[np.int64],
    sa: NDArray[np.int64],
    lo: NDArray[np.int64],
    hi: NDArray[np.int64],
    lp: NDArray[np.float64],
) -> NDArray[np.float64]:
    width = int((hi - lo).max(initial=0)) + 1
    k = lo[:, None] + np.arange(width)[None, :]
    valid = k <= hi[:, None]
    kk = np.where(valid, k, lo[:, None])
    logw = _log_binom(na[:, None], kk) + _log_binom(ma[:, None], sa[:, None] - kk)
    logw = np.where(valid, logw, -np.inf)
    log_den = _logsumexp(logw)
    if lp.ndim == 1:
        return np.asarray(xa * lp - (_logsumexp(logw + kk * lp[:, None]) - log_den))
    cols = [_logsumexp(logw + kk * lp[:, j, None]) for j in range(lp.shape[1])]
    return np.asarray(xa[:, None] * lp - (np.stack(cols, axis=1) - log_den[:, None]))
