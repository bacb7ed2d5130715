"""Re-identification (SPEC §5): find a user's history among all histories from their context.

Query = a user's context embedding after period p (under some strategy); candidates = every
user's history embedding; the true candidate is the same user's. Scored by cosine similarity,
ranks with pessimistic ties (metrics.reid_ranks), MRR and top-1/3/5/10.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .metrics import KS, cosine_similarity, reid_metrics, reid_ranks


def reid_at(queries: np.ndarray, candidates: np.ndarray, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Metrics for queries [N, h] against candidates [N, h] (query i belongs to candidate i)."""
    if queries.shape[0] != candidates.shape[0]:
        raise ValueError(f"reid_at: {queries.shape[0]} queries but {candidates.shape[0]} candidates")
    return reid_metrics(reid_ranks(cosine_similarity(queries, candidates)), ks)


def reid_curves(queries: Dict[str, np.ndarray], candidates: np.ndarray,
                ks: Sequence[int] = KS) -> Dict[str, Dict[str, List[float]]]:
    """strategy -> queries [P, N, h]  =>  strategy -> metric -> [P] values (one per period)."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for strategy, q in queries.items():
        per = [reid_at(q[p], candidates, ks) for p in range(q.shape[0])]
        out[strategy] = {m: [d[m] for d in per] for m in per[0]}
    return out
