"""Pure-PyTorch references for retention (SPEC §1).

`retention_ref` is the recurrence itself, token by token: the ground truth (run it in float64).
`parallel_retention_ref` is the published USE approach: a materialised [B, H, T, T] decay mask.
It is O(T²) in time and memory and exists as the benchmark baseline.

    S_0 = initial_state (zeros if none)          S_t: [D_k, D_v]
    S_t = γ · S_{t-1} + s · k_tᵀ v_t
    o_t = q_t · S_t
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def default_decay(num_heads: int) -> Tensor:
    """USE's per-head decay: γ_h = 1 - exp(x_h), x = linspace(ln(1/32), ln(1/512), H). float32 [H]."""
    x = torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
    return (1 - torch.exp(x)).to(torch.float32)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequences(q: Tensor, cu_seqlens: Optional[Tensor]):
    """Yields (batch index, start, end) for every sequence: rows of a batch, or cu_seqlens pieces."""
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            yield b, 0, q.shape[1]
    else:
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            yield 0, bounds[n], bounds[n + 1]


def retention_ref(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, scale: Optional[float] = None,
                  initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                  cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The recurrence, one token at a time. q, k: [B, T, H, D_k]; v: [B, T, H, D_v]; gamma: [H].

    Returns o [B, T, H, D_v] (input dtype) and, if asked, the final states [N, H, D_k, D_v]
    (float32, or float64 for float64 inputs). Differentiable in every input.
    """
    B, T, H, D_k = q.shape
    D_v = v.shape[-1]
    s = D_k ** -0.5 if scale is None else scale
    sd = _state_dtype(q.dtype)
    g = gamma.to(sd).view(H, 1, 1)
    outs = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, t0, t1) in enumerate(_sequences(q, cu_seqlens)):
        S = (initial_state[n].to(sd) if initial_state is not None
             else q.new_zeros(H, D_k, D_v, dtype=sd))
        for t in range(t0, t1):
            kv = k[b, t].to(sd).unsqueeze(-1) * v[b, t].to(sd).unsqueeze(-2)  # [H, D_k, D_v]
            S = g * S + s * kv
            outs[b][t] = torch.einsum("hk,hkv->hv", q[b, t].to(sd), S)
        finals.append(S)
    o = torch.stack([torch.stack([outs[b][t] if outs[b][t] is not None else q.new_zeros(H, D_v, dtype=sd)
                                  for t in range(T)]) for b in range(B)]) if T > 0 else q.new_zeros(B, 0, H, D_v, dtype=sd)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def parallel_retention_ref(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, scale: Optional[float] = None,
                           initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                           cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The published approach: o = ((q kᵀ) ⊙ D) v with D[t, j] = γ^(t-j) for j ≤ t, materialised.

    Same contract as `retention_ref`. Computes in float32 (float64 for float64 inputs).
    """
    if cu_seqlens is not None:
        outs, finals = [], []
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            sl = slice(bounds[n], bounds[n + 1])
            o_n, f_n = parallel_retention_ref(
                q[:, sl], k[:, sl], v[:, sl], gamma, scale=scale,
                initial_state=None if initial_state is None else initial_state[n:n + 1],
                output_final_state=output_final_state)
            outs.append(o_n)
            finals.append(f_n)
        o = torch.cat(outs, dim=1) if outs else torch.zeros_like(v)
        return o, (torch.cat(finals) if output_final_state else None)

    B, T, H, D_k = q.shape
    s = D_k ** -0.5 if scale is None else scale
    sd = _state_dtype(q.dtype)
    qf, kf, vf = (x.to(sd).transpose(1, 2) for x in (q, k, v))        # [B, H, T, D]
    log_g = torch.log(gamma.to(sd)).view(H, 1, 1)                       # [H, 1, 1]
    idx = torch.arange(T, device=q.device, dtype=sd)
    diff = idx.view(T, 1) - idx.view(1, T)                              # t - j
    causal = diff >= 0
    decay = torch.where(causal, torch.exp(log_g * diff.clamp(min=0)), torch.zeros((), dtype=sd, device=q.device))  # [H, T, T]
    attn = torch.einsum("bhtd,bhjd->bhtj", qf, kf) * decay * s          # [B, H, T, T]
    o = torch.einsum("bhtj,bhjv->bhtv", attn, vf)                       # [B, H, T, D_v]
    g_pow = torch.exp(log_g.view(H, 1) * (idx + 1).view(1, T))          # γ^(t+1), [H, T]
    if initial_state is not None:
        S0 = initial_state.to(sd)                                        # [B, H, D_k, D_v]
        o = o + g_pow.view(1, H, T, 1) * torch.einsum("bhtk,bhkv->bhtv", qf, S0)
    final = None
    if output_final_state:
        w = torch.exp(log_g.view(H, 1) * (T - 1 - idx).view(1, T)) * s   # γ^(T-1-j) s, [H, T]
        final = torch.einsum("bhtk,bhtv->bhkv", kf * w.view(1, H, T, 1), vf)
        if initial_state is not None:
            final = final + (gamma.to(sd) ** T).view(1, H, 1, 1) * initial_state.to(sd)
        if sd != torch.float64:
            final = final.float()
    return o.transpose(1, 2).to(q.dtype), final
