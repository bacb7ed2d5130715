"""Baselines on the same data and splits: term frequency, TF-IDF, and an untrained USE model.

TF and TF-IDF are bag-of-events vectors (scikit-learn's TfidfTransformer on event counts,
L2-normalised rows). Their "state" is the event counts, so their analogue of the stateful
strategy is the counts of everything so far ("stateful" below; pooling equal-length periods
gives the same direction, so it is not repeated) and of recent is the newest period's counts.
The IDF weights are fitted on the candidate histories (no labels involved).

The untrained model has the trained model's config and a random init (seeded): how much of a
score comes from the architecture and the mean pooling alone.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch


def count_matrix(seqs: Sequence[np.ndarray], vocab_size: int):
    """Token-id sequences -> scipy CSR [N, vocab_size] event counts."""
    from scipy.sparse import csr_matrix

    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    rows = np.repeat(np.arange(len(seqs)), lens)
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if len(seqs) else np.zeros(0, np.int64)
    return csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(seqs), vocab_size))


class BagOfEvents:
    """TF (use_idf=False) or TF-IDF vectors; fit() learns the IDF weights on documents."""

    def __init__(self, vocab_size: int, idf: bool):
        from sklearn.feature_extraction.text import TfidfTransformer

        self.vocab_size = vocab_size
        self.name = "tfidf" if idf else "tf"
        self._t = TfidfTransformer(norm="l2", use_idf=idf, smooth_idf=True)

    def fit(self, seqs: Sequence[np.ndarray]) -> "BagOfEvents":
        self._t.fit(count_matrix(seqs, self.vocab_size))
        return self

    def transform(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """[N, vocab_size] dense float64 vectors."""
        return np.asarray(self._t.transform(count_matrix(seqs, self.vocab_size)).todense())

    def periods(self, seqs: Sequence[np.ndarray], periods: int, period_len: int) -> Dict[str, np.ndarray]:
        """strategy -> [P, N, vocab]: 'recent' (period p alone) and 'stateful' (periods 1..p).
        A user with k < P full periods keeps its period-k vector afterwards (as embed_periods)."""
        P, L = periods, period_len
        out = {"recent": [], "stateful": []}
        for p in range(P):
            ends = [min(len(s) // L, P) for s in seqs]
            q = [min(p, e - 1) for e in ends]                      # the period each user shows at p
            out["recent"].append(self.transform([s[qi * L:(qi + 1) * L] if qi >= 0 else s[:0]
                                                 for s, qi in zip(seqs, q)]))
            out["stateful"].append(self.transform([s[:(qi + 1) * L] for s, qi in zip(seqs, q)]))
        return {k: np.stack(v) for k, v in out.items()}


def untrained_model(model, seed: int = 0):
    """A model with `model`'s config, dtype and device and a random init drawn from `seed`."""
    from ..model import USEModel

    p = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = USEModel(model.config)
    return fresh.to(device=p.device, dtype=p.dtype).eval()
