"""UserStateStore: updates equal whole-history embeddings (float64), persistence is versioned,
tied to the model, memory-mapped, and survives a crash at any point of a save."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import use
from use import store as store_mod
from use.store import CURRENT, UserStateStore

from test_embed import TOL64, assert_close, rand_seqs, tiny_model, tiny_vocab, truth


@pytest.fixture(scope="module")
def m64():
    return tiny_model()


def _fill(model, users=("a", "b", "c", "d"), lengths=(40, 25, 60, 1), **kw):
    """A store fed the sequences in three uneven updates (with a repeated user in one call)."""
    seqs = dict(zip(users, rand_seqs(lengths, seed=3)))
    s = UserStateStore(model, **kw)
    s.update(["a", "b"], [seqs["a"][:7], seqs["b"][:0]])
    s.update(["c", "a", "b", "a", "d"], [seqs["c"][:31], seqs["a"][7:8], seqs["b"], seqs["a"][8:20], seqs["d"]])
    last = s.update(["c", "a"], [seqs["c"][31:], seqs["a"][20:]])
    return s, seqs, last


def test_store_is_exported_lazily():
    assert use.UserStateStore is UserStateStore


def test_updates_equal_whole_history(m64):
    s, seqs, last = _fill(m64, max_tokens=9, chunk_bytes=1)     # tiny limits: pieces and one user per chunk
    want = {u: truth(m64, q) for u, q in seqs.items()}
    assert_close(last, np.stack([want["c"], want["a"]]), TOL64, "update() return value")
    assert_close(s.embeddings(["a", "b", "c", "d"]), np.stack([want[u] for u in "abcd"]), TOL64, "embeddings()")
    assert s.user_ids == ["a", "b", "c", "d"] and len(s) == 4 and "c" in s and "z" not in s
    assert [s.num_events(u) for u in "abcd"] == [40, 25, 60, 1]
    assert s.state("a")["states"].shape == (2, 4, 8, 8) and s.state("a")["count"] == 40


def test_repeated_user_in_one_call_gets_both_sequences_in_order(m64):
    q = rand_seqs([30], seed=9)[0]
    s = UserStateStore(m64)
    out = s.update(["u", "v", "u"], [q[:10], q[:4], q[10:]])
    assert_close(out[[0, 2]], np.stack([truth(m64, q)] * 2), TOL64, "both rows of u")
    assert_close(out[1], truth(m64, q[:4]), TOL64, "v")


def test_unknown_and_empty_users(m64):
    s = UserStateStore(m64)
    with pytest.raises(KeyError, match="unknown user 'ghost': the store has 0 users"):
        s.embedding("ghost")
    out = s.update(["new"], [[]])
    assert not out.any() and s.num_events("new") == 0
    with pytest.raises(ValueError, match=r"event_sequences\[1\] \(user 'y'\): token id 17 outside"):
        s.update(["x", "y"], [[5], [6, 17]])
    assert "x" not in s, "a failed update must not add users"
    with pytest.raises(TypeError, match="holds event strings; create the store with vocab="):
        s.update(["x"], [["e1", "e2"]])
    sv = UserStateStore(m64, vocab=tiny_vocab())
    assert_close(sv.update(["x"], [["e1", "e2"]])[0], truth(m64, [6, 7]), TOL64, "vocab-encoded update")
    with pytest.raises(ValueError, match="2 user ids but 1 event sequences"):
        s.update(["x", "y"], [[5]])


def _contents(s):
    """Everything a store holds, copied: ids, row index, every row of every array, embeddings."""
    rows = np.arange(len(s))
    assert all(len(r) == len(s) for r in s._rows.values()), "arrays out of step with the ids"
    return {"ids": s.user_ids, "index": dict(s._index), "embeddings": s.embeddings(),
            **{k: r.take(rows) for k, r in s._rows.items()}}


def _assert_same_contents(got, want, what):
    assert got["ids"] == want["ids"] and got["index"] == want["index"], f"{what}: user ids differ"
    for k in ("states", "sums", "counts", "embeddings"):
        assert np.array_equal(got[k], want[k]), f"{what}: {k} differ"


@pytest.mark.parametrize("fail_at", [2, 3])
@pytest.mark.parametrize("where", ["in_memory", "loaded"])
def test_failed_update_leaves_the_store_unchanged_and_a_retry_works(m64, tmp_path, monkeypatch, where, fail_at):
    """One user per chunk; the model run of chunk `fail_at` raises (KeyboardInterrupt: a
    BaseException) after earlier chunks were written back, one of them to a new user's row."""
    s, _, _ = _fill(m64, chunk_bytes=1)
    if where == "loaded":            # existing rows in the copy-on-write memory map, not the tail
        s.save(tmp_path / "st")
        s = UserStateStore.load(tmp_path / "st", m64, chunk_bytes=1)
    clean = UserStateStore.load(tmp_path / "st", m64, chunk_bytes=1) if where == "loaded" else _fill(m64, chunk_bytes=1)[0]
    before = _contents(s)
    users = ["new1", "a", "new2", "c"]
    seqs = rand_seqs([5, 9, 3, 12], seed=11)

    real, calls = s._embedder.advance, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt(f"chunk {fail_at} (simulated)")
        return real(*a, **k)
    monkeypatch.setattr(s._embedder, "advance", flaky)
    with pytest.raises(KeyboardInterrupt):
        s.update(users, seqs)
    assert len(calls) == fail_at
    _assert_same_contents(_contents(s), before, "after the failed update")
    assert "new1" not in s and "new2" not in s

    # The retry (advance no longer fails) equals one clean update: no events counted twice and
    # the new users start from zero rows.
    got = s.update(users, seqs)
    want = clean.update(users, seqs)
    assert np.array_equal(got, want)
    _assert_same_contents(_contents(s), _contents(clean), "retry vs clean update")
    assert [s.num_events(u) for u in users] == [5, 40 + 9, 3, 60 + 12]


def test_save_load_continue_equals_whole(m64, tmp_path):
    s, seqs, _ = _fill(m64)
    vdir = s.save(tmp_path / "st")
    assert (tmp_path / "st" / CURRENT).read_text() == "v000001\n" and vdir.name == "v000001"
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["architecture_hash"] == m64.config.architecture_hash() and manifest["num_users"] == 4
    t = UserStateStore.load(tmp_path / "st", m64)
    assert isinstance(t._rows["states"].base, np.memmap), "states must be memory-mapped"
    assert_close(t.embeddings(), s.embeddings(), 0.0, "loaded == saved (bit for bit)")
    more = rand_seqs([11, 5], seed=5)
    on_disk = (vdir / "states.npy").read_bytes()
    t.update(["b", "e"], more)                       # an old user (mmapped row) and a new one
    assert (vdir / "states.npy").read_bytes() == on_disk, "updates must not write into the saved files"
    assert_close(t.embedding("b"), truth(m64, np.concatenate([seqs["b"], more[0]])), TOL64, "continued after load")
    assert_close(t.embedding("e"), truth(m64, more[1]), TOL64, "new user after load")
    t.save()                                         # back to where it was loaded from
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == [CURRENT, "v000002"]
    u = UserStateStore.load(tmp_path / "st", m64, mmap=False)
    assert_close(u.embeddings(), t.embeddings(), 0.0, "second version")
    assert u.user_ids == ["a", "b", "c", "d", "e"]


def test_load_with_another_model_is_a_clear_error(m64, tmp_path):
    s, _, _ = _fill(m64)
    s.save(tmp_path / "st")
    other_arch = tiny_model(hidden=64)
    with pytest.raises(ValueError, match=r"another model architecture .*hidden 32, 2 layers.*this model has hash .*hidden 64"):
        UserStateStore.load(tmp_path / "st", other_arch)
    retrained = tiny_model(seed=1)
    with pytest.raises(ValueError, match="written with other model weights"):
        UserStateStore.load(tmp_path / "st", retrained)
    assert len(UserStateStore.load(tmp_path / "st", retrained, check_weights=False)) == 4


def test_bad_store_directories(m64, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UserStateStore.load(tmp_path / "nope", m64)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a user-state store: no CURRENT file"):
        UserStateStore.load(tmp_path / "junk", m64)
    with pytest.raises(ValueError, match="non-empty directory that is not a user-state store"):
        UserStateStore(m64).save(tmp_path / "junk")
    s, _, _ = _fill(m64)
    s.save(tmp_path / "st")
    (tmp_path / "st" / CURRENT).write_text("v000009\n")
    with pytest.raises(ValueError, match="names version v000009, but .* is missing"):
        UserStateStore.load(tmp_path / "st", m64)


# ----------------------------------------------------------------------------- crash safety
def _snapshot(path, model):
    t = UserStateStore.load(path, model, mmap=False)
    return t.user_ids, t.embeddings(), [t.state(u)["states"] for u in t.user_ids]


def _same(a, b):
    assert a[0] == b[0]
    assert np.array_equal(a[1], b[1])
    assert all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))


@pytest.mark.parametrize("where", ["mid_write", "before_switch"])
def test_exception_during_save_keeps_the_last_version(m64, tmp_path, monkeypatch, where):
    s, _, _ = _fill(m64)
    s.save(tmp_path / "st")
    before = _snapshot(tmp_path / "st", m64)
    s.update(["a", "zed"], rand_seqs([9, 9], seed=7))

    if where == "mid_write":                    # dies after the first array file is written
        real = np.lib.format.open_memmap
        calls = []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full (simulated)")
            return real(*a, **k)
        monkeypatch.setattr(np.lib.format, "open_memmap", flaky)
        err = OSError
    else:                                       # the new version is complete, CURRENT not yet switched
        def boom(*a, **k):
            raise KeyboardInterrupt("killed before the switch (simulated)")
        monkeypatch.setattr(store_mod, "atomic_write_text", boom)
        err = KeyboardInterrupt
    with pytest.raises(err):
        s.save(tmp_path / "st")
    monkeypatch.undo()
    _same(_snapshot(tmp_path / "st", m64), before)
    # the next save succeeds and clears what the failed one left behind
    s.save(tmp_path / "st")
    names = sorted(p.name for p in (tmp_path / "st").iterdir())
    assert names[0] == CURRENT and len(names) == 2 and names[1].startswith("v"), names
    assert "zed" in UserStateStore.load(tmp_path / "st", m64)


def test_process_killed_mid_save_keeps_the_last_version(tmp_path):
    """A real crash: a child process saves version 2 and is killed (os._exit) after half the
    files; the parent then finds version 1 intact and a later save cleans up."""
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_embed import tiny_model, rand_seqs
        from use.store import UserStateStore
        m = tiny_model()
        s = UserStateStore(m)
        s.update(["a", "b"], rand_seqs([30, 20]))
        s.save({str(tmp_path / "st")!r})
        s.update(["a", "c"], rand_seqs([5, 5], seed=1))
        real, n = np.lib.format.open_memmap, []
        def dying(*a, **k):
            n.append(1)
            if len(n) == 3:
                os._exit(17)                # no cleanup, no exception handlers: a kill
            return real(*a, **k)
        np.lib.format.open_memmap = dying
        s.save({str(tmp_path / "st")!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 17, r.stderr[-2000:]
    leftovers = [p.name for p in (tmp_path / "st").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save should have left a partial temporary directory"
    m = tiny_model()
    t = UserStateStore.load(tmp_path / "st", m)
    want = rand_seqs([30, 20])
    assert t.user_ids == ["a", "b"]
    assert_close(t.embeddings(["a", "b"]), np.stack([truth(m, q) for q in want]), TOL64, "version 1 after the kill")
    t.save()
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == [CURRENT, "v000002"]
