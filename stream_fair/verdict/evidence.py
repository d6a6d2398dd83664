"""E-values of one stratum: a group against the rest within one (cohort, slot).

**Decisions.** With :math:`x` of the group's :math:`n` trials successes and the rest's
:math:`s - x` of :math:`m`, :func:`~stream_fair.verdict.fisher.fisher_log_lr` gives the exact
conditional likelihood ratio of odds ratio :math:`\\psi_1` against 1. The alternatives are the
design shift :math:`\\delta` from the rest's rate :math:`r` measured *before* the slot
(:func:`design_log_psi`): :math:`\\psi_1^{\\pm} = \\mathrm{odds}(r \\pm \\delta)/\\mathrm{odds}(r)`.

**Scores.** For the true positive rate the stratum also holds the scores of the labelled
positives in fixed bins: the group's counts :math:`x_1..x_K` and the pooled counts
:math:`N_1..N_K`. If the group's positives are exchangeable with the rest's (same score
distribution), :math:`x` given the pooled counts is multivariate hypergeometric, which factors
into a chain of ordinary hypergeometrics: :math:`x_j` given :math:`x_1..x_{j-1}` is the group's
share of bin :math:`j` among the :math:`R_j = N_j + ... + N_K` pooled scores at or above bin
:math:`j`, of which the group holds :math:`n_j = n - x_1 - ... - x_{j-1}`. Each link gets its own
Fisher likelihood ratio with odds ratio :math:`\\psi_j`; every link has conditional mean 1 given
the earlier ones, so the product (:func:`chain_log_lr`) is again an exact e-value. The
:math:`\\psi_j` come from the *proportional-odds* alternative (:func:`proportional_odds_chain`):
the group's odds of scoring at or above every bin edge are :math:`\\psi_1` times the reference's
-- a shift of the latent logistic score, which at the decision threshold is exactly the design
odds ratio of the rate. With a logistic score a 0.10 TPR drop from 0.8 carries about 0.046 nats
per positive this way against 0.030 from the decision alone.

>>> lp = proportional_odds_chain(np.array([[1.0, 1.0, 1.0, 1.0]]), np.array([[np.log(0.5)]]))
>>> lp.shape, bool(lp[0, 0, -1] == 0.0)
((1, 1, 4), True)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from stream_fair.verdict.fisher import fisher_log_lr

__all__ = ["design_log_psi", "proportional_odds_chain", "chain_log_lr"]

_EDGE = 0.001  # rates are clipped to [0.001, 0.999] so odds stay finite


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(np.log(p) - np.log1p(-p))


def design_log_psi(rate: NDArray[np.float64], effect: float) -> NDArray[np.float64]:
    """Log odds ratios ``[down, up]`` of ``rate -+ effect`` against ``rate``, per row.

    >>> np.round(design_log_psi(np.array([0.8]), 0.1), 3)
    array([[-0.539,  0.811]])
    """
    r = np.clip(np.asarray(rate, dtype=np.float64), _EDGE, 1.0 - _EDGE)
    down = np.clip(r - effect, _EDGE, 1.0 - _EDGE)
    up = np.clip(r + effect, _EDGE, 1.0 - _EDGE)
    return np.stack([_logit(down) - _logit(r), _logit(up) - _logit(r)], axis=-1)


def proportional_odds_chain(
    reference: NDArray[np.float64], log_psi: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Continuation-ratio log odds ratios ``(rows, alternatives, bins)`` of proportional-odds shifts.

    ``reference`` is a ``(rows, bins)`` score histogram (counts; half a count is added to every
    bin), ``log_psi`` ``(rows, alternatives)``: under an alternative the odds of a score at or
    above each bin edge are ``exp(log_psi)`` times the reference's. Link ``j`` compares "in bin
    j" against "above bin j" among scores at or above bin ``j``; the last link is certain and gets 0.
    """
    f = np.asarray(reference, dtype=np.float64) + 0.5
    f = f / f.sum(axis=1, keepdims=True)
    rows, bins = f.shape
    tail = np.concatenate([np.cumsum(f[:, ::-1], axis=1)[:, ::-1], np.zeros((rows, 1))], axis=1)
    psi = np.exp(np.asarray(log_psi, dtype=np.float64))[:, :, None]
    t = tail[:, None, :]
    g_tail = psi * t / (1.0 - t + psi * t)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_ref = f / tail[:, :-1]
        h_alt = (g_tail[:, :, :-1] - g_tail[:, :, 1:]) / g_tail[:, :, :-1]
    h_ref = np.clip(h_ref, 1e-12, 1.0 - 1e-12)
    h_alt = np.clip(h_alt, 1e-12, 1.0 - 1e-12)
    out = _logit(h_alt) - _logit(h_ref)[:, None, :]
    out[:, :, -1] = 0.0
    return np.asarray(out)


def chain_log_lr(
    group: NDArray[np.float64], pooled: NDArray[np.float64], log_psi: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Log e-values ``(rows, alternatives)`` of group score histograms against pooled ones.

    ``group`` and ``pooled`` are ``(rows, bins)`` counts (pooled includes the group);
    ``log_psi`` is ``(rows, alternatives, bins)`` from :func:`proportional_odds_chain`.

    >>> g = np.array([[0.0, 3.0, 1.0]]); pooled = np.array([[4.0, 4.0, 4.0]])
    >>> chain_log_lr(g, pooled, np.zeros((1, 2, 3))).tolist()
    [[0.0, 0.0]]
    """
    g = np.asarray(group, dtype=np.float64)
    p = np.asarray(pooled, dtype=np.float64)
    rows, bins = g.shape
    k = log_psi.shape[1]
    out = np.zeros((rows, k))
    at_or_above = np.cumsum(p[:, ::-1], axis=1)[:, ::-1]
    mine_above = np.cumsum(g[:, ::-1], axis=1)[:, ::-1]
    rest_above = at_or_above - mine_above
    # a link is informative only if both sides have scores left and the bin is neither empty nor
    # everything that is left
    live = (mine_above > 0) & (rest_above > 0) & (p > 0) & (p < at_or_above)
    r, j = np.nonzero(live)
    if r.size:
        lr = fisher_log_lr(g[r, j], mine_above[r, j], rest_above[r, j], p[r, j], log_psi[r, :, j])
        for alt in range(k):
            out[:, alt] = np.bincount(r, weights=lr[:, alt], minlength=rows)
    return out
