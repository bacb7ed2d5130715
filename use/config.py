"""Configuration dataclasses for the USE model (SPEC §2)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

BACKENDS = ("auto", "triton", "torch", "reference")
SUP_EMBEDDINGS = ("token", "state", "joint")


@dataclass
class USEConfig:
    """The exact USE architecture. Defaults are the paper's (hidden 768, 12 layers, 12 heads)."""

    vocab_size: int
    num_events: int                 # E: FEP head width (event types = vocab ids event_offset ..)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_mult: int = 4
    dropout: float = 0.0            # on the retention branch: y = x + dropout(MSR(LN1(x)))
    pad_id: int = 3
    event_offset: int = 5
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    groupnorm_eps: float = 1e-6
    sup_dim: int = 128
    sup_embedding: str = "token"    # token | state | joint (segment embedding for SUP)
    backend: str = "auto"           # retention backend: auto | triton | torch | reference
    chunk_size: int = 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 8:
            raise ValueError(f"head dim hidden_size/num_heads = {self.head_dim} must be divisible by 8 (SPEC §2)")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.sup_embedding not in SUP_EMBEDDINGS:
            raise ValueError(f"unknown sup_embedding {self.sup_embedding!r}; expected one of {', '.join(SUP_EMBEDDINGS)}")
        if self.vocab_size <= 0 or self.num_events < 0:
            raise ValueError(f"vocab_size must be > 0 and num_events >= 0, got {self.vocab_size}, {self.num_events}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "USEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown USEConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path) -> None:
        from .io import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path) -> "USEConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def architecture_hash(self) -> str:
        """Hash of what determines the weights' meaning (not runtime choices like backend/dropout).

        Stored user states are tied to it: states from another architecture are meaningless.
        """
        runtime = {"backend", "chunk_size", "dropout", "sup_embedding"}
        arch = {k: v for k, v in sorted(self.to_dict().items()) if k not in runtime}
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
