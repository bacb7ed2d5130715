"""The embedded default data set: where it lives and how it is made on first use."""
from __future__ import annotations

import os
from pathlib import Path

#: Where the synthetic default data set is written (override with USE_DATA_DIR).
DEFAULT_DATA_DIR = Path(os.environ.get("USE_DATA_DIR", "data/synthetic"))
#: Where `use-train` writes its model when no --output-dir is given.
DEFAULT_RUN_DIR = Path("runs/default")


def ensure_default_dataset(data_dir=None) -> Path:
    """Generates the synthetic default (deterministic, seed 0) if it is missing; returns its folder.

    The folder holds `train.txt` (one user per line) and `eval.tsv` (history, context, label).
    """
    from .synthetic import write_default_dataset

    d = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    write_default_dataset(d)
    return d
