"""Vectorised NumPy samplers for segment positions (SPEC §3, §4).

A corpus is CSR: user u owns `tokens[offsets[u]:offsets[u+1]]`. The samplers only look at
`offsets` and return positions *relative to each user's sequence*, ready for
`gather_segments(tokens, offsets, users, starts, lengths, ...)`.

Both are fully vectorised (one `rng` call per quantity, no per-row Python loop) and deterministic
given the seed. Segment lengths are random so that the model cannot identify a user by length.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np

RngLike = Union[np.random.Generator, int, None]


class SegmentPositions(NamedTuple):
    users: np.ndarray     # [num] int64, user index (row of offsets)
    starts: np.ndarray    # [num] int64, start inside the user's sequence
    lengths: np.ndarray   # [num] int64


class SupPairs(NamedTuple):
    users: np.ndarray      # [num] int64
    starts_a: np.ndarray   # [num] int64, view a: tokens [starts_a, starts_a + lengths_a)
    lengths_a: np.ndarray  # [num] int64
    starts_b: np.ndarray   # [num] int64, view b starts >= starts_a + lengths_a + gap
    lengths_b: np.ndarray  # [num] int64


def _as_rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _candidates(offsets, users: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(candidate user ids, their lengths), with the inputs checked."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be a 1-D integer array [U+1], got shape {offsets.shape} "
                         f"dtype {offsets.dtype}")
    seq_lens = np.diff(offsets.astype(np.int64))
    if seq_lens.size and seq_lens.min() < 0:
        u = int(np.argmax(seq_lens < 0))
        raise ValueError(f"offsets must be non-decreasing: offsets[{u}]={int(offsets[u])} > "
                         f"offsets[{u + 1}]={int(offsets[u + 1])}")
    num_users = seq_lens.size
    if users is None:
        cand = np.arange(num_users, dtype=np.int64)
    else:
        cand = np.asarray(users).astype(np.int64, copy=False).reshape(-1)
        bad = (cand < 0) | (cand >= num_users)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"users[{i}]={int(cand[i])} is out of range for {num_users} users")
    return cand, seq_lens[cand]


def _draw_users(cand: np.ndarray, ok: np.ndarray, num: int, need: int, what: str,
                rng: np.random.Generator) -> np.ndarray:
    eligible = cand[ok]
    if eligible.size == 0:
        raise ValueError(
            f"{what}: no eligible user: {cand.size - eligible.size} of {cand.size} users are "
            f"shorter than {need} events (the shortest length needed)")
    # Without replacement whenever possible: in-batch negatives must be different users.
    return rng.choice(eligible, size=num, replace=num > eligible.size).astype(np.int64)


def _uniform_int(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Uniform integers in [low, high] (inclusive, element-wise)."""
    return rng.integers(low, high + 1, dtype=np.int64)


def _check_lengths(num: int, min_len: int, max_len: int) -> None:
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if min_len < 1 or max_len < min_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len} max_len={max_len}")


def sample_segments(offsets, num: int, *, min_len: int, max_len: int, rng: RngLike,
                    users: Optional[np.ndarray] = None) -> SegmentPositions:
    """Draw `num` random segments: a user, a length uniform in [min_len, min(max_len, user_len)],
    and a start uniform over the valid starts.

    offsets: int64 [U+1]; rng: np.random.Generator or int seed; users: optional subset of user
    indices to draw from (e.g. the training users). Users shorter than `min_len` are never drawn;
    users are drawn without replacement when `num` <= the number of eligible users, otherwise
    with replacement. Raises ValueError when no user is long enough.
    """
    _check_lengths(num, min_len, max_len)
    rng = _as_rng(rng)
    cand, cand_lens = _candidates(offsets, users)
    picked = _draw_users(cand, cand_lens >= min_len, num, min_len, "sample_segments", rng)
    seq_lens = np.diff(np.asarray(offsets, dtype=np.int64))[picked]
    lengths = _uniform_int(rng, np.full(num, min_len, np.int64), np.minimum(max_len, seq_lens))
    starts = _uniform_int(rng, np.zeros(num, np.int64), seq_lens - lengths)
    return SegmentPositions(picked, starts, lengths)


def sample_sup_pairs(offsets, num: int, *, min_len: int, max_len: int, gap: int, rng: RngLike,
                     users: Optional[np.ndarray] = None) -> SupPairs:
    """Draw `num` SUP pairs: two non-overlapping segments a, b of the same user, a entirely before
    b with at least `gap` events between a's end and b's start.

    Eligible users have at least 2*min_len + gap events. Lengths are random in [min_len, max_len],
    shrunk so both fit: one length is drawn first (uniform over what still leaves room for the
    other), then the other, and which of a/b is drawn first is a coin flip so both views have the
    same length distribution. The slack is then spread at random: a's start uniform, b's start
    uniform over what remains. Users are different rows whenever `num` <= eligible users.
    """
    _check_lengths(num, min_len, max_len)
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    rng = _as_rng(rng)
    cand, cand_lens = _candidates(offsets, users)
    need = 2 * min_len + gap
    picked = _draw_users(cand, cand_lens >= need, num, need, "sample_sup_pairs", rng)
    n = np.diff(np.asarray(offsets, dtype=np.int64))[picked]
    lo = np.full(num, min_len, np.int64)
    first = _uniform_int(rng, lo, np.minimum(max_len, n - gap - min_len))
    second = _uniform_int(rng, lo, np.minimum(max_len, n - gap - first))
    swap = rng.random(num) < 0.5
    len_a = np.where(swap, second, first)
    len_b = np.where(swap, first, second)
    slack = n - len_a - gap - len_b                           # >= 0 by construction
    starts_a = _uniform_int(rng, np.zeros(num, np.int64), slack)
    starts_b = _uniform_int(rng, starts_a + len_a + gap, n - len_b)
    return SupPairs(picked, starts_a, len_a, starts_b, len_b)
