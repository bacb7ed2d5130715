"""sample_segments / sample_sup_pairs: validity of every row, determinism, replacement rules, the
length distribution, and the error messages."""
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from use_kernels import sample_segments, sample_sup_pairs


def offsets_of(lengths):
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def check_segments(off, seg, min_len, max_len, users=None):
    n = np.diff(off)[seg.users]
    for a in seg:
        assert a.dtype == np.int64
    assert (seg.lengths >= min_len).all() and (seg.lengths <= max_len).all()
    assert (seg.starts >= 0).all() and (seg.starts + seg.lengths <= n).all()
    if users is not None:
        assert np.isin(seg.users, users).all()


def check_pairs(off, p, min_len, max_len, gap):
    n = np.diff(off)[p.users]
    for la in (p.lengths_a, p.lengths_b):
        assert (la >= min_len).all() and (la <= max_len).all()
    assert (p.starts_a >= 0).all()
    assert (p.starts_b >= p.starts_a + p.lengths_a + gap).all()     # a before b, >= gap between
    assert (p.starts_b + p.lengths_b <= n).all()


def test_segments_valid_and_deterministic():
    rng = np.random.default_rng(0)
    off = offsets_of(rng.integers(0, 300, size=500))
    a = sample_segments(off, 200, min_len=20, max_len=128, rng=7)
    b = sample_segments(off, 200, min_len=20, max_len=128, rng=np.random.default_rng(7))
    c = sample_segments(off, 200, min_len=20, max_len=128, rng=8)
    check_segments(off, a, 20, 128)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.starts, c.starts)
    assert np.diff(off)[a.users].min() >= 20                          # only eligible users
    assert len(np.unique(a.users)) == 200                             # without replacement


def test_segments_with_replacement_when_few_users():
    off = offsets_of([50, 3, 60])
    s = sample_segments(off, 40, min_len=10, max_len=30, rng=1)
    check_segments(off, s, 10, 30)
    assert set(s.users.tolist()) == {0, 2}


def test_segments_user_subset():
    rng = np.random.default_rng(2)
    off = offsets_of(rng.integers(50, 100, size=100))
    train = np.arange(0, 100, 3)
    s = sample_segments(off, 30, min_len=10, max_len=40, rng=3, users=train)
    check_segments(off, s, 10, 40, users=train)
    assert len(np.unique(s.users)) == 30


def test_segment_lengths_and_starts_cover_their_range():
    off = offsets_of([100] * 50)
    s = sample_segments(off, 20000, min_len=10, max_len=20, rng=4)
    counts = np.bincount(s.lengths, minlength=21)[10:]
    assert (counts > 0).all() and counts.min() > 0.7 * counts.mean()  # ~uniform over [10, 20]
    assert s.starts.min() == 0 and (s.starts + s.lengths).max() == 100
    short = sample_segments(offsets_of([15] * 10), 5000, min_len=10, max_len=20, rng=5)
    assert short.lengths.max() == 15                                  # capped by the user's length


def test_segments_errors():
    off = offsets_of([5, 8, 30, 2])
    with pytest.raises(ValueError, match=re.escape(
            "sample_segments: no eligible user: 4 of 4 users are shorter than 31 events")):
        sample_segments(off, 4, min_len=31, max_len=40, rng=0)
    with pytest.raises(ValueError, match=re.escape(
            "no eligible user: 2 of 2 users are shorter than 10 events")):
        sample_segments(off, 4, min_len=10, max_len=40, rng=0, users=[0, 3])
    with pytest.raises(ValueError, match="min_len <= max_len"):
        sample_segments(off, 4, min_len=10, max_len=5, rng=0)
    with pytest.raises(ValueError, match=re.escape("users[1]=4 is out of range for 4 users")):
        sample_segments(off, 4, min_len=1, max_len=5, rng=0, users=[0, 4])
    with pytest.raises(ValueError, match=re.escape("offsets must be non-decreasing: offsets[1]=5 > "
                                                   "offsets[2]=4")):
        sample_segments(np.array([0, 5, 4]), 1, min_len=1, max_len=5, rng=0)


def test_sup_pairs_valid_distinct_deterministic():
    rng = np.random.default_rng(1)
    off = offsets_of(rng.integers(0, 2000, size=400))
    p = sample_sup_pairs(off, 128, min_len=32, max_len=512, gap=64, rng=11)
    q = sample_sup_pairs(off, 128, min_len=32, max_len=512, gap=64, rng=11)
    check_pairs(off, p, 32, 512, 64)
    for x, y in zip(p, q):
        np.testing.assert_array_equal(x, y)
    assert len(np.unique(p.users)) == 128                             # in-batch negatives differ
    assert np.diff(off)[p.users].min() >= 2 * 32 + 64


def test_sup_pairs_tight_fit_and_symmetry():
    off = offsets_of([2 * 10 + 5] * 5)                                # exactly 2*min_len + gap
    p = sample_sup_pairs(off, 50, min_len=10, max_len=100, gap=5, rng=0)
    check_pairs(off, p, 10, 100, 5)
    assert (p.lengths_a == 10).all() and (p.starts_b == 15).all()
    off = offsets_of([300] * 1000)
    p = sample_sup_pairs(off, 20000, min_len=10, max_len=200, gap=20, rng=1)
    check_pairs(off, p, 10, 200, 20)
    # Both views have the same length distribution (which one is drawn first is a coin flip).
    assert abs(p.lengths_a.mean() - p.lengths_b.mean()) < 2.0


def test_sup_pairs_errors():
    off = offsets_of([50, 60, 10])
    with pytest.raises(ValueError, match=re.escape(
            "sample_sup_pairs: no eligible user: 3 of 3 users are shorter than 70 events")):
        sample_sup_pairs(off, 2, min_len=30, max_len=40, gap=10, rng=0)
    with pytest.raises(ValueError, match="gap must be >= 0"):
        sample_sup_pairs(off, 2, min_len=3, max_len=4, gap=-1, rng=0)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=30),
       num=st.integers(0, 40), min_len=st.integers(1, 20), extra=st.integers(0, 30),
       gap=st.integers(0, 15), seed=st.integers(0, 2**32 - 1))
def test_fuzz_samplers(lengths, num, min_len, extra, gap, seed):
    off = offsets_of(lengths)
    max_len = min_len + extra
    lens = np.asarray(lengths)
    if (lens >= min_len).any():
        check_segments(off, sample_segments(off, num, min_len=min_len, max_len=max_len, rng=seed),
                       min_len, max_len)
    else:
        with pytest.raises(ValueError, match=f"{len(lengths)} of {len(lengths)} users are shorter"):
            sample_segments(off, num, min_len=min_len, max_len=max_len, rng=seed)
    if (lens >= 2 * min_len + gap).any():
        p = sample_sup_pairs(off, num, min_len=min_len, max_len=max_len, gap=gap, rng=seed)
        check_pairs(off, p, min_len, max_len, gap)
        if num <= (lens >= 2 * min_len + gap).sum():
            assert len(np.unique(p.users)) == num
    else:
        with pytest.raises(ValueError, match="shorter than"):
            sample_sup_pairs(off, num, min_len=min_len, max_len=max_len, gap=gap, rng=seed)


def test_vectorised_speed():
    off = offsets_of(np.full(200_000, 4000))
    t = time.perf_counter()
    sample_sup_pairs(off, 100_000, min_len=64, max_len=512, gap=100, rng=0)
    sample_segments(off, 100_000, min_len=64, max_len=512, rng=0)
    # A per-row Python loop takes seconds here; the vectorised draw takes a few tens of ms.
    assert time.perf_counter() - t < 1.0
