"""Segment gathering (SPEC §4): user segments + FEP labels straight into batches.

A corpus is CSR: int32 `tokens` and int64 `offsets [U+1]`; user u owns
`tokens[offsets[u]:offsets[u+1]]`. A batch is B segments `(users[b], starts[b], lengths[b])`,
starts relative to each user's sequence.

FEP labels (window W, E event types, token id = event_offset + e): for the token at absolute
index p of user u, the label is the multi-hot set of event types among tokens[p+1 .. p+W] — which
may lie past the segment's end but never past the user's end — and `fep_mask` is true only where
all W future tokens exist (p + W < offsets[u+1]). Tokens outside the event range are not labels.
`fep_window == 0` or `num_events == 0` means no labels (None).

- `gather_segments` / `gather_segments_packed`: the C++/CUDA op `torch.ops.use_kernels.*`.
- `gather_segments_ref` / `gather_segments_packed_ref`: pure NumPy references of the same
  contract, with the same checks and error messages.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ._ext import load_library


class PaddedSegments(NamedTuple):
    input_ids: Tensor                 # [B, max_len] int64, right-padded with pad_id
    attention_mask: Tensor            # [B, max_len] bool
    fep_labels: Optional[Tensor]      # [B, max_len, E] uint8
    fep_mask: Optional[Tensor]        # [B, max_len] bool


class PackedSegments(NamedTuple):
    input_ids: Tensor                 # [total] int64, total = sum(lengths)
    cu_seqlens: Tensor                # [B+1] int32
    position_ids: Tensor              # [total] int64, 0..len-1 within each segment
    fep_labels: Optional[Tensor]      # [total, E] uint8
    fep_mask: Optional[Tensor]        # [total] bool


# ----------------------------------------------------------------------------------------------
# Input conversion (shared by the op wrappers and the references)


def _as_tensor(x, device: torch.device) -> Tensor:
    """Tensors pass through untouched (the op checks dtype and device); NumPy arrays, memmaps and
    lists become tensors on `device`, keeping their dtype."""
    if isinstance(x, Tensor):
        return x
    arr = np.asarray(x)
    if not arr.flags.writeable:
        # A read-only memmap corpus: nothing here writes to it, so torch's warning is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(device)


def _convert(tokens, offsets, users, starts, lengths):
    device = tokens.device if isinstance(tokens, Tensor) else torch.device("cpu")
    return tuple(_as_tensor(x, device) for x in (tokens, offsets, users, starts, lengths))


def _has_fep(fep_window: int, num_events: int) -> bool:
    return fep_window > 0 and num_events > 0


# ----------------------------------------------------------------------------------------------
# The op


def _ops():
    if not _LOADED:
        load_library()  # raises ImportError saying how to rebuild
    return torch.ops.use_kernels


def gather_segments(tokens, offsets, users, starts, lengths, *, max_len: int, pad_id: int,
                    fep_window: int = 0, num_events: int = 0, event_offset: int = 5) -> PaddedSegments:
    """Gather B segments into a right-padded batch `[B, max_len]` (+ FEP labels).

    tokens: int32 [N]; offsets: int64 [U+1]; users/starts/lengths: int64 [B] (starts relative to
    each user's sequence). NumPy inputs are converted to tensors on the device of `tokens`.
    Returns PaddedSegments(input_ids int64, attention_mask bool, fep_labels uint8 [B, max_len, E]
    or None, fep_mask bool or None). Raises RuntimeError with the offending batch row on bad input.
    """
    tokens, offsets, users, starts, lengths = _convert(tokens, offsets, users, starts, lengths)
    ids, attn, labels, fmask = _ops().gather_segments(
        tokens, offsets, users, starts, lengths, max_len, pad_id, fep_window, num_events, event_offset)
    if not _has_fep(fep_window, num_events):
        return PaddedSegments(ids, attn, None, None)
    return PaddedSegments(ids, attn, labels, fmask)


def gather_segments_packed(tokens, offsets, users, starts, lengths, *, fep_window: int = 0,
                           num_events: int = 0, event_offset: int = 5) -> PackedSegments:
    """Gather B segments back to back, no padding (varlen / FlashAttention layout).

    Returns PackedSegments(input_ids int64 [total], cu_seqlens int32 [B+1], position_ids int64
    [total] (0..len-1 within each segment), fep_labels uint8 [total, E] or None, fep_mask bool
    [total] or None), total = sum(lengths).
    """
    tokens, offsets, users, starts, lengths = _convert(tokens, offsets, users, starts, lengths)
    ids, cu, pos, labels, fmask = _ops().gather_segments_packed(
        tokens, offsets, users, starts, lengths, fep_window, num_events, event_offset)
    if not _has_fep(fep_window, num_events):
        return PackedSegments(ids, cu, pos, None, None)
    return PackedSegments(ids, cu, pos, labels, fmask)


# ----------------------------------------------------------------------------------------------
# References: plain NumPy, one segment at a time, same checks and messages as the op.


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_args(name, tokens, offsets, users, starts, lengths, max_len, fep_window, num_events):
    """Dtypes, ranks, devices, sizes and scalars (no values): used by the references and the fakes.
    max_len None = packed."""
    def fail(msg):
        raise RuntimeError(f"{name}: {msg}")

    for arg, t, dt in (("tokens", tokens, torch.int32), ("offsets", offsets, torch.int64),
                       ("users", users, torch.int64), ("starts", starts, torch.int64),
                       ("lengths", lengths, torch.int64)):
        if t.dtype != dt:
            fail(f"{arg} must be {_dtype_name(dt)}, got {_dtype_name(t.dtype)}")
        if t.dim() != 1:
            fail(f"{arg} must be 1-D, got shape {list(t.shape)}")
        if t.device != tokens.device:
            fail(f"{arg} is on {t.device} but tokens is on {tokens.device}; "
                 f"all inputs must be on the same device")
    if offsets.numel() < 1:
        fail("offsets must have at least one element (it is [U+1])")
    if not users.numel() == starts.numel() == lengths.numel():
        fail(f"users, starts and lengths must have the same length, got "
             f"{users.numel()}, {starts.numel()}, {lengths.numel()}")
    if max_len is not None and max_len < 0:
        fail(f"max_len must be >= 0, got {max_len}")
    if fep_window < 0:
        fail(f"fep_window must be >= 0, got {fep_window}")
    if num_events < 0:
        fail(f"num_events must be >= 0, got {num_events}")


def _check_rows(name, tokens, offsets, users, starts, lengths, max_len):
    """The per-row rules, in the order of check_row (csrc/gather_segments.h)."""
    def fail(msg):
        raise RuntimeError(f"{name}: {msg}")

    off = offsets.cpu().numpy()
    num_users, num_tokens = off.size - 1, tokens.numel()
    for b, (u, s, n) in enumerate(zip(users.tolist(), starts.tolist(), lengths.tolist())):
        row = f"batch row {b}: "
        if not 0 <= u < num_users:
            fail(f"{row}users[{b}]={u} is out of range for {num_users} users")
        lo, hi = int(off[u]), int(off[u + 1])
        if lo > hi:
            fail(f"{row}offsets must be non-decreasing: offsets[{u}]={lo} > offsets[{u + 1}]={hi}")
        if lo < 0 or hi > num_tokens:
            fail(f"{row}offsets[{u}]={lo}, offsets[{u + 1}]={hi} lie outside tokens "
                 f"({num_tokens} tokens)")
        if s < 0:
            fail(f"{row}starts[{b}]={s} is negative")
        if n < 0:
            fail(f"{row}lengths[{b}]={n} is negative")
        if s + n > hi - lo:
            fail(f"{row}segment [{s}, {s + n}) is outside user {u}'s sequence of {hi - lo} tokens")
        if max_len is not None and n > max_len:
            fail(f"{row}max_len={max_len} is smaller than lengths[{b}]={n}")


def _segment_ref(tok, begin, n, end, fep_window, num_events, event_offset):
    """(ids [n], labels [n, E] uint8, mask [n] bool) for tokens[begin:begin+n] of a user ending at
    `end` (absolute)."""
    ids = tok[begin:begin + n].astype(np.int64)
    p = begin + np.arange(n, dtype=np.int64)                       # absolute positions
    idx = p[:, None] + np.arange(1, fep_window + 1)                # [n, W] future positions
    inside = idx < end
    ev = tok[np.minimum(idx, max(end - 1, 0))].astype(np.int64) - event_offset
    hit = inside & (ev >= 0) & (ev < num_events)
    labels = np.zeros((n, num_events), np.uint8)
    rows, cols = np.nonzero(hit)
    labels[rows, ev[rows, cols]] = 1
    return ids, labels, p + fep_window < end


def _ref_inputs(name, tokens, offsets, users, starts, lengths, max_len, fep_window, num_events):
    tokens, offsets, users, starts, lengths = _convert(tokens, offsets, users, starts, lengths)
    _check_args(name, tokens, offsets, users, starts, lengths, max_len, fep_window, num_events)
    _check_rows(name, tokens, offsets, users, starts, lengths, max_len)
    np_ = [t.cpu().numpy() for t in (tokens, offsets, users, starts, lengths)]
    return tokens.device, np_


def gather_segments_ref(tokens, offsets, users, starts, lengths, *, max_len: int, pad_id: int,
                        fep_window: int = 0, num_events: int = 0,
                        event_offset: int = 5) -> PaddedSegments:
    """Pure NumPy reference of `gather_segments` (same contract, same errors)."""
    device, (tok, off, usr, st, ln) = _ref_inputs(
        "gather_segments", tokens, offsets, users, starts, lengths, max_len, fep_window, num_events)
    fep = _has_fep(fep_window, num_events)
    B = usr.size
    ids = np.full((B, max_len), pad_id, np.int64)
    attn = np.zeros((B, max_len), bool)
    labels = np.zeros((B, max_len, num_events if fep else 0), np.uint8)
    fmask = np.zeros((B, max_len), bool)
    for b in range(B):
        begin, n, end = off[usr[b]] + st[b], ln[b], off[usr[b] + 1]
        ids[b, :n], labels[b, :n], fmask[b, :n] = _segment_ref(
            tok, begin, n, end, fep_window if fep else 0, labels.shape[2], event_offset)
        attn[b, :n] = True
    out = [torch.from_numpy(x).to(device) for x in (ids, attn, labels, fmask)]
    return PaddedSegments(out[0], out[1], *(out[2:] if fep else (None, None)))


def gather_segments_packed_ref(tokens, offsets, users, starts, lengths, *, fep_window: int = 0,
                               num_events: int = 0, event_offset: int = 5) -> PackedSegments:
    """Pure NumPy reference of `gather_segments_packed` (same contract, same errors)."""
    device, (tok, off, usr, st, ln) = _ref_inputs(
        "gather_segments_packed", tokens, offsets, users, starts, lengths, None, fep_window,
        num_events)
    fep = _has_fep(fep_window, num_events)
    E = num_events if fep else 0
    parts = [_segment_ref(tok, off[u] + s, n, off[u + 1], fep_window if fep else 0, E, event_offset)
             for u, s, n in zip(usr, st, ln)]
    cu = np.zeros(usr.size + 1, np.int64)
    np.cumsum(ln, out=cu[1:])
    if cu[-1] > np.iinfo(np.int32).max:
        raise RuntimeError(f"gather_segments_packed: total length {cu[-1]} does not fit cu_seqlens "
                           f"(int32)")
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, E), np.uint8)
    fmask = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, bool)
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in ln]) if parts else np.zeros(0, np.int64)
    out = [torch.from_numpy(x).to(device)
           for x in (ids, cu.astype(np.int32), pos, labels, fmask)]
    return PackedSegments(out[0], out[1], out[2], *(out[3:] if fep else (None, None)))


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations, registered once the library is loaded.


def _register_fakes() -> None:
    """Shape-only implementations (same argument checks), so the ops trace under
    torch.compile(fullgraph=True)."""

    @torch.library.register_fake("use_kernels::gather_segments")
    def _(tokens, offsets, users, starts, lengths, max_len, pad_id, fep_window=0, num_events=0,
          event_offset=5):
        _check_args("gather_segments", tokens, offsets, users, starts, lengths, max_len,
                    fep_window, num_events)
        E = num_events if _has_fep(fep_window, num_events) else 0
        B = users.shape[0]
        return (tokens.new_empty((B, max_len), dtype=torch.int64),
                tokens.new_empty((B, max_len), dtype=torch.bool),
                tokens.new_empty((B, max_len, E), dtype=torch.uint8),
                tokens.new_empty((B, max_len) if E else (0,), dtype=torch.bool))

    @torch.library.register_fake("use_kernels::gather_segments_packed")
    def _(tokens, offsets, users, starts, lengths, fep_window=0, num_events=0, event_offset=5):
        _check_args("gather_segments_packed", tokens, offsets, users, starts, lengths, None,
                    fep_window, num_events)
        E = num_events if _has_fep(fep_window, num_events) else 0
        B = users.shape[0]
        total = torch.library.get_ctx().new_dynamic_size()   # sum(lengths): data-dependent
        return (tokens.new_empty((total,), dtype=torch.int64),
                tokens.new_empty((B + 1,), dtype=torch.int32),
                tokens.new_empty((total,), dtype=torch.int64),
                tokens.new_empty((total, E), dtype=torch.uint8),
                tokens.new_empty((total,) if E else (0,), dtype=torch.bool))


try:
    load_library()
    _register_fakes()
    _LOADED = True
except ImportError:
    _LOADED = False  # importing use_kernels still works; calling the ops says how to rebuild
