"""Classification probe (SPEC §5): an MLP (scikit-learn, one hidden layer of 1024) on frozen
embeddings; macro one-vs-rest AUC and macro F1, over seeds (0, 1, 2 by default).

Two label protocols (use.evals.cli picks one):

- labels per user (the eval .tsv's `label` column; the synthetic groups): users are split per
  class, half for training (rounded up; a class with one user trains only), by the seed; the
  probe is trained on the training users' history embeddings and scored on the others'.
- user identity (the published protocol, when there are no labels): each user's history is cut
  into periods embedded independently; even-numbered periods train the probe, odd ones test it,
  so every class (user) is on both sides.
"""
from __future__ import annotations

import warnings
from typing import Dict, Sequence, Tuple

import numpy as np

from .metrics import macro_auc_ovr, macro_f1

PROBE_HIDDEN = 1024


def split_by_class(labels: Sequence, seed: int, train_fraction: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Per class, shuffle the members (seeded) and put ceil(fraction·n) in train, the rest in test."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in sorted(set(labels.tolist()), key=str):
        idx = np.nonzero(labels == c)[0]
        idx = idx[rng.permutation(idx.size)]
        k = int(np.ceil(train_fraction * idx.size))
        train.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def train_probe(X: np.ndarray, y: np.ndarray, seed: int, *, hidden: int = PROBE_HIDDEN, max_iter: int = 200):
    """StandardScaler → MLPClassifier(hidden,), fitted; convergence warnings are silenced (the
    probe's budget is fixed by max_iter, the same for every method)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    if len(set(y.tolist())) < 2:
        raise ValueError(f"train_probe: need at least 2 classes in the training labels, got {len(set(y.tolist()))}")
    probe = make_pipeline(StandardScaler(),
                          MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(X, dtype=np.float64), y)
    return probe


def score_probe(probe, X: np.ndarray, y: np.ndarray) -> Dict[str, float]:
    """Macro OvR AUC (classes with positives and negatives in y) and macro F1."""
    X = np.asarray(X, dtype=np.float64)
    proba = probe.predict_proba(X)
    classes = probe.classes_
    pred = classes[np.argmax(proba, axis=1)]
    return {"auc": macro_auc_ovr(y, proba, classes), "f1": macro_f1(y, pred)}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "values": [float(x) for x in v]}
