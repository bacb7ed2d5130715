"""Public retention entry points. PLACEHOLDER: routes every backend to the references until the
kernels land (owned by the retention work)."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .ref import parallel_retention_ref, retention_ref


def chunk_retention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, scale: Optional[float] = None,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64,
                    backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    return parallel_retention_ref(q, k, v, gamma, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def recurrent_retention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, scale: Optional[float] = None,
                        initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[Tensor] = None, backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    return retention_ref(q, k, v, gamma, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
