"""Retention: chunkwise (Triton / PyTorch) and recurrent kernels, plus the references."""
from .ref import default_decay, parallel_retention_ref, retention_ref
from .ops import chunk_retention, recurrent_retention, set_debug_checks

__all__ = ["chunk_retention", "recurrent_retention", "retention_ref", "parallel_retention_ref", "default_decay",
           "set_debug_checks"]
