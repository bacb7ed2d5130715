"""Chunkwise retention in pure PyTorch: the CPU path (and the fallback anywhere), differentiable.

Sequences are cut into chunks of C tokens. Inside a chunk the parallel form is used with a decay
mask that depends only on (row, column) and so is one `[H, C, C]` tensor for all chunks; across
chunks a state `[H, D_k, D_v]` is carried:

    o_i      = ((Q_i K_iᵀ) ⊙ s·Γ) V_i + (Q_i ⊙ γ^{r+1}) S_i          Γ[r, c] = γ^{r-c} (r ≥ c)
    S_{i+1}  = γ^{L_i} S_i + (K_i ⊙ s·γ^{L_i-1-c})ᵀ V_i             L_i = valid tokens of chunk i

Work is O(T·C·D + T·D²) and memory O(T·C + (T/C)·D²) instead of the reference's O(T²).
Every decay is `exp(n · log γ)` with n ≥ 0 (never a division by a decay: nothing overflows).

The state scan is done in matrix form over blocks of 32 chunk steps (`_scan_blocked`): the
states before the chunks of a block are one [H, 32, 32] decay matrix times the block's ΔS, so the
scan is a handful of large ops instead of one small op per chunk. That matters on a CPU, where
hundreds of tiny parallel regions cost more than the arithmetic.

Variable length (cu_seqlens): every sequence is cut into its own chunks (the last one partial),
all chunks of all sequences go into one flat list (the intra-chunk part is one batched matmul);
for the scan the chunks are laid on a padded [N, max chunks] grid. When lengths are so uneven that
the grid would be mostly padding, `_scan_sequential` walks chunk index j = 0, 1, … over the
sequences that still have a chunk j instead (sorted by chunk count, a prefix: each step a slice).
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
    if lens and 0 < max(lens) < C:   # all sequences shorter than a chunk: no need to pad them to C
        C = max(lens)
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
    max_nc = max(n_chunks) if N else 0
    if NC and N * max_nc <= 2 * NC + 64:
        S_prev, final = _scan_blocked(dS, chunk_dec, log_g, C, S0, n_chunks, regular)
    else:   # very uneven lengths: a padded grid would waste too much; walk the chunks instead
        S_prev, final = _scan_sequential(dS, chunk_dec, S0, n_chunks, regular)
    if NC:
        o = o + (qc * q_dec) @ S_prev

    # ---- back to [B, T, H, D_v] -----------------------------------------------------------------
    if regular:
        o = o.transpose(1, 2).reshape(B, nC * C, H, D_v)[:, :T]
    else:
        o = o.transpose(1, 2).reshape(NC * C, H, D_v).index_select(0, tok_idx).unsqueeze(0)
    o = o.to(q.dtype)

    return o, (final if output_final_state else None)


def _scan_blocked(dS: Tensor, chunk_dec: Tensor, log_g: Tensor, C: int, S0: Tensor, n_chunks: List[int],
                  regular: bool, block: int = 32) -> Tuple[Tensor, Tensor]:
    """States before every chunk, as matrix products over blocks of chunk steps.

    With S_j the state before chunk j of a sequence (all chunks but the last are full, decay γ^C):
        S_{j0+r} = γ^{C·r} S_{j0} + Σ_{i<r} γ^{C·(r-1-i)} ΔS_{j0+i}
    so one [H, block, block] matrix times the ΔS of a block gives all its states: J/block Python
    steps and a few large ops instead of J small ones (on 2 busy cores, hundreds of tiny parallel
    regions are what costs). Sequences are laid on a padded grid [N, J] (zeros past their end;
    the states computed there are never read). Returns (S_prev [NC, H, D_k, D_v], final [N, …]).
    """
    NC, H, D_k, D_v = dS.shape
    N, J, X = len(n_chunks), max(n_chunks), D_k * D_v
    dev, sd = dS.device, dS.dtype
    first = [0] * N
    for n in range(1, N):
        first[n] = first[n - 1] + n_chunks[n - 1]
    if regular:                                           # chunk j of row n is n*J + j
        G = dS.view(N, J, H, X)
    else:                                                 # gather onto the grid, zero rows past the end
        grid = torch.tensor([first[n] + j if j < n_chunks[n] else NC for n in range(N) for j in range(J)],
                            dtype=torch.long, device=dev)
        G = torch.cat([dS.view(NC, H, X), dS.new_zeros(1, H, X)]).index_select(0, grid).view(N, J, H, X)
    G = G.permute(2, 1, 0, 3)                                               # [H, J, N, X]

    lgC = log_g.view(H, 1, 1) * C                                           # log γ^C
    Bk = min(J, block)
    r = torch.arange(Bk, device=dev, dtype=sd)
    e = r.view(Bk, 1) - 1 - r.view(1, Bk)                                   # r - 1 - i
    M = torch.where(e >= 0, torch.exp(lgC * e.clamp(min=0)), torch.zeros((), dtype=sd, device=dev))
    P = torch.exp(lgC * r.view(1, Bk, 1)).unsqueeze(-1)                     # γ^{C·r}: [H, Bk, 1, 1]
    S = S0.reshape(N, H, X).transpose(0, 1)                                 # [H, N, X]
    outs = []
    for blk in G.split(Bk, dim=1):                        # split: one cat in backward, not J/Bk copies
        nb = blk.shape[1]
        Sp = (M[:, :nb, :nb] @ blk.reshape(H, nb, N * X)).view(H, nb, N, X) + P[:, :nb] * S.unsqueeze(1)
        outs.append(Sp)
        S = torch.exp(lgC) * Sp[:, -1] + blk[:, -1]
    S_grid = torch.cat(outs, 1).permute(2, 1, 0, 3).reshape(N * J, H, D_k, D_v)   # [N*J, …]
    if regular:
        S_prev = S_grid
    else:
        pos = torch.tensor([n * J + j for n in range(N) for j in range(n_chunks[n])], dtype=torch.long, device=dev)
        S_prev = S_grid.index_select(0, pos)

    # final state: S after the (possibly partial) last chunk; an empty sequence keeps S0
    has = [n for n in range(N) if n_chunks[n]]
    last = torch.tensor([first[n] + n_chunks[n] - 1 for n in has], dtype=torch.long, device=dev)
    fin = chunk_dec.index_select(0, last) * S_prev.index_select(0, last) + dS.index_select(0, last)
    if len(has) == N:
        final = fin
    else:
        idx = torch.tensor(has, dtype=torch.long, device=dev)
        final = S0.index_copy(0, idx, fin)
    return S_prev, final


def _scan_sequential(dS: Tensor, chunk_dec: Tensor, S0: Tensor, n_chunks: List[int],
                     regular: bool) -> Tuple[Tensor, Tensor]:
    """The same scan one chunk step at a time, over the sequences that still have a chunk j
    (sorted by chunk count, that active set is a prefix). For very uneven lengths."""
    NC, H, D_k, D_v = dS.shape
    N = len(n_chunks)
    dev = dS.device
    first = [0] * N
    for n in range(1, N):
        first[n] = first[n - 1] + n_chunks[n - 1]
    order = sorted(range(N), key=lambda n: -n_chunks[n])                    # most chunks first
    max_nc = n_chunks[order[0]] if N else 0
    # active[j] = number of sequences (a prefix of `order`) that have a chunk j
    active = [sum(1 for n in order if n_chunks[n] > j) for j in range(max_nc + 1)] if N else [0]
    n_empty = N - (active[0] if max_nc else 0)
    # Chunk ids in scan order (step j, then sequence). The per-step pieces of dS and the decays
    # come from ONE gather + split: slicing or indexing the whole [NC, …] tensor at every step
    # would make autograd allocate and accumulate a full-size gradient per step (O(T²) traffic).
    step_ids = [first[order[a]] + j for j in range(max_nc) for a in range(active[j])]
    counts = [active[j] for j in range(max_nc)]
    perm = torch.tensor(step_ids, dtype=torch.long, device=dev)
    dS_steps = dS.index_select(0, perm).split(counts)
    dec_steps = chunk_dec.index_select(0, perm).split(counts)

    S = S0 if order == list(range(N)) else S0[torch.tensor(order, device=dev)]
    prev_parts: List[Tensor] = []                # S_j for the chunks taken at each step
    final_parts: List[Tensor] = []
    final_seqs: List[int] = []
    cnt = N - n_empty
    if n_empty:                                  # empty sequences: final = initial
        S, S_empty = S.split([cnt, n_empty])
        final_parts.append(S_empty)
        final_seqs += order[cnt:]
    for j in range(max_nc):
        prev_parts.append(S)
        S = dec_steps[j] * S + dS_steps[j]
        new_cnt = active[j + 1]
        if new_cnt < cnt:                        # sequences whose last chunk was j
            S, S_done = S.split([new_cnt, cnt - new_cnt])
            final_parts.append(S_done)
            final_seqs += order[new_cnt:cnt]
        cnt = new_cnt

    if NC:
        inv = torch.empty(NC, dtype=torch.long)
        inv[torch.tensor(step_ids)] = torch.arange(NC)
        S_prev = torch.cat(prev_parts, 0).index_select(0, inv.to(dev))
    else:
        S_prev = dS
    inv = torch.empty(N, dtype=torch.long)
    inv[torch.tensor(final_seqs)] = torch.arange(N)
    final = torch.cat(final_parts, 0).index_select(0, inv.to(dev))
    return S_prev, final
