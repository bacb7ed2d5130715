"""Model directories: config.json + vocab.json + model.safetensors, written atomically.

A model directory is what `use-train` writes and what `use-embed` / `use-eval` read:

    <dir>/config.json        USEConfig
    <dir>/vocab.json         the vocabulary (use.data.Vocab)
    <dir>/model.safetensors  the weights
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from .config import USEConfig
from .io import atomic_write

CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME = "config.json", "vocab.json", "model.safetensors"


def save_weights(model: torch.nn.Module, path) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def save_model_dir(model, vocab, out_dir) -> None:
    """Writes config, vocabulary and weights; each file atomically (weights last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / CONFIG_NAME)
    vocab.save(out / VOCAB_NAME)
    save_weights(model, out / WEIGHTS_NAME)


def load_model_dir(model_dir, *, device="cpu", backend: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None) -> Tuple["torch.nn.Module", "object"]:
    """Loads (model in eval mode, vocab) from a model directory; clear errors for missing pieces."""
    from safetensors.torch import load_file

    from .data import Vocab
    from .model import USEModel

    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {str(d)!r} does not exist")
    missing = [n for n in (CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME) if not (d / n).is_file()]
    if missing:
        hint = " (train one with `use-train --output-dir DIR`)" if WEIGHTS_NAME in missing else ""
        raise FileNotFoundError(f"model directory {str(d)!r} has no {', '.join(missing)}{hint}")
    cfg = USEConfig.load(d / CONFIG_NAME)
    if backend is not None:
        cfg.backend = backend
    vocab = Vocab.load(d / VOCAB_NAME)
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"{d / VOCAB_NAME} has {len(vocab)} tokens but {d / CONFIG_NAME} says vocab_size={cfg.vocab_size}")
    model = USEModel(cfg)
    state = load_file(str(d / WEIGHTS_NAME))
    missing_k, unexpected = model.load_state_dict(state, strict=False)
    if missing_k or unexpected:
        raise ValueError(f"{d / WEIGHTS_NAME} does not match the config: missing {missing_k[:5]}, unexpected {unexpected[:5]}")
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), vocab
