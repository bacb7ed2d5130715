"""gather_segments / gather_segments_packed: the C++ (CPU, CUDA) op against the NumPy reference,
the reference against a literal per-position loop of the FEP definition, every error path, opcheck
and torch.compile(fullgraph=True)."""
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from use_kernels import (PackedSegments, PaddedSegments, gather_segments, gather_segments_packed,
                         gather_segments_packed_ref, gather_segments_ref, sample_segments)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EVENT_OFFSET = 5


def make_corpus(rng, num_users, max_user_len, num_events, p_empty=0.1):
    """Random CSR corpus; some users empty; tokens include specials (< 5) and ids past the event
    range, which must never become labels."""
    lens = rng.integers(0, max_user_len + 1, size=num_users)
    lens[rng.random(num_users) < p_empty] = 0
    offsets = np.zeros(num_users + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    tokens = rng.integers(0, EVENT_OFFSET + num_events + 3, size=int(offsets[-1])).astype(np.int32)
    return tokens, offsets


def random_segments(rng, offsets, B):
    """Any valid segments, including empty ones and ones ending at the user's end."""
    lens = np.diff(offsets)
    users = rng.integers(0, lens.size, size=B)
    n = lens[users]
    lengths = (rng.random(B) * (n + 1)).astype(np.int64)
    at_end = rng.random(B) < 0.3                      # a third end exactly at the sequence end
    starts = np.where(at_end, n - lengths, (rng.random(B) * (n - lengths + 1)).astype(np.int64))
    return users.astype(np.int64), starts.astype(np.int64), lengths


def fep_by_definition(tokens, offsets, user, start, length, W, E, event_offset=EVENT_OFFSET):
    """The FEP definition as a plain loop: independent of both implementations."""
    end = int(offsets[user + 1])
    labels = np.zeros((length, E), np.uint8)
    mask = np.zeros(length, bool)
    for i in range(length):
        p = int(offsets[user]) + start + i
        for q in range(p + 1, min(p + W, end - 1) + 1):
            e = int(tokens[q]) - event_offset
            if 0 <= e < E:
                labels[i, e] = 1
        mask[i] = p + W < end
    return labels, mask


def assert_same(got, want):
    assert type(got) is type(want)
    for name, g, w in zip(got._fields, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device, \
            (name, g.dtype, w.dtype, g.shape, w.shape, g.device, w.device)
        g, w = g.cpu(), w.cpu()
        if not torch.equal(g, w):
            bad = (g != w).nonzero()
            raise AssertionError(f"{name}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: "
                                 f"got {g[tuple(bad[0])].item()} want {w[tuple(bad[0])].item()}")


def run_both(tokens, offsets, segs, *, max_len, pad_id=3, W=0, E=0, device="cpu"):
    tok = torch.from_numpy(tokens).to(device)
    off = torch.from_numpy(offsets).to(device)
    s = [torch.from_numpy(np.asarray(x, np.int64)).to(device) for x in segs]
    kw = dict(fep_window=W, num_events=E, event_offset=EVENT_OFFSET)
    assert_same(gather_segments(tok, off, *s, max_len=max_len, pad_id=pad_id, **kw),
                gather_segments_ref(tok, off, *s, max_len=max_len, pad_id=pad_id, **kw))
    assert_same(gather_segments_packed(tok, off, *s, **kw), gather_segments_packed_ref(tok, off, *s, **kw))


# ---- the reference against the definition ----------------------------------------------------


@pytest.mark.parametrize("W,E", [(1, 3), (5, 52), (100, 7), (1000, 4)])
def test_reference_matches_definition(W, E):
    rng = np.random.default_rng(W * 31 + E)
    tokens, offsets = make_corpus(rng, 23, 130, E)
    users, starts, lengths = random_segments(rng, offsets, 17)
    max_len = int(lengths.max())
    ref = gather_segments_ref(tokens, offsets, users, starts, lengths, max_len=max_len, pad_id=3,
                              fep_window=W, num_events=E)
    packed = gather_segments_packed_ref(tokens, offsets, users, starts, lengths, fep_window=W,
                                        num_events=E)
    cu = packed.cu_seqlens.numpy()
    for b, (u, s, n) in enumerate(zip(users, starts, lengths)):
        labels, mask = fep_by_definition(tokens, offsets, u, s, n, W, E)
        ids = tokens[offsets[u] + s: offsets[u] + s + n]
        np.testing.assert_array_equal(ref.input_ids[b, :n].numpy(), ids)
        np.testing.assert_array_equal(ref.input_ids[b, n:].numpy(), 3)
        np.testing.assert_array_equal(ref.attention_mask[b].numpy(), np.arange(max_len) < n)
        np.testing.assert_array_equal(ref.fep_labels[b, :n].numpy(), labels)
        np.testing.assert_array_equal(ref.fep_labels[b, n:].numpy(), 0)
        np.testing.assert_array_equal(ref.fep_mask[b, :n].numpy(), mask)
        assert not ref.fep_mask[b, n:].any()
        np.testing.assert_array_equal(packed.input_ids[cu[b]:cu[b + 1]].numpy(), ids)
        np.testing.assert_array_equal(packed.position_ids[cu[b]:cu[b + 1]].numpy(), np.arange(n))
        np.testing.assert_array_equal(packed.fep_labels[cu[b]:cu[b + 1]].numpy(), labels)
        np.testing.assert_array_equal(packed.fep_mask[cu[b]:cu[b + 1]].numpy(), mask)


def test_fep_hand_example():
    # user 0: [7 5 1 6 9 5]  (events e = id - 5, E = 3: ids 5, 6, 7; 9 is past the range, 1 special)
    tokens = np.array([7, 5, 1, 6, 9, 5, 8, 8], np.int32)
    offsets = np.array([0, 6, 8], np.int64)
    out = gather_segments(tokens, offsets, [0], [1], [3], max_len=4, pad_id=3, fep_window=2,
                          num_events=3)
    # p=1 (id 5): future {1, 6} -> e1; p=2 (id 1): {6, 9} -> e1; p=3 (id 6): {9, 5} -> e0
    assert out.input_ids.tolist() == [[5, 1, 6, 3]]
    assert out.attention_mask.tolist() == [[True, True, True, False]]
    assert out.fep_labels[0].tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert out.fep_mask.tolist() == [[True, True, True, False]]
    # A segment ending at the user's end: the last positions lack W future tokens; the future never
    # reaches into the next user (ids 8, 8 would be event 3: out of range anyway, so use E = 4).
    out = gather_segments(tokens, offsets, [0], [3], [3], max_len=3, pad_id=3, fep_window=2,
                          num_events=4)
    assert out.fep_labels[0].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert out.fep_mask.tolist() == [[True, False, False]]


# ---- the op against the reference --------------------------------------------------------------


@pytest.mark.parametrize("W,E", [(0, 0), (0, 52), (5, 0), (1, 1), (5, 52), (100, 52), (37, 70),
                                 (5000, 9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_op_matches_reference(W, E, seed):
    rng = np.random.default_rng(seed * 1000 + W + E)
    tokens, offsets = make_corpus(rng, 41, 300, max(E, 1))
    segs = random_segments(rng, offsets, 33)
    run_both(tokens, offsets, segs, max_len=int(segs[2].max()) + 3, W=W, E=E)


def test_op_on_sampled_batch_realistic():
    rng = np.random.default_rng(7)
    tokens, offsets = make_corpus(rng, 64, 4000, 52, p_empty=0.0)
    segs = sample_segments(offsets, 64, min_len=64, max_len=512, rng=rng)
    run_both(tokens, offsets, segs, max_len=512, W=100, E=52)


def test_edge_sizes():
    rng = np.random.default_rng(3)
    tokens, offsets = make_corpus(rng, 5, 20, 4)
    empty = (np.zeros(0, np.int64),) * 3
    run_both(tokens, offsets, empty, max_len=8, W=3, E=4)                  # B = 0
    run_both(tokens, offsets, ([1, 1], [0, 0], [0, 0]), max_len=0, W=3, E=4)  # max_len = 0
    run_both(np.zeros(0, np.int32), np.zeros(1, np.int64), empty, max_len=4, W=2, E=2)  # no users
    zero_users = np.array([0, 0, 0, 5], np.int64)                             # empty users 0, 1
    run_both(tokens[:5], zero_users, ([0, 1, 2], [0, 0, 5], [0, 0, 0]), max_len=2, W=2, E=4)


def test_inputs_numpy_memmap_noncontiguous(tmp_path):
    rng = np.random.default_rng(11)
    tokens, offsets = make_corpus(rng, 30, 100, 6)
    np.save(tmp_path / "tokens.npy", tokens)
    mm = np.load(tmp_path / "tokens.npy", mmap_mode="r")                     # read-only memmap
    users, starts, lengths = random_segments(rng, offsets, 20)
    want = gather_segments_ref(tokens, offsets, users, starts, lengths, max_len=100, pad_id=0,
                               fep_window=4, num_events=6)
    got = gather_segments(mm, offsets, users, starts, lengths, max_len=100, pad_id=0, fep_window=4,
                          num_events=6)
    assert_same(got, want)
    # Strided tensors (every other row of a longer batch) are made contiguous by the op.
    u2, s2, l2 = (torch.from_numpy(np.repeat(x, 2)) for x in (users, starts, lengths))
    got = gather_segments(torch.from_numpy(tokens), torch.from_numpy(offsets), u2[::2], s2[::2],
                          l2[::2], max_len=100, pad_id=0, fep_window=4, num_events=6)
    assert_same(got, want)


def test_returns_named_tuples_and_dtypes():
    tokens = np.arange(10, dtype=np.int32)
    offsets = np.array([0, 10], np.int64)
    out = gather_segments(tokens, offsets, [0], [2], [4], max_len=6, pad_id=3, fep_window=2,
                          num_events=3)
    assert isinstance(out, PaddedSegments)
    assert (out.input_ids.dtype, out.attention_mask.dtype, out.fep_labels.dtype, out.fep_mask.dtype) \
        == (torch.int64, torch.bool, torch.uint8, torch.bool)
    assert out.fep_labels.shape == (1, 6, 3)
    packed = gather_segments_packed(tokens, offsets, [0, 0], [2, 0], [4, 3])
    assert isinstance(packed, PackedSegments)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 4, 7]
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert packed.fep_labels is None and packed.fep_mask is None


# ---- property-based fuzzing --------------------------------------------------------------------


@st.composite
def corpora_and_batches(draw):
    E = draw(st.integers(0, 9))
    user_lens = draw(st.lists(st.integers(0, 40), min_size=1, max_size=8))
    offsets = np.zeros(len(user_lens) + 1, np.int64)
    np.cumsum(user_lens, out=offsets[1:])
    tokens = np.array(draw(st.lists(st.integers(0, EVENT_OFFSET + E + 2), min_size=int(offsets[-1]),
                                    max_size=int(offsets[-1]))), np.int32)
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        u = draw(st.integers(0, len(user_lens) - 1))
        n = draw(st.integers(0, user_lens[u]))
        s = draw(st.integers(0, user_lens[u] - n))
        rows.append((u, s, n))
    segs = tuple(np.array(c, np.int64) for c in zip(*rows)) if rows else (np.zeros(0, np.int64),) * 3
    W = draw(st.integers(0, 50))                                       # often more than what is left
    slack = draw(st.integers(0, 3))
    max_len = (int(segs[2].max()) if rows else 0) + slack
    return tokens, offsets, segs, W, E, max_len


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora_and_batches())
def test_fuzz_op_matches_reference(case):
    tokens, offsets, segs, W, E, max_len = case
    run_both(tokens, offsets, segs, max_len=max_len, W=W, E=E)


@settings(max_examples=60, deadline=None)
@given(corpora_and_batches())
def test_fuzz_reference_matches_definition(case):
    tokens, offsets, segs, W, E, max_len = case
    if E == 0 or W == 0:
        return
    ref = gather_segments_ref(tokens, offsets, *segs, max_len=max_len, pad_id=3, fep_window=W,
                              num_events=E)
    for b, (u, s, n) in enumerate(zip(*segs)):
        labels, mask = fep_by_definition(tokens, offsets, u, s, n, W, E)
        np.testing.assert_array_equal(ref.fep_labels[b, :n].numpy(), labels)
        np.testing.assert_array_equal(ref.fep_mask[b, :n].numpy(), mask)


# ---- errors: the op and the reference raise the same message -----------------------------------


def _inputs():
    tokens = np.arange(30, dtype=np.int32) % 11
    offsets = np.array([0, 10, 10, 25, 30], np.int64)          # users of 10, 0, 15, 5 tokens
    users = np.array([0, 2, 3], np.int64)
    starts = np.array([0, 5, 1], np.int64)
    lengths = np.array([4, 10, 4], np.int64)
    return dict(tokens=tokens, offsets=offsets, users=users, starts=starts, lengths=lengths)


def _mutate(name, f):
    d = _inputs()
    d[name] = f(d[name].copy())
    return d


def _set(i, v):
    def f(a):
        a[i] = v
        return a
    return f


ERRORS = [
    ("tokens int64", _mutate("tokens", lambda a: a.astype(np.int64)), "tokens must be int32, got int64"),
    ("offsets int32", _mutate("offsets", lambda a: a.astype(np.int32)), "offsets must be int64, got int32"),
    ("users float", _mutate("users", lambda a: a.astype(np.float32)), "users must be int64, got float32"),
    ("lengths int32", _mutate("lengths", lambda a: a.astype(np.int32)), "lengths must be int64, got int32"),
    ("2-D starts", _mutate("starts", lambda a: a[:, None]), "starts must be 1-D, got shape [3, 1]"),
    ("empty offsets", _mutate("offsets", lambda a: a[:0]), "offsets must have at least one element"),
    ("batch sizes", _mutate("lengths", lambda a: a[:2]),
     "users, starts and lengths must have the same length, got 3, 3, 2"),
    ("user too big", _mutate("users", _set(1, 4)), "batch row 1: users[1]=4 is out of range for 4 users"),
    ("user negative", _mutate("users", _set(0, -1)), "batch row 0: users[0]=-1 is out of range for 4 users"),
    ("offsets decreasing", _mutate("offsets", _set(3, 8)),
     "batch row 1: offsets must be non-decreasing: offsets[2]=10 > offsets[3]=8"),
    ("offsets past tokens", _mutate("offsets", _set(4, 31)),
     "batch row 2: offsets[3]=25, offsets[4]=31 lie outside tokens (30 tokens)"),
    ("offsets negative", _mutate("offsets", _set(0, -2)),
     "batch row 0: offsets[0]=-2, offsets[1]=10 lie outside tokens (30 tokens)"),
    ("start negative", _mutate("starts", _set(2, -1)), "batch row 2: starts[2]=-1 is negative"),
    ("length negative", _mutate("lengths", _set(0, -3)), "batch row 0: lengths[0]=-3 is negative"),
    ("past user end", _mutate("starts", _set(1, 6)),
     "batch row 1: segment [6, 16) is outside user 2's sequence of 15 tokens"),
    ("start past end", _mutate("starts", _set(2, 6)),
     "batch row 2: segment [6, 10) is outside user 3's sequence of 5 tokens"),
    ("huge start", _mutate("starts", _set(0, 2**62)),
     f"batch row 0: segment [{2**62}, {2**62 + 4}) is outside user 0's sequence of 10 tokens"),
    ("first bad row wins", _mutate("lengths", lambda a: np.array([4, -1, -1])),
     "batch row 1: lengths[1]=-1 is negative"),
]


@pytest.mark.parametrize("name,inputs,message", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("impl", ["op", "ref"])
def test_errors(name, inputs, message, layout, impl, device="cpu"):
    check_error(inputs, message, layout, impl, device)


def check_error(inputs, message, layout, impl, device):
    d = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
    args = [d[k] for k in ("tokens", "offsets", "users", "starts", "lengths")]
    if layout == "padded":
        fn = gather_segments if impl == "op" else gather_segments_ref
        call = lambda: fn(*args, max_len=16, pad_id=3, fep_window=3, num_events=4)  # noqa: E731
        prefix = "gather_segments: "
    else:
        fn = gather_segments_packed if impl == "op" else gather_segments_packed_ref
        call = lambda: fn(*args, fep_window=3, num_events=4)  # noqa: E731
        prefix = "gather_segments_packed: "
    with pytest.raises(RuntimeError, match="^" + re.escape(prefix + message)):
        call()


SCALAR_ERRORS = [
    (dict(max_len=8), "gather_segments: batch row 1: max_len=8 is smaller than lengths[1]=10"),
    (dict(max_len=-1), "gather_segments: max_len must be >= 0, got -1"),
    (dict(fep_window=-2), "gather_segments: fep_window must be >= 0, got -2"),
    (dict(num_events=-1), "gather_segments: num_events must be >= 0, got -1"),
]


@pytest.mark.parametrize("impl", ["op", "ref"])
@pytest.mark.parametrize("kwargs,message", SCALAR_ERRORS)
def test_scalar_errors(kwargs, message, impl, device="cpu"):
    d = _inputs()
    args = [torch.from_numpy(d[k]).to(device) for k in ("tokens", "offsets", "users", "starts", "lengths")]
    kw = dict(max_len=16, pad_id=3, fep_window=3, num_events=4) | kwargs
    fn = gather_segments if impl == "op" else gather_segments_ref
    with pytest.raises(RuntimeError, match="^" + re.escape(message)):
        fn(*args, **kw)


def test_device_mismatch_error():
    d = _inputs()
    tok = torch.from_numpy(d["tokens"]).to("meta")
    rest = [torch.from_numpy(d[k]) for k in ("offsets", "users", "starts", "lengths")]
    with pytest.raises(RuntimeError, match=re.escape("offsets is on cpu but tokens is on meta")):
        torch.ops.use_kernels.gather_segments.default(tok, *rest, 16, 3, 0, 0, 5)


def test_missing_library_says_how_to_rebuild(monkeypatch):
    import sys

    from use_kernels import _ext
    monkeypatch.setitem(sys.modules, "use_kernels._C", None)   # makes `import` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install --no-build-isolation -e .")):
        _ext.load_library.__wrapped__()


# ---- opcheck and torch.compile -----------------------------------------------------------------


def _sample_args(device="cpu", B=9):
    rng = np.random.default_rng(5)
    tokens, offsets = make_corpus(rng, 12, 60, 6)
    segs = random_segments(rng, offsets, B)
    to = lambda a: torch.from_numpy(np.asarray(a)).to(device)  # noqa: E731
    return [to(tokens), to(offsets)] + [to(x) for x in segs]


@pytest.mark.parametrize("W,E", [(0, 0), (4, 6)])
def test_opcheck(W, E):
    args = _sample_args()
    torch.library.opcheck(torch.ops.use_kernels.gather_segments.default, (*args, 64, 3, W, E, 5))
    torch.library.opcheck(torch.ops.use_kernels.gather_segments_packed.default, (*args, W, E, 5))


def _compiled_matches(device):
    args = _sample_args(device)
    kw = dict(fep_window=4, num_events=6)

    @torch.compile(fullgraph=True)
    def padded(*a):
        out = gather_segments(*a, max_len=64, pad_id=3, **kw)
        return out.input_ids * out.attention_mask, out.fep_labels.sum(-1), out.fep_mask

    @torch.compile(fullgraph=True, dynamic=True)
    def packed(*a):
        out = gather_segments_packed(*a, **kw)
        return out.input_ids + 1, out.cu_seqlens, out.position_ids, out.fep_labels, out.fep_mask

    want = gather_segments_ref(*args, max_len=64, pad_id=3, **kw)
    ids, nlab, fmask = padded(*args)
    assert torch.equal(ids, want.input_ids * want.attention_mask)
    assert torch.equal(nlab, want.fep_labels.sum(-1))
    assert torch.equal(fmask, want.fep_mask)
    want = gather_segments_packed_ref(*args, **kw)
    got = packed(*args)
    assert torch.equal(got[0], want.input_ids + 1)
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, w)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    _compiled_matches("cpu")


# ---- CUDA (skipped without a GPU; run by benchmarks/device_check.sh) ----------------------------


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("W,E", [(0, 0), (1, 1), (5, 52), (100, 52), (37, 70), (3, 1000)])
def test_cuda_matches_reference(W, E):
    rng = np.random.default_rng(W + E)
    tokens, offsets = make_corpus(rng, 70, 700, max(E, 1))
    segs = random_segments(rng, offsets, 65)
    run_both(tokens, offsets, segs, max_len=int(segs[2].max()) + 5, W=W, E=E, device="cuda")


@CUDA
@pytest.mark.cuda
@settings(max_examples=100, deadline=None)
@given(corpora_and_batches())
def test_cuda_fuzz(case):
    tokens, offsets, segs, W, E, max_len = case
    run_both(tokens, offsets, segs, max_len=max_len, W=W, E=E, device="cuda")


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("name,inputs,message", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cuda_errors(name, inputs, message, layout):
    check_error(inputs, message, layout, "op", "cuda")
    # The op must stay usable after a rejected batch (no sticky CUDA error).
    run_both(*make_corpus(np.random.default_rng(0), 4, 20, 3), ([0], [0], [0]), max_len=2, W=2,
             E=3, device="cuda")


@CUDA
@pytest.mark.cuda
def test_cuda_device_mismatch():
    d = _inputs()
    tok = torch.from_numpy(d["tokens"]).cuda()
    rest = [torch.from_numpy(d[k]) for k in ("offsets", "users", "starts", "lengths")]
    with pytest.raises(RuntimeError, match=re.escape("offsets is on cpu but tokens is on cuda:0")):
        gather_segments(tok, *rest, max_len=16, pad_id=3)


@CUDA
@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    args = _sample_args("cuda")
    torch.library.opcheck(torch.ops.use_kernels.gather_segments.default, (*args, 64, 3, 4, 6, 5))
    torch.library.opcheck(torch.ops.use_kernels.gather_segments_packed.default, (*args, 4, 6, 5))
    torch._dynamo.reset()
    _compiled_matches("cuda")
