"""Stateful embedding: carrying states across pieces equals embedding the whole sequence.

Ground truth: the model run on one whole sequence (no packing, no pieces), mean of the
last-layer token states, in float64. Tolerances are float64 rounding (1e-12 on values of
order 1e-2..1); the float32 CLI test uses a float32 bound.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from use.config import USEConfig
from use.data import Vocab
from use.embed import (STRATEGIES, Carry, Embedder, _greedy_batches, embed_periods, main as embed_main,
                       read_user_events)
from use.model import USEModel

V_EVENTS = 12
TOL64 = 1e-12


def tiny_model(backend="torch", seed=0, dtype=torch.float64, hidden=32):
    cfg = USEConfig(vocab_size=5 + V_EVENTS, num_events=V_EVENTS, hidden_size=hidden, num_layers=2,
                    num_heads=4, backend=backend, chunk_size=16)
    torch.manual_seed(seed)
    return USEModel(cfg).to(dtype).eval()


def tiny_vocab():
    return Vocab(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + [f"e{i}" for i in range(V_EVENTS)])


def rand_seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 5 + V_EVENTS, size=n) for n in lengths]


@torch.no_grad()
def truth(model, seq) -> np.ndarray:
    """Mean of last-layer token states of one whole sequence, the plain [1, T] way."""
    if len(seq) == 0:
        return np.zeros(model.config.hidden_size)
    out = model(torch.as_tensor(seq, dtype=torch.long).view(1, -1))
    return out.hidden[0].mean(0).double().numpy()


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got - want)
    if diff.max() > tol:
        idx = np.unravel_index(diff.argmax(), diff.shape)
        raise AssertionError(f"{what}: max abs diff {diff.max():.3e} (mean {diff.mean():.3e}) > {tol:.0e} "
                             f"at {idx}: got {got[idx]!r}, want {want[idx]!r}")


@pytest.fixture(scope="module")
def m64():
    return tiny_model()


def test_packed_batches_and_pieces_equal_whole_sequences(m64):
    seqs = rand_seqs([1, 7, 63, 65, 130, 0, 16])
    want = np.stack([truth(m64, s) for s in seqs])
    # max_tokens=20 cuts the long sequences into pieces run with carried state; max_seqs=3 splits batches
    for kw in (dict(max_tokens=10_000), dict(max_tokens=20, max_seqs=3)):
        assert_close(Embedder(m64, **kw).embed(seqs), want, TOL64, f"Embedder({kw})")
    short = [0, 1, 5, 6]                           # one token per forward call: the recurrence itself
    assert_close(Embedder(m64, max_tokens=1).embed([seqs[i] for i in short]), want[short], TOL64, "max_tokens=1")


@settings(max_examples=12, deadline=None)
@given(cuts=st.lists(st.integers(0, 90), min_size=0, max_size=4), max_tokens=st.sampled_from([7, 32, 1000]))
def test_stateful_any_split_equals_whole(m64, cuts, max_tokens):
    seqs = rand_seqs([90, 41, 5], seed=len(cuts))
    bounds = sorted(set([0, 90] + cuts))
    emb = Embedder(m64, max_tokens=max_tokens)
    carry = None
    for a, b in zip(bounds[:-1], bounds[1:]):
        carry = emb.advance([s[a:b] for s in seqs], carry)
    want = np.stack([truth(m64, s) for s in seqs])
    assert_close(carry.embeddings().numpy(), want, TOL64, f"split at {bounds}")
    assert carry.counts.tolist() == [90, 41, 5]


def test_advance_with_index_touches_only_those_rows(m64):
    seqs = rand_seqs([30, 30, 30])
    emb = Embedder(m64)
    carry = emb.advance([s[:10] for s in seqs])
    before = [s.clone() for s in carry.states]
    emb.advance([seqs[2][10:], seqs[0][10:]], carry, index=[2, 0])
    assert torch.equal(carry.states[0][1], before[0][1]) and carry.counts.tolist() == [30, 10, 30]
    assert_close(carry.embeddings().numpy()[[0, 2]], np.stack([truth(m64, seqs[0]), truth(m64, seqs[2])]),
                 TOL64, "indexed advance")


def test_embed_periods_strategies(m64):
    P, L = 4, 12
    seqs = rand_seqs([48, 60, 30, 11, 47])      # full periods: 4, 4 (capped), 2, 0, 3
    emb = Embedder(m64, max_tokens=25)
    run = embed_periods(emb, seqs, P, L, STRATEGIES, progress=False)
    assert run.periods_available.tolist() == [4, 4, 2, 0, 3]
    for s in STRATEGIES:
        assert run.embeddings[s].shape == (P, 5, 32)
    assert_close(run.embeddings["stateful"], run.embeddings["recompute"], TOL64, "stateful vs recompute")
    for p in range(P):
        for u, s in enumerate(seqs):
            k = min(p + 1, run.periods_available[u])     # periods the user has shown by period p
            if k == 0:
                for strat in STRATEGIES:
                    assert not run.embeddings[strat][p, u].any(), f"user without a full period, {strat}"
                continue
            assert_close(run.embeddings["stateful"][p, u], truth(m64, s[:k * L]), TOL64, f"stateful p={p} u={u}")
            assert_close(run.embeddings["recent"][p, u], truth(m64, s[(k - 1) * L:k * L]), TOL64, f"recent p={p} u={u}")
            pool = np.mean([truth(m64, s[q * L:(q + 1) * L]) for q in range(k)], axis=0)
            assert_close(run.embeddings["pool"][p, u], pool, TOL64, f"pool p={p} u={u}")
    # costs: stateful runs one period per active user, recompute the whole prefix
    assert run.tokens["stateful"].tolist() == [4 * L, 4 * L, 3 * L, 2 * L]
    assert run.tokens["recompute"].tolist() == [4 * L, 4 * 2 * L, 3 * 3 * L, 2 * 4 * L]


def test_float32_model_matches_float64_truth_closely():
    m = tiny_model(dtype=torch.float32)
    seqs = rand_seqs([200, 3])
    got = Embedder(m, max_tokens=50).embed(seqs)
    assert got.dtype == np.float32
    want = np.stack([truth(tiny_model(dtype=torch.float64), s) for s in seqs])
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2e-5


def test_greedy_batches_respect_limits():
    lens = np.array([5, 5, 5, 10, 1, 1, 1, 1, 9])
    batches = list(_greedy_batches(lens, 10, 3))
    assert [list(range(len(lens)))[b] for b in batches] == [[0, 1], [2], [3], [4, 5, 6], [7, 8]]


def test_bad_inputs(m64):
    emb = Embedder(m64)
    with pytest.raises(ValueError, match=r"sequence 1: token id 99 outside the model vocabulary \[0, 17\)"):
        emb.embed([np.array([5, 6]), np.array([5, 99])])
    with pytest.raises(TypeError, match="sequence 0: token ids must be integers.*encode event strings"):
        emb.embed([np.array(["e1", "e2"])])
    carry = Carry.empty(m64, 3)
    with pytest.raises(ValueError, match="repeated rows"):
        emb.advance([np.array([5]), np.array([6])], carry, index=[1, 1])
    with pytest.raises(ValueError, match="2 sequences but the carry has 3 rows"):
        emb.advance([np.array([5]), np.array([6])], carry)
    with pytest.raises(ValueError, match="unknown strategies"):
        embed_periods(emb, [np.array([5])], 1, 1, ["stateless"])


# ----------------------------------------------------------------------------- use-embed
def _model_dir(tmp_path, dtype=torch.float32):
    from use.checkpoint import save_model_dir
    m = tiny_model(dtype=dtype)
    d = tmp_path / "model"
    save_model_dir(m.float(), tiny_vocab(), d)
    return d


def test_use_embed_cli_updates_store_incrementally(tmp_path, capsys):
    from use.checkpoint import load_model_dir
    mdir = _model_dir(tmp_path)
    model, vocab = load_model_dir(mdir)
    rng = np.random.default_rng(1)
    events = {u: [f"e{i}" for i in rng.integers(0, V_EVENTS, size=n)] for u, n in (("ann", 70), ("bob", 33))}
    (tmp_path / "a.tsv").write_text("user_id\tevents\n"
                                    f"ann\t{' '.join(events['ann'][:30])}\n"
                                    f"bob\t{' '.join(events['bob'][:3])}\n\n"
                                    f"ann\t{' '.join(events['ann'][30:50])}\n")
    (tmp_path / "b.tsv").write_text(f"bob\t{' '.join(events['bob'][3:])} unseen_event\n"
                                    f"ann\t{' '.join(events['ann'][50:])}\n")
    store = tmp_path / "store"
    assert embed_main(["--model", str(mdir), "--store", str(store), "--input", str(tmp_path / "a.tsv"), "--quiet"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [l.split("\t")[0] for l in printed] == ["ann", "bob"]
    out = tmp_path / "emb.tsv"
    assert embed_main(["--model", str(mdir), "--store", str(store), "--input", str(tmp_path / "b.tsv"),
                       "--output", str(out), "--quiet"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("user_id\te0\t") and [r.split("\t")[0] for r in rows[1:]] == ["bob", "ann"]
    got = np.array([[float(x) for x in r.split("\t")[1:]] for r in rows[1:]])
    m64 = model.double()
    want = np.stack([truth(m64, vocab.encode(events["bob"] + ["unseen_event"])),
                     truth(m64, vocab.encode(events["ann"]))])
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-5
    npy = tmp_path / "emb.npy"
    assert embed_main(["--model", str(mdir), "--store", str(store), "--input", str(tmp_path / "b.tsv"),
                       "--output", str(npy), "--no-save", "--quiet"]) == 0
    assert np.load(npy).shape == (2, 32) and (tmp_path / "emb.ids.txt").read_text() == "bob\nann\n"


def test_use_embed_bad_inputs(tmp_path, capsys):
    mdir = _model_dir(tmp_path)
    (tmp_path / "bad.tsv").write_text("u1\te1 e2\nu2 e3 e4\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 2: expected `user_id<TAB>events`, found no tab"):
        read_user_events(tmp_path / "bad.tsv", tiny_vocab())
    args = ["--model", str(mdir), "--store", str(tmp_path / "s"), "--input", str(tmp_path / "bad.tsv")]
    assert embed_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("use-embed: error: ") and "bad.tsv, line 2: expected `user_id<TAB>events`" in err
    (mdir / "model.safetensors").unlink()
    assert embed_main(args) == 2
    assert "has no model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "s").exists(), "a failed run must not create the store"
