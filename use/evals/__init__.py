"""The USE evaluations (SPEC §5): re-identification and a classification probe over periods of
context, for the recent / pool / stateful / recompute strategies, with TF, TF-IDF and untrained
baselines. `use-eval` (use.evals.cli) runs them all and reports a table, JSON and plots."""
from .classify import PROBE_HIDDEN, score_probe, split_by_class, train_probe
from .metrics import (binary_auc, cosine_similarity, macro_auc_ovr, macro_f1, reid_metrics,
                      reid_ranks)
from .reid import reid_at, reid_curves

__all__ = ["PROBE_HIDDEN", "score_probe", "split_by_class", "train_probe", "binary_auc",
           "cosine_similarity", "macro_auc_ovr", "macro_f1", "reid_metrics", "reid_ranks",
           "reid_at", "reid_curves"]
