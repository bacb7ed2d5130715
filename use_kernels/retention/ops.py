"""Public retention entry points: argument checks and backend dispatch.

Backends
- "triton":    fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
- "torch":     chunkwise pure PyTorch (`chunk_torch.py`): O(T) memory, differentiable, the CPU path.
- "reference": `parallel_retention_ref`, the published O(T²) materialised-mask form.
- "auto":      triton for CUDA tensors, torch otherwise.

Value checks and host synchronisation. Checking *values* (gamma in (0, 1), cu_seqlens starting at
0, non-decreasing and ending at T) needs them on the host; on a CUDA tensor that is a device->host
copy that stalls the stream and breaks CUDA-graph capture. So shapes, dtypes and devices are
always checked, values are checked when the tensor lives on the CPU (free), and on CUDA only when
debug checks are on: `USE_KERNELS_DEBUG=1` in the environment or `set_debug_checks(True)`.
Inside torch.compile tracing value checks are skipped (they would break the graph); check the
inputs eagerly once, or turn debug checks on and run eagerly, when the data is untrusted.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .chunk_torch import chunk_retention_torch
from .ref import parallel_retention_ref

_DEBUG = os.environ.get("USE_KERNELS_DEBUG", "0") not in ("", "0", "false", "False")
_BACKENDS = ("auto", "triton", "torch", "reference")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def set_debug_checks(enabled: bool) -> None:
    """Turn on value checks of gamma and cu_seqlens for CUDA tensors too (costs a host sync)."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_checks_enabled() -> bool:
    return _DEBUG


def _check_values(t: Tensor) -> bool:
    # Under torch.compile tracing values are symbolic: a check would be a graph break.
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _DEBUG


def _validate(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: Optional[float],
              initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], backend: str,
              name: str) -> Tuple[str, float, int]:
    """Checks every argument; returns (resolved backend, scale, N)."""
    for x, nm in ((q, "q"), (k, "k"), (v, "v"), (gamma, "gamma")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: {nm} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [B, T, H, D]; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"{name}: q and k must have the same shape [B, T, H, D_k]; got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: v must be [B, T, H, D_v] with q's B, T, H; got "
                         f"q{tuple(q.shape)} v{tuple(v.shape)}")
    B, T, H, D_k = q.shape
    D_v = v.shape[-1]
    if D_k == 0 or D_v == 0 or H == 0:
        raise ValueError(f"{name}: H, D_k and D_v must be positive; got q{tuple(q.shape)} v{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype must be one of bf16, fp16, fp32, fp64; got {q.dtype}")
    dev = q.device
    tensors = [("k", k), ("v", v), ("gamma", gamma)]
    if initial_state is not None:
        tensors.append(("initial_state", initial_state))
    if cu_seqlens is not None:
        tensors.append(("cu_seqlens", cu_seqlens))
    for nm, x in tensors:
        if x.device != dev:
            raise ValueError(f"{name}: all tensors must be on one device; q is on {dev}, {nm} on {x.device}")

    if not gamma.is_floating_point() or gamma.dim() != 1 or gamma.shape[0] != H:
        raise ValueError(f"{name}: gamma must be a float tensor [H={H}]; got {gamma.dtype} {tuple(gamma.shape)}")
    if _check_values(gamma):
        g = gamma.detach()
        if not bool(((g > 0) & (g < 1)).all()):
            raise ValueError(f"{name}: every gamma must lie in (0, 1); got min {g.min().item():.6g}, "
                             f"max {g.max().item():.6g}")

    if cu_seqlens is not None:
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{name}: cu_seqlens must be an int32 tensor [N+1] with N >= 1; got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"{name}: with cu_seqlens the batch must be packed as B == 1; got B={B}")
        if _check_values(cu_seqlens):
            c = cu_seqlens.detach().cpu()
            if c[0].item() != 0 or c[-1].item() != T or bool((c[1:] < c[:-1]).any()):
                raise ValueError(f"{name}: cu_seqlens must start at 0, be non-decreasing and end at "
                                 f"T={T}; got {c.tolist()[:8]}{'...' if c.numel() > 8 else ''}")
        N = cu_seqlens.shape[0] - 1
    else:
        N = B

    if initial_state is not None:
        if not initial_state.is_floating_point() or tuple(initial_state.shape) != (N, H, D_k, D_v):
            raise ValueError(f"{name}: initial_state must be a float tensor [N={N}, H={H}, D_k={D_k}, "
                             f"D_v={D_v}]; got {initial_state.dtype} {tuple(initial_state.shape)}")

    if scale is None:
        scale = D_k ** -0.5
    scale = float(scale)

    if backend not in _BACKENDS:
        raise ValueError(f"{name}: backend must be one of {_BACKENDS}; got {backend!r}")
    if backend == "auto":
        backend = "triton" if dev.type == "cuda" else "torch"
    if backend == "triton":
        if q.dtype == torch.float64:
            raise TypeError(f"{name}: the triton backend takes bf16, fp16 or fp32; use backend='torch' "
                            f"or 'reference' for float64")
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"{name}: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set "
                               f"before triton is imported, to run on the CPU); got {dev}")
        if D_k > 256 or D_v > 256:
            raise ValueError(f"{name}: the triton backend supports D_k, D_v <= 256; got {D_k}, {D_v}")
    return backend, scale, N


def chunk_retention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, scale: Optional[float] = None,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64,
                    backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """Chunkwise retention (SPEC §1). q, k: [B, T, H, D_k]; v: [B, T, H, D_v]; gamma: [H] in (0, 1).

    Returns o [B, T, H, D_v] in the input dtype and, when `output_final_state`, the final states
    [N, H, D_k, D_v] (float32; float64 for float64 inputs). With `cu_seqlens` (int32 [N+1], B == 1)
    every sequence starts from its own `initial_state[n]` and ends in its own final state.
    Differentiable in q, k, v, initial_state and gamma on every backend.
    """
    backend, scale, _ = _validate(q, k, v, gamma, scale, initial_state, cu_seqlens, backend,
                                  "chunk_retention")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_retention: chunk_size must be a positive int; got {chunk_size!r}")
    if backend == "reference":
        return parallel_retention_ref(q, k, v, gamma, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if backend == "torch":
        return chunk_retention_torch(q, k, v, gamma, scale, initial_state, output_final_state,
                                     cu_seqlens, chunk_size)
    if chunk_size < 16 or chunk_size > 128 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_retention: the triton backend needs a power-of-two chunk_size in [16, 128]; "
                         f"got {chunk_size}")
    if q.dtype == torch.float32 and max(q.shape[-1], v.shape[-1]) > 128 and chunk_size > 64:
        # fp32 tiles of [128, 256] would need more shared memory than an SM has (227 KiB)
        raise ValueError(f"chunk_retention: the triton backend takes chunk_size <= 64 for float32 with "
                         f"D > 128; got {chunk_size}")
    from .chunk_triton import chunk_retention_triton
    return chunk_retention_triton(q, k, v, gamma, scale, initial_state, output_final_state,
                                  cu_seqlens, chunk_size)


def recurrent_retention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, scale: Optional[float] = None,
                        initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[Tensor] = None, backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """Token-by-token retention for short inputs (streaming: many users, a few new events each).

    Same contract and results as `chunk_retention`. The triton backend is one fused kernel per
    (sequence, head, D_v block) holding the state in registers; its backward is the chunk one.
    The torch backend runs the chunkwise code (one chunk covers a short input: the parallel form).
    """
    backend, scale, _ = _validate(q, k, v, gamma, scale, initial_state, cu_seqlens, backend,
                                  "recurrent_retention")
    if backend == "reference":
        return parallel_retention_ref(q, k, v, gamma, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if backend == "torch":
        return chunk_retention_torch(q, k, v, gamma, scale, initial_state, output_final_state,
                                     cu_seqlens, 64)
    from .recurrent import recurrent_retention_triton
    return recurrent_retention_triton(q, k, v, gamma, scale, initial_state, output_final_state, cu_seqlens)
