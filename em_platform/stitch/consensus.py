"""Per edge, the largest set of point pairs one similarity transform maps within a threshold: the edge's consensus.

The pairs of one edge (a matcher's patches along an overlap strip, or render point matches) must agree on one
similarity between the two tiles; pairs off it are wrong matches. OpenCV's RANSAC
(``estimateAffinePartial2D``, what em_stitch's filter runs) answers this badly for the few pairs of a
scope's edge, in two ways that left a pair 13 px off in our montage while em_stitch fitted it (issue 38):

* it **stops early**: after a sample that most pairs agree with, its adaptive stopping rule (confidence 0.999,
  9 pairs of 10 agreeing) asks for about five more samples, so a larger consensus is often never drawn;
  which set it returns then depends on which pairs happen to be present. On the real TEMCA montage an
  edge of 10 pairs kept all 10; given the 9 em_stitch kept (one good pair fewer), it kept 8;
* its mask belongs to the best *sample's* model, not to the refined transform it returns, so a kept pair
  may lie beyond the threshold of the returned transform and a dropped one within it.

Here every pair of points is a hypothesis (up to ``MAX_HYPOTHESES`` per edge: all of them up to 50
pairs, a seeded sample beyond), the one most pairs agree with wins (ties: the lower sum of squares), and
the winner is refined by least squares on its agreeing pairs, re-judged, until the set settles, a step
kept only while it keeps at least as many pairs. The result does not depend on the order of the pairs or
on a random state, and the mask is exactly the pairs within the threshold of the transform returned.
Edges whose points lie closer together than twice the threshold (or a single pair) cannot show a turn:
they agree on a translation, the median offset. Vectorised over edges of one size (the 9,790 edges of the
TEMCA montage in ~0.2 s against 1.2 s for one RANSAC per edge). Dagster-free.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONSENSUS_PX", "MAX_HYPOTHESES", "MIN_SCALE", "edge_consensus"]

CONSENSUS_PX = 10.0  # a pair this far off its edge's transform is an outlier (em_stitch's RANSAC threshold)
MIN_SCALE = 0.8  # two tiles of one camera: a consensus scaling them more than this apart is degenerate
MAX_HYPOTHESES = 1225  # two-point hypotheses per edge: every pair of points of up to 50
REFINE_ITERATIONS = 10
CHUNK_ELEMENTS = 1 << 22  # edges × hypotheses × pairs evaluated at once (64 MiB of complex numbers)


def _hypotheses(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The two-point samples of an edge of ``n`` pairs: every pair of points, or a seeded sample of them."""
    i, j = np.triu_indices(n, 1)
    if len(i) > MAX_HYPOTHESES:
        pick = np.random.default_rng(0).choice(len(i), MAX_HYPOTHESES, replace=False)
        i, j = i[pick], j[pick]
    return i, j


def _best_hypotheses(zp: np.ndarray, zq: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per edge (rows of ``zp``, ``zq``: points as complex numbers), the two-point similarity ``p = a·q + b``
    most pairs agree with: (a, b); a = 0 where no sample is valid (points too close, scale off)."""
    e, n = zp.shape
    i, j = _hypotheses(n)
    h = len(i)
    a_out, b_out = np.zeros(e, complex), np.zeros(e, complex)
    step = max(1, CHUNK_ELEMENTS // max(1, h * n))
    for start in range(0, e, step):
        p, q = zp[start : start + step], zq[start : start + step]
        dq, dp = q[:, j] - q[:, i], p[:, j] - p[:, i]
        valid = (np.abs(dq) > 2 * threshold) & (np.abs(dp) > 2 * threshold)
        a = np.where(valid, dp / np.where(valid, dq, 1), 0)
        valid &= (np.abs(a) >= MIN_SCALE) & (np.abs(a) <= 1 / MIN_SCALE)
        b = p[:, i] - a * q[:, i]
        d2 = np.abs(a[:, :, None] * q[:, None, :] + b[:, :, None] - p[:, None, :]) ** 2  # (edges, h, n)
        inside = d2 <= threshold**2
        # the most agreeing pairs; among as many, the lower sum of their squares (a fraction below 1)
        score = inside.sum(axis=2) - (d2 * inside).sum(axis=2) / (threshold**2 * (n + 1))
        score = np.where(valid, score, -1.0)
        best = np.argmax(score, axis=1)
        rows = np.arange(len(p))
        ok = score[rows, best] > 1.5  # at least two pairs agree
        a_out[start : start + step] = np.where(ok, a[rows, best], 0)
        b_out[start : start + step] = np.where(ok, b[rows, best], 0)
    return a_out, b_out


def _fit(zp: np.ndarray, zq: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per edge, the least-squares similarity ``p = a·q + b`` over the pairs in ``mask``: (a, b, usable), not
    usable where the pairs cannot fix a turn or the scale is off (``MIN_SCALE``)."""
    w = mask.astype(np.float64)
    count = np.maximum(w.sum(axis=1), 1)
    mq, mp = (w * zq).sum(axis=1) / count, (w * zp).sum(axis=1) / count
    qc, pc = zq - mq[:, None], zp - mp[:, None]
    norm = (w * np.abs(qc) ** 2).sum(axis=1)
    a = (w * np.conj(qc) * pc).sum(axis=1) / np.where(norm > 0, norm, 1)
    usable = (norm > 0) & (np.abs(a) >= MIN_SCALE) & (np.abs(a) <= 1 / MIN_SCALE)
    return a, mp - a * mq, usable


def _refine(zp, zq, a, b, threshold):
    """Grow each edge's agreeing set from its best two-point hypothesis: least squares on the set and
    re-judged, while the set keeps at least as many pairs; then the nearest pair outside is taken in, one at
    a time, while the least squares over the set with it keeps every one of them within ``threshold`` (a
    two-point model is noisy: on the TEMCA edge of issue 38 no two of its 10 pairs put all 10 within 10 px;
    their least squares does). (a, b, mask), the mask exactly the pairs within ``threshold`` of (a, b)."""

    def within(a, b):
        return np.abs(a[:, None] * zq + b[:, None] - zp) <= threshold

    mask = within(a, b)
    for _ in range(REFINE_ITERATIONS):
        fit_a, fit_b, usable = _fit(zp, zq, mask)
        new = within(fit_a, fit_b)
        take = usable & (new.sum(axis=1) >= mask.sum(axis=1))
        changed = take & (new != mask).any(axis=1)
        a, b = np.where(take, fit_a, a), np.where(take, fit_b, b)
        mask = np.where(take[:, None], new, mask)
        if not changed.any():
            break
    growing = np.flatnonzero(~mask.all(axis=1))  # only the edges still growing are evaluated
    while len(growing):
        p, q, m = zp[growing], zq[growing], mask[growing]
        d = np.where(m, np.inf, np.abs(a[growing, None] * q + b[growing, None] - p))
        trial = m.copy()
        trial[np.arange(len(growing)), np.argmin(d, axis=1)] = True
        fit_a, fit_b, usable = _fit(p, q, trial)
        new = np.abs(fit_a[:, None] * q + fit_b[:, None] - p) <= threshold
        take = usable & (new | ~trial).all(axis=1)  # every pair of the trial set stays within
        a[growing[take]], b[growing[take]] = fit_a[take], fit_b[take]
        mask[growing[take]] = new[take]
        growing = growing[take & ~new.all(axis=1)]
    return a, b, mask


def _translation(p: np.ndarray, q: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    offset = np.median(p - q, axis=0)
    inside = np.hypot(*(p - q - offset).T) <= threshold
    return np.array([[1.0, 0.0, offset[0]], [0.0, 1.0, offset[1]]]), inside


def edge_consensus(
    p: np.ndarray, q: np.ndarray, edge_of: np.ndarray, n_edges: int, threshold_px: float = CONSENSUS_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Per edge, the similarity ``S`` with ``p ≈ S(q)`` (tile ← neighbour, 2×3) over its agreeing pairs,
    and per pair whether it agrees (``p``, ``q``: (m, 2) raw tile px; ``edge_of``: each pair's edge)."""
    p, q = np.asarray(p, np.float64).reshape(-1, 2), np.asarray(q, np.float64).reshape(-1, 2)
    edge_of = np.asarray(edge_of, np.int64)
    transforms = np.broadcast_to(np.eye(2, 3), (n_edges, 2, 3)).copy()
    agree = np.zeros(len(p), bool)
    order = np.argsort(edge_of, kind="stable")
    bounds = np.searchsorted(edge_of[order], np.arange(n_edges + 1))
    counts = np.diff(bounds)
    for n in np.unique(counts[counts > 0]):
        edges = np.flatnonzero(counts == n)
        rows = order[bounds[edges][:, None] + np.arange(n)]  # (edges, n) pair indices
        zp = p[rows, 0] + 1j * p[rows, 1]
        zq = q[rows, 0] + 1j * q[rows, 1]
        spread = np.minimum(np.ptp(p[rows], axis=1).max(axis=1), np.ptp(q[rows], axis=1).max(axis=1))
        turn = spread > 2 * threshold_px  # far enough apart to show a rotation
        a, b = np.zeros(len(edges), complex), np.zeros(len(edges), complex)
        if n >= 2 and turn.any():
            a[turn], b[turn] = _best_hypotheses(zp[turn], zq[turn], threshold_px)
        similar = a != 0
        if similar.any():
            a_s, b_s, mask = _refine(zp[similar], zq[similar], a[similar], b[similar], threshold_px)
            transforms[edges[similar]] = np.stack(
                [
                    np.stack([a_s.real, -a_s.imag, b_s.real], axis=1),
                    np.stack([a_s.imag, a_s.real, b_s.imag], axis=1),
                ],
                axis=1,
            )
            agree[rows[similar]] = mask
        if n == 1:  # one pair: its own offset
            transforms[edges, :, 2] = p[rows[:, 0]] - q[rows[:, 0]]
            agree[rows[:, 0]] = True
            continue
        for k in np.flatnonzero(~similar):  # a translation: too close together, or no two-point model
            transforms[edges[k]], agree[rows[k]] = _translation(p[rows[k]], q[rows[k]], threshold_px)
    return transforms, agree
