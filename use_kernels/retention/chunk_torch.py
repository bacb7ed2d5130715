"""Chunkwise retention in pure PyTorch: the CPU path (and the fallback anywhere), differentiable.

Sequences are cut into chunks of C tokens. Inside a chunk the parallel form is used with a decay
mask that depends only on (row, column) and so is one `[H, C, C]` tensor for all chunks; across
chunks a state `[H, D_k, D_v]` is carried:

    o_i      = ((Q_i K_iᵀ) ⊙ s·Γ) V_i + (Q_i ⊙ γ^{r+1}) S_i          Γ[r, c] = γ^{r-c} (r ≥ c)
    S_{i+1}  = γ^{L_i} S_i + (K_i ⊙ s·γ^{L_i-1-c})ᵀ V_i             L_i = valid tokens of chunk i

Work is O(T·C·D + T·D²) and memory O(T·C + (T/C)·D²) instead of the reference's O(T²).
Every decay is `exp(n · log γ)` with n ≥ 0 (never a division by a decay: nothing overflows).

Variable length (cu_seqlens): every sequence is cut into its own chunks (the last one partial),
all chunks of all sequences go into one flat list (the intra-chunk part is one batched matmul),
and the state scan walks chunk index j = 0, 1, … over the sequences that still have a chunk j.
Sorting sequences by chunk count makes that active set a prefix, so each step is a slice.
Padding slots read a zero row and are never gathered back: no padding token touches a state.
Gradients (q, k, v, initial_state and gamma) come from autograd through these ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_retention_torch(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float,
                          initial_state: Optional[Tensor], output_final_state: bool,
                          cu_seqlens: Optional[Tensor], chunk_size: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs already validated by `ops`. Returns (o in q's dtype, final state or None)."""
    B, T, H, D_k = q.shape
    D_v = v.shape[-1]
    C = int(chunk_size)
    sd = _state_dtype(q.dtype)
    dev = q.device

    # ---- chunk layout: per sequence lengths -> flat list of chunks ------------------------------
    if cu_seqlens is None:
        lens = [T] * B
        N = B
    else:
        bounds = cu_seqlens.tolist()           # host values: the torch path is shape-dynamic anyway
        lens = [bounds[n + 1] - bounds[n] for n in range(len(bounds) - 1)]
        N = len(lens)
    n_chunks = [(L + C - 1) // C for L in lens]
    NC = sum(n_chunks)
    regular = cu_seqlens is None               # B rows of T tokens: reshapes, no gathers

    if regular:
        nC = n_chunks[0] if B > 0 else 0
        pad = nC * C - T

        def to_chunks(x: Tensor) -> Tensor:    # [B, T, H, D] -> [B*nC, H, C, D]
            x = x.to(sd)
            if pad:
                x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
            return x.reshape(B * nC, C, H, x.shape[-1]).transpose(1, 2)
    else:
        # slot (chunk i, row c) -> token index, or `total` (a zero row) for padding slots
        total = q.shape[1]
        lens_t = torch.tensor(lens, dtype=torch.long)
        nch_t = torch.tensor(n_chunks, dtype=torch.long)
        seq_of_chunk = torch.repeat_interleave(torch.arange(N), nch_t)               # [NC]
        first_t = torch.cumsum(nch_t, 0) - nch_t
        pos = ((torch.arange(NC) - first_t[seq_of_chunk]) * C).view(NC, 1) + torch.arange(C)
        valid = pos < lens_t[seq_of_chunk].view(NC, 1)                                 # [NC, C]
        tok = torch.tensor(bounds[:-1], dtype=torch.long)[seq_of_chunk].view(NC, 1) + pos
        slot_idx = torch.where(valid, tok, torch.full_like(tok, total)).flatten().to(dev)
        tok_idx = valid.flatten().nonzero().flatten().to(dev)      # slots in token order

        def to_chunks(x: Tensor) -> Tensor:    # [1, total, H, D] -> [NC, H, C, D]
            x = x[0].to(sd)
            x = torch.cat([x, x.new_zeros(1, H, x.shape[-1])], 0)
            return x.index_select(0, slot_idx).view(NC, C, H, x.shape[-1]).transpose(1, 2)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)      # [NC, H, C, D]

    # ---- decays ---------------------------------------------------------------------------------
    log_g = torch.log(gamma.to(sd)).view(H, 1, 1)                # [H, 1, 1]
    r = torch.arange(C, device=dev, dtype=sd)
    diff = r.view(C, 1) - r.view(1, C)                           # r - c
    causal = diff >= 0
    mask = torch.where(causal, torch.exp(log_g * diff.clamp(min=0)) * scale,
                       torch.zeros((), dtype=sd, device=dev))    # [H, C, C]
    q_dec = torch.exp(log_g * (r + 1).view(1, C, 1))              # γ^{r+1}: [H, C, 1]

    # valid length of every chunk (C except the last chunk of each sequence)
    chunk_len = []
    for L, nc in zip(lens, n_chunks):
        if nc:
            chunk_len += [C] * (nc - 1) + [L - (nc - 1) * C]
    Lc = torch.tensor(chunk_len, dtype=sd, device=dev).view(NC, 1, 1, 1)   # [NC, 1, 1, 1]
    expo = Lc - 1 - r.view(1, 1, C, 1)                                     # L_i - 1 - c
    k_dec = torch.where(expo >= 0, torch.exp(log_g.unsqueeze(0) * expo.clamp(min=0)) * scale,
                        torch.zeros((), dtype=sd, device=dev))            # [NC, H, C, 1]
    chunk_dec = torch.exp(log_g.unsqueeze(0) * Lc)                         # γ^{L_i}: [NC, H, 1, 1]

    # ---- intra-chunk: one batched matmul over all chunks ----------------------------------------
    o = ((qc @ kc.transpose(-1, -2)) * mask) @ vc                          # [NC, H, C, D_v]

    # ---- inter-chunk: the state scan -------------------------------------------------------------
    dS = (kc * k_dec).transpose(-1, -2) @ vc                               # [NC, H, D_k, D_v]
    if initial_state is not None:
        S0 = initial_state.to(sd)
    else:
        S0 = q.new_zeros(N, H, D_k, D_v, dtype=sd)
    first = [0] * N
    acc = 0
    for n in range(N):
        first[n] = acc
        acc += n_chunks[n]
    order = sorted(range(N), key=lambda n: -n_chunks[n])                    # most chunks first
    max_nc = n_chunks[order[0]] if N else 0
    S = S0 if order == list(range(N)) else S0[torch.tensor(order, device=dev)]
    prev_parts: List[Tensor] = []                # S_i for the chunks taken at each step
    prev_chunks: List[int] = []
    final_parts: List[Tensor] = []
    final_seqs: List[int] = []
    cnt = N
    while cnt and n_chunks[order[cnt - 1]] == 0:  # empty sequences: final = initial
        cnt -= 1
    if cnt < N:
        final_parts.append(S[cnt:])
        final_seqs += order[cnt:]
    S = S[:cnt]
    for j in range(max_nc):
        ids = [first[order[a]] + j for a in range(cnt)]
        prev_parts.append(S)
        prev_chunks += ids
        if regular:                               # chunks j of all rows: a strided view
            sl = slice(j, NC, max_nc)
            S = chunk_dec[sl] * S + dS[sl]
        else:
            it = torch.tensor(ids, device=dev)
            S = chunk_dec.index_select(0, it) * S + dS.index_select(0, it)
        new_cnt = cnt
        while new_cnt and n_chunks[order[new_cnt - 1]] == j + 1:
            new_cnt -= 1
        if new_cnt < cnt:
            final_parts.append(S[new_cnt:])
            final_seqs += order[new_cnt:cnt]
        S = S[:new_cnt]
        cnt = new_cnt

    if NC:
        if regular:   # prev_parts[j][b] is chunk b*nC + j: stack on a new axis after batch
            S_prev = torch.stack(prev_parts, 1).reshape(NC, H, D_k, D_v)
        else:
            inv = torch.empty(NC, dtype=torch.long)
            inv[torch.tensor(prev_chunks)] = torch.arange(NC)
            S_prev = torch.cat(prev_parts, 0).index_select(0, inv.to(dev))
        o = o + (qc * q_dec) @ S_prev

    # ---- back to [B, T, H, D_v] -----------------------------------------------------------------
    if regular:
        o = o.transpose(1, 2).reshape(B, nC * C, H, D_v)[:, :T]
    else:
        o = o.transpose(1, 2).reshape(NC * C, H, D_v).index_select(0, tok_idx).unsqueeze(0)
    o = o.to(q.dtype)

    final = None
    if output_final_state:
        if final_seqs == list(range(N)):
            final = torch.cat(final_parts, 0)
        else:
            inv = torch.empty(N, dtype=torch.long)
            inv[torch.tensor(final_seqs)] = torch.arange(N)
            final = torch.cat(final_parts, 0).index_select(0, inv.to(dev))
    return o, final
