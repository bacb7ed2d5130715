"""Token-by-token retention in Triton, for short inputs (streaming: many users, a few new events).

One program per (sequence n, head h, D_v block) keeps its state tile [D_k, BV] in registers and
applies the recurrence directly:

    S_t = γ·S_{t-1} + s·k_tᵀ v_t        o_t = q_t·S_t

All of it in float32 on CUDA cores: with a handful of tokens per user the work is bounded by
reading the initial state and writing the final one (2·H·D_k·D_v·4 bytes per user), so the
kernel is built to stream states at copy bandwidth, not to use tensor cores. The backward is the
chunk backward (same function, same gradients): `chunk_triton.chunk_retention_bwd`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunk_triton import _backward, _cast, _emulate_bf16, _num_seqs, _pow2, _prep, _seq_bounds

_MAX_STATE_TILE = 4096


@triton.jit(do_not_specialize=['T'])   # one compile for every T
def _recurrent_retention_fwd_kernel(q, k, v, o, g, h0, ht, cu_seqlens, scale, T,
                                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                    BK: tl.constexpr, BV: tl.constexpr,
                                    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                                    IS_VARLEN: tl.constexpr, EMU: tl.constexpr):
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    b_g = tl.load(g + i_h).to(tl.float32)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_state = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)

    # Compensated (Kahan) accumulation: the state takes one rounding per token, so over T tokens
    # plain adds would lose ~T roundings where a single fp32 matmul loses ~log T. The running
    # compensation b_c decays with the state. A few FLOPs per element on a kernel bound by
    # moving states.
    b_c = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(0, eos - bos):
        row = (bos + i_t) * H + i_h
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_v = tl.load(v + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_hg = b_h * b_g
        b_y = b_k[:, None] * b_v[None, :] - b_c * b_g
        b_h = b_hg + b_y
        b_c = (b_h - b_hg) - b_y
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + row * V + o_v, _cast(b_o, o.dtype.element_ty, EMU), mask=m_v)

    if STORE_FINAL_STATE:
        tl.store(ht + p_state, b_h, mask=m_state)


def recurrent_retention_fwd(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                            initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                            output_final_state: bool) -> Tuple[Tensor, Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    o = torch.empty_like(v)
    ht = q.new_empty((N, H, K, V) if output_final_state else (0,), dtype=torch.float32)
    if N == 0:
        return o, ht
    BK = _pow2(K)
    BV = min(_pow2(V), max(16, _MAX_STATE_TILE // BK))
    _recurrent_retention_fwd_kernel[(triton.cdiv(V, BV), N, H)](
        q, k, v, o, gamma, initial_state if initial_state is not None else q,
        ht if output_final_state else q, cu_seqlens if cu_seqlens is not None else q, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None, EMU=_emulate_bf16(q),
        num_warps=1 if BK * BV <= 1024 else 4)
    return o, ht


@torch.library.custom_op("use_kernels::retention_recurrent_fwd", mutates_args=())
def _recurrent_fwd_op(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                      initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                      output_final_state: bool) -> Tuple[Tensor, Tensor]:
    return recurrent_retention_fwd(q, k, v, gamma, scale, initial_state, cu_seqlens, output_final_state)


@_recurrent_fwd_op.register_fake
def _(q, k, v, gamma, scale, initial_state, cu_seqlens, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    return (v.new_empty(v.shape),
            q.new_empty((N, H, K, V) if output_final_state else (0,), dtype=torch.float32))


def _recurrent_setup(ctx, inputs, output):
    q, k, v, gamma, scale, initial_state, cu_seqlens = inputs[:7]
    ctx.save_for_backward(q, k, v, gamma, initial_state, cu_seqlens)
    ctx.scale = scale
    ctx.chunk_size = 64


def _recurrent_backward(ctx, do, dht):
    return _backward(ctx, do, dht) + (None,)


_recurrent_fwd_op.register_autograd(_recurrent_backward, setup_context=_recurrent_setup)


def recurrent_retention_triton(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                               initial_state: Optional[Tensor], output_final_state: bool,
                               cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs already validated by `ops`."""
    q, k, v, g, h0, cu = _prep(q, k, v, gamma, initial_state, cu_seqlens)
    o, ht = torch.ops.use_kernels.retention_recurrent_fwd(q, k, v, g, scale, h0, cu, output_final_state)
    return o, (ht if output_final_state else None)
