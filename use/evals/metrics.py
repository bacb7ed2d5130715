"""Metrics of the evaluations: re-identification ranks and classification scores.

Re-ID ties are counted pessimistically: a candidate scoring exactly as high as the true one is
ranked above it, so a model that maps everyone to one vector gets rank N, not rank 1.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

KS = (1, 3, 5, 10)


def cosine_similarity(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[N, h] x [M, h] -> [N, M] float64 cosine similarities; a zero vector is 0-similar to all."""
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(candidates, dtype=np.float64)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"cosine_similarity: need [N, h] and [M, h], got {q.shape} and {c.shape}")
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    cn = np.linalg.norm(c, axis=1, keepdims=True)
    return (q / np.where(qn > 0, qn, 1)) @ (c / np.where(cn > 0, cn, 1)).T


def reid_ranks(sim: np.ndarray, targets: Optional[np.ndarray] = None) -> np.ndarray:
    """1-based rank of each query's true candidate (default: candidate i for query i).

    rank_i = 1 + #{j != t_i : sim[i, j] >= sim[i, t_i]}  (ties ranked above the true candidate)
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"reid_ranks: similarity must be [N, M], got shape {sim.shape}")
    N, M = sim.shape
    t = np.arange(N) if targets is None else np.asarray(targets, dtype=np.int64)
    if t.shape != (N,) or (N and (t.min() < 0 or t.max() >= M)):
        raise ValueError(f"reid_ranks: targets must be {N} indices in [0, {M})")
    if np.isnan(sim).any():
        i, j = np.argwhere(np.isnan(sim))[0]
        raise ValueError(f"reid_ranks: similarity has NaN (first at query {i}, candidate {j})")
    true = sim[np.arange(N), t]
    ge = (sim >= true[:, None]).sum(1)          # counts the true candidate itself once
    return ge.astype(np.int64)


def reid_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> Dict[str, float]:
    """MRR and top-k accuracy from 1-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("reid_metrics: no ranks")
    out = {"mrr": float(np.mean(1.0 / r))}
    for k in ks:
        out[f"top{k}"] = float(np.mean(r <= k))
    return out


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > that of a random negative), ties counting 1/2
    (Mann-Whitney U with average ranks). Needs both classes present."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"binary_auc: need positives and negatives, got {n_pos} and {n_neg}")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc_ovr(y_true: np.ndarray, scores: np.ndarray, classes: Sequence) -> float:
    """Macro one-vs-rest AUC: the mean over classes that have both positives and negatives in
    y_true (a class absent from the test set has no AUC). scores[:, j] scores classes[j]."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(y_true), len(classes)):
        raise ValueError(f"macro_auc_ovr: scores shape {scores.shape}, expected ({len(y_true)}, {len(classes)})")
    aucs = []
    for j, c in enumerate(classes):
        pos = y_true == c
        if pos.any() and (~pos).any():
            aucs.append(binary_auc(pos, scores[:, j]))
    if not aucs:
        raise ValueError("macro_auc_ovr: no class has both positives and negatives in y_true")
    return float(np.mean(aucs))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the labels in y_true or y_pred (scikit-learn's definition)."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), average="macro", zero_division=0))
