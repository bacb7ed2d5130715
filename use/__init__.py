"""USE: stateful user embeddings from behavior sequences with a RetNet model.

- `USEConfig`, `USEModel` (use.model): the exact USE architecture with a retention backend switch.
- `use.data`: vocabulary, readers, memory-mapped corpora, batch sampling with the gather op.
- `use.train` (`use-train`), `use.embed` (`use-embed`, `UserStateStore`), `use.evals` (`use-eval`).
"""
from .config import USEConfig
from .model import USEModel, USEOutput

__all__ = ["USEConfig", "USEModel", "USEOutput", "UserStateStore"]


def __getattr__(name):
    # Imported lazily: the store pulls in the embedding machinery, which plain training doesn't need.
    if name == "UserStateStore":
        from .store import UserStateStore
        return UserStateStore
    raise AttributeError(f"module 'use' has no attribute {name!r}")
