"""Chunkwise retention in Triton: forward, backward, autograd and torch.library registration.

Design (aimed at the IO floor, see PERFORMANCE.md): fla's chunk kernels write every per-chunk
state to memory and read it back in a second kernel (≈2× the minimal bytes forward, ≈6× backward).
Here each program owns one (sequence n, head h, D_v block) and walks that sequence's chunks in
order with the state [D_k, BV] held on chip, so the forward reads q, k, v once and writes o once.
The backward never stores states either: one launch holds two kinds of programs, one re-runs
the forward recurrence to get the states it needs for dq, the other runs the adjoint recurrence
from the last chunk to get dk, dv and d(initial_state). Each reads q/k/v/do once. All
accumulation is float32.

Notation per chunk (C = chunk size, rows r / columns c = position inside the chunk, L = valid
tokens in this chunk, s = scale, S = state before the chunk, G = adjoint of the state after it):

    Γ[r, c] = γ^{r-c} (r ≥ c, else 0)            decays are exp2(n · log2 γ), n ≥ 0
    o      = ((Q Kᵀ) ⊙ sΓ) V + γ^{r+1} ⊙ (Q S)
    S'     = γ^L S + (K ⊙ sγ^{L-1-c})ᵀ V

Derivatives (dA = (dO Vᵀ) ⊙ sΓ, A = (Q Kᵀ) ⊙ sΓ):

    dQ = dA K + γ^{r+1} ⊙ (dO Sᵀ)
    dK = dAᵀ Q + sγ^{L-1-c} ⊙ (V Gᵀ)
    dV = Aᵀ dO + sγ^{L-1-c} ⊙ (K G)
    G_prev = γ^L G + (γ^{r+1} ⊙ Q)ᵀ dO          G after the last chunk = d(final state),
                                                 d(initial state) = G before the first chunk
    d log γ = Σ_t t · (q_t·dq_t − k_t·dk_t) + L_seq · ⟨dS_T, S_T⟩      (t = 1-based position)

The last line: with b_t = t·log γ every term of o and S_T is exp(b_t − b_j)·(…), so ∂L/∂b_t =
q_t·dq_t − k_t·dk_t (+ ⟨dS_T, S_T⟩ at t = T), and ∂L/∂log γ = Σ_t t·∂L/∂b_t. Both backward
kernels add their share in float32 while they hold dq / dk anyway: dγ costs no extra pass.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Registers hold the state tile [BK, BV] in float32: at most 8192 elements (32 KiB) per program.
_MAX_STATE_TILE = 8192


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: tf32x3 (three TF32 tensor-core products, ~fp32 accuracy; plain TF32 would cost
    # ~1e-3 relative error, and "ieee" FMA dots take minutes to compile). bf16/fp16 dots use the
    # tensor cores with fp32 accumulation (the precision flag only affects fp32 operands).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _num_warps(bk: int, bv: int) -> int:
    return 4 if bk * bv <= 4096 else 8


def _num_stages(bt: int, bk: int, bv: int, elsize: int) -> int:
    # Software-pipelining depth of the chunk loop: each stage buffers the q/k/v(/do) tiles in
    # shared memory (~bt·2·(bk+bv)·elsize bytes). An H100/H200 SM has 227 KiB; fp32 at D=128 with
    # three stages needs 256 KiB and would fail to launch. Keep ≤ 160 KiB of staged tiles.
    stage = bt * 2 * (bk + bv) * elsize
    for ns in (3, 2):
        if ns * stage <= 160 * 1024:
            return ns
    return 1


def _emulate_bf16(x: Tensor) -> bool:
    # The Triton interpreter (TRITON_INTERPRET=1, the CPU test path) keeps bf16 as raw uint16:
    # tl.dot on bf16 operands multiplies the bit patterns, and fp32 -> bf16 casts truncate.
    # With this flag the kernels round to bf16 by hand (nearest even, as the GPU does) and feed
    # the rounded values to an fp32 dot: the same numbers a GPU bf16 dot sees, accumulated in fp32.
    return x.dtype == torch.bfloat16 and x.device.type != "cuda"


@triton.jit
def _cast(x, dtype: tl.constexpr, EMU: tl.constexpr):
    """x.to(dtype); under EMU round an fp32 tile to bf16 by hand (round to nearest even)."""
    if EMU:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, EMU: tl.constexpr):
    if EMU:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _dot_f32(a, b, A_F32: tl.constexpr, dt: tl.constexpr, DOT_PREC: tl.constexpr, EMU: tl.constexpr):
    """a @ b where one operand (a if A_F32 else b) is an fp32 tile and the other is in dt, at
    ~fp32 accuracy: the fp32 operand is split into dt pieces x = x1 + x2 (+ x3), each a plain dt
    dot with fp32 accumulation (the pieces and the other operand are exact in dt, so every product
    is exact). bf16 needs three pieces (3 × 8 bits ≥ fp32's 24), fp16 two (2 × 11); the tiles stay
    16-bit, where an fp32 tf32x3 dot would cost ~6 bf16 dots and double the operand registers.
    Used where a float32 state meets the inputs and the result is not rounded to dt right after
    (bf16, T=100, chunk 16, errors against float64 before → after, plain PyTorch in brackets):
      - state updates, k ⊙ sγ^{L-1-c} and dO ⊙ γ^{r+1} (forward and both backward sweeps, so the
        dq sweep recomputes exactly the forward's states): final state 1.2e-2 → 1.6e-6 [1.6e-6],
        d(initial state) 7.0e-2 → 5.7e-6 [1.0e-5];
      - dO Sᵀ and V Gᵀ in dq / dk, which feed dγ = Σ t·(q·dq − k·dk) in fp32 before dq, dk are
        rounded: dγ 1.3e2 → 1.3 [2.9e1].
    Q S in o and K G in dv are rounded to dt at once and keep the single dt dot."""
    if dt == tl.float32:
        return _dot(a, b, DOT_PREC, EMU)
    x = a if A_F32 else b
    x1 = _cast(x, dt, EMU)
    r = x - x1.to(tl.float32)
    x2 = _cast(r, dt, EMU)
    if A_F32:
        acc = _dot(x2, b, DOT_PREC, EMU)
    else:
        acc = _dot(a, x2, DOT_PREC, EMU)
    if dt == tl.bfloat16:
        x3 = _cast(r - x2.to(tl.float32), dt, EMU)
        if A_F32:
            acc += _dot(x3, b, DOT_PREC, EMU)
        else:
            acc += _dot(a, x3, DOT_PREC, EMU)
    if A_F32:
        acc += _dot(x1, b, DOT_PREC, EMU)
    else:
        acc += _dot(a, x1, DOT_PREC, EMU)
    return acc


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


# ------------------------------------------------------------------------------------------------
# forward: o = ((Q Kᵀ) ⊙ sΓ) V + γ^{r+1} ⊙ (Q S);  S ← γ^L S + (K ⊙ sγ^{L-1-c})ᵀ V
# grid (NV, N, H); the state tile [BK ⊇ D_k, BV] stays in registers across the chunks.
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=['T'])   # one compile for every T
def _chunk_retention_fwd_kernel(q, k, v, o, g, h0, ht, cu_seqlens, scale, T,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                                IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, EMU: tl.constexpr):
    dt = q.dtype.element_ty
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    log2g = tl.log2(tl.load(g + i_h).to(tl.float32))

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    d_q = tl.exp2((o_t + 1).to(tl.float32) * log2g)                               # γ^{r+1}
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    d_qk = tl.where(diff >= 0, tl.exp2(tl.maximum(diff, 0.0) * log2g), 0.0) * scale  # sΓ

    p_state = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)

    for i_c in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_c * BT
        n_valid = tl.minimum(eos - t0, BT).to(tl.int32)
        m_t = o_t < n_valid
        rows = (t0 + o_t).to(tl.int64) * H + i_h
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)

        b_a = _dot(b_q, tl.trans(b_k), DOT_PREC, EMU) * d_qk          # [BT, BT]
        b_o = _dot(_cast(b_a, dt, EMU), b_v, DOT_PREC, EMU)
        b_o += _dot(b_q, _cast(b_h, dt, EMU), DOT_PREC, EMU) * d_q[:, None]
        tl.store(o + rows[:, None] * V + o_v[None, :], _cast(b_o, o.dtype.element_ty, EMU),
                 mask=m_t[:, None] & m_v[None, :])

        d_k = tl.where(m_t, tl.exp2((n_valid - 1 - o_t).to(tl.float32) * log2g), 0.0) * scale
        b_h = b_h * tl.exp2(n_valid.to(tl.float32) * log2g) + _dot_f32(
            tl.trans(b_k * d_k[:, None]), b_v, True, dt, DOT_PREC, EMU)

    if STORE_FINAL_STATE:
        tl.store(ht + p_state, b_h, mask=m_state)


# ------------------------------------------------------------------------------------------------
# backward, role 1 (forward sweep, recomputes S): dQ = dA K + γ^{r+1} ⊙ (dO Sᵀ)
# one program per (D_k block, n, h); state tile [BK, BV ⊇ D_v].
# Writes Σ t·q_t·dq_t (+ L·⟨dS_T, S_T⟩) to its d log γ slot.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dq_sweep(q, k, v, do, dq, g, h0, dht, dlg, cu_seqlens, scale, T, i_k, i_slot, i_n, i_h,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
                  IS_VARLEN: tl.constexpr, DGAMMA: tl.constexpr, DOT_PREC: tl.constexpr, EMU: tl.constexpr):
    dt = q.dtype.element_ty
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    log2g = tl.log2(tl.load(g + i_h).to(tl.float32))

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    d_q = tl.exp2((o_t + 1).to(tl.float32) * log2g)
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    d_qk = tl.where(diff >= 0, tl.exp2(tl.maximum(diff, 0.0) * log2g), 0.0) * scale

    p_state = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)
    b_lg = tl.zeros([BT], dtype=tl.float32)

    for i_c in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_c * BT
        n_valid = tl.minimum(eos - t0, BT).to(tl.int32)
        m_t = o_t < n_valid
        rows = (t0 + o_t).to(tl.int64) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)

        b_da = _dot(b_do, tl.trans(b_v), DOT_PREC, EMU) * d_qk           # [BT, BT]
        b_dq = _dot(_cast(b_da, dt, EMU), b_k, DOT_PREC, EMU)
        b_dq += _dot_f32(b_do, tl.trans(b_h), False, dt, DOT_PREC, EMU) * d_q[:, None]
        tl.store(dq + rows[:, None] * K + o_k[None, :], _cast(b_dq, dq.dtype.element_ty, EMU), mask=m_tk)
        if DGAMMA:
            b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
            pos = (i_c * BT + o_t + 1).to(tl.float32)
            b_lg += pos * tl.sum(b_q * b_dq, axis=1)

        d_k = tl.where(m_t, tl.exp2((n_valid - 1 - o_t).to(tl.float32) * log2g), 0.0) * scale
        b_h = b_h * tl.exp2(n_valid.to(tl.float32) * log2g) + _dot_f32(
            tl.trans(b_k * d_k[:, None]), b_v, True, dt, DOT_PREC, EMU)

    if DGAMMA:
        lg = tl.sum(b_lg, axis=0)
        if USE_FINAL_STATE_GRAD:
            b_dht = tl.load(dht + p_state, mask=m_state, other=0.0)
            lg += (eos - bos).to(tl.float32) * tl.sum(tl.sum(b_dht * b_h, axis=1), axis=0)
        tl.store(dlg + (i_slot * tl.num_programs(1) + i_n) * H + i_h, lg)


# ------------------------------------------------------------------------------------------------
# backward, role 2 (reverse sweep over chunks, adjoint state G):
#   dV = Aᵀ dO + sγ^{L-1-c} ⊙ (K G);   dK = dAᵀ Q + sγ^{L-1-c} ⊙ (V Gᵀ);   G ← γ^L G + (γ^{r+1} ⊙ Q)ᵀ dO
# one program per (D_v block, n, h); adjoint tile [BK ⊇ D_k, BV]. dK is partial over the D_v
# blocks when NV > 1 (summed by the launcher). Writes −Σ t·k_t·dk_t to its d log γ slot.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dkv_sweep(q, k, v, do, dk, dv, dh0, g, dht, dlg, cu_seqlens, scale, T, stride_dk_nv, i_v, i_slot, i_n, i_h,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   STORE_DH0: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
                   IS_VARLEN: tl.constexpr, DGAMMA: tl.constexpr, DOT_PREC: tl.constexpr, EMU: tl.constexpr):
    dt = q.dtype.element_ty
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    log2g = tl.log2(tl.load(g + i_h).to(tl.float32))

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    d_q = tl.exp2((o_t + 1).to(tl.float32) * log2g)
    diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    d_qk = tl.where(diff >= 0, tl.exp2(tl.maximum(diff, 0.0) * log2g), 0.0) * scale

    p_state = (i_n * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        b_dh += tl.load(dht + p_state, mask=m_state, other=0.0).to(tl.float32)
    b_lg = tl.zeros([BT], dtype=tl.float32)
    dk_base = dk + i_v.to(tl.int64) * stride_dk_nv          # partial dk of this D_v block

    NT = tl.cdiv(eos - bos, BT)
    for j in range(0, NT):
        i_c = NT - 1 - j
        t0 = bos + i_c * BT
        n_valid = tl.minimum(eos - t0, BT).to(tl.int32)
        m_t = o_t < n_valid
        rows = (t0 + o_t).to(tl.int64) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        d_k = tl.where(m_t, tl.exp2((n_valid - 1 - o_t).to(tl.float32) * log2g), 0.0) * scale

        b_a = _dot(b_q, tl.trans(b_k), DOT_PREC, EMU) * d_qk             # [BT, BT]
        b_dv = _dot(_cast(tl.trans(b_a), dt, EMU), b_do, DOT_PREC, EMU)
        b_dv += _dot(b_k, _cast(b_dh, dt, EMU), DOT_PREC, EMU) * d_k[:, None]
        tl.store(dv + rows[:, None] * V + o_v[None, :], _cast(b_dv, dv.dtype.element_ty, EMU), mask=m_tv)

        b_da = _dot(b_do, tl.trans(b_v), DOT_PREC, EMU) * d_qk
        b_dk = _dot(_cast(tl.trans(b_da), dt, EMU), b_q, DOT_PREC, EMU)
        b_dk += _dot_f32(b_v, tl.trans(b_dh), False, dt, DOT_PREC, EMU) * d_k[:, None]
        tl.store(dk_base + rows[:, None] * K + o_k[None, :], _cast(b_dk, dk.dtype.element_ty, EMU), mask=m_tk)
        if DGAMMA:
            pos = (i_c * BT + o_t + 1).to(tl.float32)
            b_lg -= pos * tl.sum(b_k.to(tl.float32) * b_dk, axis=1)

        b_dh = b_dh * tl.exp2(n_valid.to(tl.float32) * log2g) + _dot_f32(
            tl.trans(b_q), b_do * d_q[:, None], False, dt, DOT_PREC, EMU)

    if STORE_DH0:
        tl.store(dh0 + p_state, b_dh, mask=m_state)
    if DGAMMA:
        tl.store(dlg + (i_slot * tl.num_programs(1) + i_n) * H + i_h, tl.sum(b_lg, axis=0))


# ------------------------------------------------------------------------------------------------
# backward: both sweeps in one launch. grid (NK + NV, N, H): programs 0..NK-1 run the dq sweep,
# NK..NK+NV-1 the dk/dv sweep. They are independent (each reads q, k, v, do once), so one launch
# doubles the parallelism of the backward at no extra traffic (B·H programs alone do not fill
# an H200's 132 SMs at B=8, H=12).
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=['T', 'stride_dk_nv'])   # one compile for every T
def _chunk_retention_bwd_kernel(q, k, v, do, dq, dk, dv, dh0, g, h0, dht, dlg, cu_seqlens, scale, T, stride_dk_nv,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                                NK: tl.constexpr, BK_Q: tl.constexpr, BV_Q: tl.constexpr,
                                BK_KV: tl.constexpr, BV_KV: tl.constexpr,
                                USE_INITIAL_STATE: tl.constexpr, STORE_DH0: tl.constexpr,
                                USE_FINAL_STATE_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
                                DGAMMA: tl.constexpr, DOT_PREC: tl.constexpr, EMU: tl.constexpr):
    i_b, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if i_b < NK:
        _bwd_dq_sweep(q, k, v, do, dq, g, h0, dht, dlg, cu_seqlens, scale, T, i_b, i_b, i_n, i_h,
                      H, K, V, BT, BK_Q, BV_Q, USE_INITIAL_STATE, USE_FINAL_STATE_GRAD, IS_VARLEN,
                      DGAMMA, DOT_PREC, EMU)
    else:
        _bwd_dkv_sweep(q, k, v, do, dk, dv, dh0, g, dht, dlg, cu_seqlens, scale, T, stride_dk_nv, i_b - NK, i_b,
                       i_n, i_h, H, K, V, BT, BK_KV, BV_KV, STORE_DH0, USE_FINAL_STATE_GRAD, IS_VARLEN,
                       DGAMMA, DOT_PREC, EMU)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def _num_seqs(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def chunk_retention_fwd(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
                        output_final_state: bool) -> Tuple[Tensor, Tensor]:
    """Returns o [B, T, H, D_v] and the final states [N, H, D_k, D_v] float32 ([0] if not asked)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    o = torch.empty_like(v)
    ht = q.new_empty((N, H, K, V) if output_final_state else (0,), dtype=torch.float32)
    if q.numel() == 0 or N == 0:
        if output_final_state:
            ht.copy_(initial_state) if initial_state is not None else ht.zero_()
        return o, ht
    BK = _pow2(K)
    BV = min(_pow2(V), max(16, _MAX_STATE_TILE // BK))
    if q.is_cuda:
        # Fewer (sequence, head) pairs than SMs: split D_v further so every SM gets a program.
        # Each D_v block re-reads q and k, but the blocks of one (n, h) run together and hit L2.
        sms = _sm_count(q.device)
        while BV > 32 and N * H * triton.cdiv(V, BV) < sms:
            BV //= 2
    grid = (triton.cdiv(V, BV), N, H)
    _chunk_retention_fwd_kernel[grid](
        q, k, v, o, gamma, initial_state if initial_state is not None else q, ht if output_final_state else q,
        cu_seqlens if cu_seqlens is not None else q, scale, T,
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None, DOT_PREC=_dot_precision(q.dtype), EMU=_emulate_bf16(q),
        num_warps=_num_warps(BK, BV), num_stages=_num_stages(chunk_size, BK, BV, q.element_size()))
    return o, ht


def chunk_retention_bwd(q: Tensor, k: Tensor, v: Tensor, do: Tensor, gamma: Tensor, scale: float,
                        initial_state: Optional[Tensor], dht: Optional[Tensor], cu_seqlens: Optional[Tensor],
                        chunk_size: int, need_dh0: bool, need_dgamma: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv (input dtype), d initial_state ([N, H, D_k, D_v] float32, or [0]) and dγ
    (float32 [H], zeros unless need_dgamma)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    dq = torch.empty_like(q)
    dv = torch.empty_like(v)
    dh0 = q.new_empty((N, H, K, V) if need_dh0 else (0,), dtype=torch.float32)
    dgamma = q.new_zeros((H,), dtype=torch.float32)
    if q.numel() == 0 or N == 0:
        if need_dh0:
            dh0.copy_(dht) if dht is not None else dh0.zero_()
        return dq, torch.empty_like(k), dv, dh0, dgamma
    dummy = q
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else dummy
    prec = _dot_precision(q.dtype)

    # dq sweep: state tile [BK, whole D_v]; dk/dv sweep: adjoint tile [whole D_k, BV]
    BV_Q = _pow2(V)
    BK_Q = min(_pow2(K), max(16, _MAX_STATE_TILE // BV_Q))
    NK = triton.cdiv(K, BK_Q)
    BK_KV = _pow2(K)
    BV_KV = min(_pow2(V), max(16, _MAX_STATE_TILE // BK_KV))
    NV = triton.cdiv(V, BV_KV)
    dk = torch.empty_like(k) if NV == 1 else q.new_empty((NV,) + tuple(k.shape), dtype=torch.float32)
    dlg = q.new_empty((NK + NV, N, H) if need_dgamma else (0,), dtype=torch.float32)
    _chunk_retention_bwd_kernel[(NK + NV, N, H)](
        q, k, v, do, dq, dk, dv, dh0 if need_dh0 else dummy, gamma,
        initial_state if initial_state is not None else dummy, dht if dht is not None else dummy,
        dlg if need_dgamma else dummy, cu, scale, T, k.numel() if NV > 1 else 0,
        H=H, K=K, V=V, BT=chunk_size, NK=NK, BK_Q=BK_Q, BV_Q=BV_Q, BK_KV=BK_KV, BV_KV=BV_KV,
        USE_INITIAL_STATE=initial_state is not None, STORE_DH0=need_dh0,
        USE_FINAL_STATE_GRAD=dht is not None, IS_VARLEN=varlen, DGAMMA=need_dgamma,
        DOT_PREC=prec, EMU=_emulate_bf16(q), num_warps=_num_warps(max(BK_Q, BK_KV), max(BV_Q, BV_KV)),
        num_stages=_num_stages(chunk_size, max(BK_Q, BK_KV), max(BV_Q, BV_KV), q.element_size()))
    if NV > 1:
        dk = dk.sum(0).to(k.dtype)
    if need_dgamma:
        dgamma = dlg.sum((0, 1)) / gamma.float()
    return dq, dk, dv, dh0, dgamma


# ------------------------------------------------------------------------------------------------
# torch.library registration: opaque custom ops with fake (meta) implementations, so that
# torch.compile(fullgraph=True) traces through on every device (TOOLCHAIN.md: triton_op breaks
# under the interpreter on CPU), and autograd wired with register_autograd.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("use_kernels::retention_chunk_fwd", mutates_args=())
def _chunk_fwd_op(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                  initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
                  output_final_state: bool) -> Tuple[Tensor, Tensor]:
    return chunk_retention_fwd(q, k, v, gamma, scale, initial_state, cu_seqlens, chunk_size, output_final_state)


@_chunk_fwd_op.register_fake
def _(q, k, v, gamma, scale, initial_state, cu_seqlens, chunk_size, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    return (v.new_empty(v.shape),
            q.new_empty((N, H, K, V) if output_final_state else (0,), dtype=torch.float32))


@torch.library.custom_op("use_kernels::retention_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, do: Tensor, gamma: Tensor, scale: float,
            initial_state: Optional[Tensor], dht: Optional[Tensor], cu_seqlens: Optional[Tensor],
            chunk_size: int, need_dh0: bool, need_dgamma: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return chunk_retention_bwd(q, k, v, do, gamma, scale, initial_state, dht, cu_seqlens, chunk_size,
                               need_dh0, need_dgamma)


@_bwd_op.register_fake
def _(q, k, v, do, gamma, scale, initial_state, dht, cu_seqlens, chunk_size, need_dh0, need_dgamma):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((N, H, K, V) if need_dh0 else (0,), dtype=torch.float32),
            q.new_empty((H,), dtype=torch.float32))


def _chunk_setup(ctx, inputs, output):
    q, k, v, gamma, scale, initial_state, cu_seqlens, chunk_size = inputs[:8]
    ctx.save_for_backward(q, k, v, gamma, initial_state, cu_seqlens)
    ctx.scale = scale
    ctx.chunk_size = chunk_size


def _backward(ctx, do, dht):
    q, k, v, gamma, initial_state, cu_seqlens = ctx.saved_tensors
    need_dgamma = ctx.needs_input_grad[3]
    need_dh0 = initial_state is not None and ctx.needs_input_grad[5]
    if dht is not None and dht.numel() == 0:
        dht = None
    if dht is not None:
        dht = dht.contiguous()
    do = do.to(v.dtype).contiguous()          # tl.dot needs both operands in one dtype
    dq, dk, dv, dh0, dgamma = _bwd_op(q, k, v, do, gamma, ctx.scale, initial_state, dht,
                                      cu_seqlens, ctx.chunk_size, need_dh0, need_dgamma)
    return (dq, dk, dv, dgamma.to(gamma.dtype) if need_dgamma else None, None,
            dh0 if need_dh0 else None, None)


def _chunk_backward(ctx, do, dht):
    return _backward(ctx, do, dht) + (None, None)


_chunk_fwd_op.register_autograd(_chunk_backward, setup_context=_chunk_setup)


def _prep(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, initial_state: Optional[Tensor],
          cu_seqlens: Optional[Tensor]):
    """Contiguous inputs; gamma and the initial state in float32 (the kernels' state dtype)."""
    h0 = initial_state
    if h0 is not None and (h0.dtype != torch.float32 or not h0.is_contiguous()):
        h0 = h0.float().contiguous()
    g = gamma if gamma.dtype == torch.float32 and gamma.is_contiguous() else gamma.float().contiguous()
    return (q.contiguous(), k.contiguous(), v.contiguous(), g, h0,
            None if cu_seqlens is None else cu_seqlens.contiguous())


def chunk_retention_triton(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                           initial_state: Optional[Tensor], output_final_state: bool,
                           cu_seqlens: Optional[Tensor], chunk_size: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs already validated by `ops`."""
    q, k, v, g, h0, cu = _prep(q, k, v, gamma, initial_state, cu_seqlens)
    o, ht = torch.ops.use_kernels.retention_chunk_fwd(q, k, v, g, scale, h0, cu, chunk_size, output_final_state)
    return o, (ht if output_final_state else None)
