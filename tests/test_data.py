"""use.data: vocabulary, readers, the cached corpus, held-out splits and training batches."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import use.data as D
from use.data import (EVENT_OFFSET, PAD_ID, UNK_ID, BatchSampler, Corpus, Vocab, load_corpus,
                      read_csv, read_eval_tsv, read_txt)


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Vocab

def test_vocab_build_order_and_specials():
    v = Vocab.build("b a c b c b d".split())
    # b x3, c x2, then a and d (1 each) in string order
    assert v.tokens == ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "b", "c", "a", "d"]
    assert (v.pad_id, v.event_offset, len(v), v.num_events) == (3, 5, 9, 4)
    assert v.event_types == ["b", "c", "a", "d"]
    assert Vocab.build("b a c b c b d".split(), min_count=2).event_types == ["b", "c"]
    with pytest.raises(ValueError, match="min_count"):
        Vocab.build(["a"], min_count=0)


def test_vocab_encode_decode():
    v = Vocab.build(["x", "y", "y"])
    ids = v.encode(["y", "x", "zzz", "[PAD]", "[MASK]"])
    assert ids.dtype == np.int32
    # Unknown events and special-token strings in the data both become [UNK]: data may not
    # smuggle padding or mask tokens into a sequence.
    assert ids.tolist() == [5, 6, UNK_ID, UNK_ID, UNK_ID]
    assert v.decode([5, 6, 3]) == ["y", "x", "[PAD]"]
    assert v.encode([]).shape == (0,)
    with pytest.raises(IndexError, match="out of range"):
        v.decode([len(v)])


def test_vocab_fingerprint_depends_on_order():
    a = Vocab(list(D.SPECIAL_TOKENS) + ["p", "q"])
    b = Vocab(list(D.SPECIAL_TOKENS) + ["q", "p"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == Vocab(a.tokens).fingerprint()
    assert len(a.fingerprint()) == 64


def test_vocab_rejects_bad_token_lists():
    with pytest.raises(ValueError, match=r"expected special token \[PAD\] at id 3, found '<pad>'"):
        Vocab(["[UNK]", "[CLS]", "[SEP]", "<pad>", "[MASK]"])
    with pytest.raises(ValueError, match="appears twice"):
        Vocab(list(D.SPECIAL_TOKENS) + ["a", "a"])


def test_vocab_json_round_trip(tmp_path):
    v = Vocab.build("käse ☕ tea ☕".split())
    v.save(tmp_path / "vocab.json")
    assert os.listdir(tmp_path) == ["vocab.json"]  # no temporary file left behind
    w = Vocab.load(tmp_path / "vocab.json")
    assert w == v and w.fingerprint() == v.fingerprint()
    obj = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    obj["tokens"][5], obj["tokens"][6] = obj["tokens"][6], obj["tokens"][5]
    write(tmp_path / "edited.json", json.dumps(obj))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        Vocab.load(tmp_path / "edited.json")


def hf_tokenizer_json(vocab_map, added=()):
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for t, i in added],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "[UNK]"}}


def test_vocab_load_hf_tokenizer_json(tmp_path):
    # Specials declared in added_tokens only, events in model.vocab (as DNA tokenizers ship).
    specials = [(t, i) for i, t in enumerate(D.SPECIAL_TOKENS)]
    obj = hf_tokenizer_json({"A": 5, "C": 6, "G": 7, "T": 8, "[CLS]": 1}, added=specials)
    write(tmp_path / "tokenizer.json", json.dumps(obj))
    v = Vocab.load(tmp_path / "tokenizer.json")
    assert v.tokens == list(D.SPECIAL_TOKENS) + ["A", "C", "G", "T"]
    assert v.encode(list("GATTN")).tolist() == [7, 5, 8, 8, UNK_ID]
    # A bare token -> id map (HF vocab.json) works too.
    write(tmp_path / "vocab.json", json.dumps({t: i for i, t in enumerate(v.tokens)}))
    assert Vocab.load(tmp_path / "vocab.json") == v


def test_vocab_load_hf_wrong_special_ids(tmp_path):
    m = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "A": 5}
    write(tmp_path / "tokenizer.json", json.dumps(hf_tokenizer_json(m)))
    with pytest.raises(ValueError) as e:
        Vocab.load(tmp_path / "tokenizer.json")
    msg = str(e.value)
    assert "tokenizer.json" in msg and "expected [UNK] at id 0, found '[PAD]'" in msg
    assert "'[PAD]': 0" in msg  # where the specials actually are


def test_vocab_load_hf_gap_and_bad_files(tmp_path):
    m = {t: i for i, t in enumerate(D.SPECIAL_TOKENS)} | {"A": 5, "B": 7}
    write(tmp_path / "gap.json", json.dumps(hf_tokenizer_json(m)))
    with pytest.raises(ValueError, match="not contiguous"):
        Vocab.load(tmp_path / "gap.json")
    write(tmp_path / "uni.json", json.dumps({"model": {"type": "Unigram", "vocab": [["a", -1.0]]}}))
    with pytest.raises(ValueError, match="Unigram"):
        Vocab.load(tmp_path / "uni.json")
    write(tmp_path / "junk.json", "{not json")
    with pytest.raises(ValueError, match="junk.json"):
        Vocab.load(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Vocab.load(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------
# Readers

def test_read_txt(tmp_path):
    p = write(tmp_path / "u.txt", "a b\tc\n\n  \nd  e \r\nf")
    assert list(read_txt(p)) == [("1", ["a", "b", "c"]), ("4", ["d", "e"]), ("5", ["f"])]


def test_read_txt_char_level(tmp_path):
    p = write(tmp_path / "u.txt", "ab c\r\n\nxy\n")
    # Spaces are events at character level; only the line terminator is stripped.
    assert list(read_txt(p, char_level=True)) == [("1", ["a", "b", " ", "c"]), ("3", ["x", "y"])]


def test_read_txt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(read_txt(tmp_path / "missing.txt"))
    p = write(tmp_path / "bad.txt", b"a b\nc \xff d\n", mode="wb")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: unreadable line, not valid UTF-8"):
        list(read_txt(p))


def test_read_csv(tmp_path):
    p = write(tmp_path / "u.csv",
              'Sequence,User_ID\n'
              'a b,u1\n'
              'c,u2\n'
              '"d, e",u1\n'     # quoted field; the comma is part of an event
              '\n'
              'f,u2\n')
    assert list(read_csv(p)) == [("u1", ["a", "b", "d,", "e"]), ("u2", ["c", "f"])]
    q = write(tmp_path / "c.csv", "user,sequence,extra\nx,ab,1\ny,c,2\nx,d,3\n")
    assert list(read_csv(q, char_level=True)) == [("x", ["a", "b", "d"]), ("y", ["c"])]


def test_read_csv_errors(tmp_path):
    p = write(tmp_path / "nouser.csv", "sequence,name\na,b\n")
    with pytest.raises(ValueError) as e:
        list(read_csv(p))
    assert "missing column(s) 'user_id' (or 'user')" in str(e.value)
    assert "'sequence', 'name'" in str(e.value) and "nouser.csv" in str(e.value)
    p = write(tmp_path / "width.csv", "sequence,user_id\na b,u1\nc,u2,oops\n")
    with pytest.raises(ValueError, match=r"width.csv, line 3: .*3 fields where the header has 2"):
        list(read_csv(p))
    p = write(tmp_path / "empty.csv", "\n\n")
    with pytest.raises(ValueError, match="empty file"):
        list(read_csv(p))


def test_read_eval_tsv(tmp_path):
    p = write(tmp_path / "e.tsv", "user_id\thistory\tcontext\tlabel\n"
                                  "ann\ta b c\td e\t1\n"
                                  "bob\tx\ty z\t0\n")
    ev = read_eval_tsv(p)
    assert len(ev) == 2 and ev.user_ids == ["ann", "bob"] and ev.labels == ["1", "0"]
    assert ev.histories == [["a", "b", "c"], ["x"]] and ev.contexts == [["d", "e"], ["y", "z"]]
    v = Vocab.build("a b c d e x y".split())
    h, c = ev.encode(v)
    assert v.decode(h[0]) == ["a", "b", "c"] and c[1].tolist() == [v.token_to_id("y"), UNK_ID]
    # Optional columns absent: no labels, row numbers as ids; column order is free.
    q = write(tmp_path / "f.tsv", "context\thistory\nab\tcd\n")
    ev = read_eval_tsv(q, char_level=True)
    assert ev.labels is None and ev.user_ids == ["1"] and ev.histories == [["c", "d"]]


def test_read_eval_tsv_errors(tmp_path):
    p = write(tmp_path / "e.tsv", "user_id\thist\tlabel\nu\ta\t1\n")
    with pytest.raises(ValueError) as e:
        read_eval_tsv(p)
    msg = str(e.value)
    assert "e.tsv" in msg and "'history', 'context'" in msg and "'user_id', 'hist', 'label'" in msg
    p = write(tmp_path / "w.tsv", "history\tcontext\na\tb\nc\n")
    with pytest.raises(ValueError, match=r"w.tsv, line 3: .*1 tab-separated fields"):
        read_eval_tsv(p)
    p = write(tmp_path / "h.tsv", "history\tcontext\nq\t \n")
    with pytest.raises(ValueError, match=r"h.tsv, line 2: empty context"):
        read_eval_tsv(p)
    p = write(tmp_path / "n.tsv", "history\tcontext\n")
    with pytest.raises(ValueError, match="no rows"):
        read_eval_tsv(p)


# ----------------------------------------------------------------------------------------------
# Corpus and its cache

def test_load_corpus_csr(tmp_path):
    p = write(tmp_path / "c.txt", "a b a\n\nc\nb a\n")
    c = load_corpus(p, cache=False)
    assert not D.cache_dir_for(p).exists()
    assert c.vocab.event_types == ["a", "b", "c"]
    assert c.tokens.dtype == np.int32 and c.offsets.dtype == np.int64
    assert c.offsets.tolist() == [0, 3, 4, 6] and c.lengths().tolist() == [3, 1, 2]
    assert c.user_ids == ["1", "3", "4"] and c.num_users == 3 and c.num_tokens == 6
    assert [c.vocab.decode(c.user_tokens(u)) for u in range(3)] == [["a", "b", "a"], ["c"], ["b", "a"]]


def test_load_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        load_corpus(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match=r"empty.txt: empty file, no users"):
        load_corpus(write(tmp_path / "empty.txt", "\n \n"))
    with pytest.raises(ValueError, match=r"unsupported data format '.json'"):
        load_corpus(write(tmp_path / "x.json", "{}"))
    with pytest.raises(ValueError, match="read_eval_tsv"):
        load_corpus(write(tmp_path / "x.tsv", "history\tcontext\n"))


def no_tokenize(*a, **k):
    raise AssertionError("re-tokenised although the cache was fresh")


def test_cache_built_reused_invalidated(tmp_path, monkeypatch):
    p = write(tmp_path / "d.txt", "a b c\nb c\n")
    c1 = load_corpus(p)
    cdir = tmp_path / "d.txt.use-cache"
    assert sorted(os.listdir(cdir)) == ["meta.json", "offsets.npy", "tokens.npy", "user_ids.json", "vocab.json"]
    assert sorted(os.listdir(tmp_path)) == ["d.txt", "d.txt.use-cache"]  # no temporary dirs left
    meta = json.loads((cdir / "meta.json").read_text())
    assert meta["size"] == p.stat().st_size and meta["char_level"] is False and len(meta["sha256"]) == 64

    with monkeypatch.context() as m:
        m.setattr(D, "_tokenize", no_tokenize)
        c2 = load_corpus(p)
        assert isinstance(c2.tokens, np.memmap) and not c2.tokens.flags.writeable
        assert c2.tokens.tolist() == c1.tokens.tolist() and c2.vocab == c1.vocab
        # Touched but unchanged (new mtime, same bytes): the sha256 keeps the cache valid.
        os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
        load_corpus(p)

    write(p, "z z z\ny\n")  # new content -> rebuilt
    c3 = load_corpus(p)
    assert c3.vocab.event_types == ["z", "y"] and c3.offsets.tolist() == [0, 3, 4]
    # Same size, same mtime, different bytes cannot be told apart without hashing every load;
    # a different char_level setting is a different corpus.
    c4 = load_corpus(p, char_level=True)
    assert c4.vocab.event_types == ["z", " ", "y"]


def test_cache_with_given_vocab(tmp_path, monkeypatch):
    p = write(tmp_path / "d.txt", "a b c\nb q\n")
    built = load_corpus(p)
    with monkeypatch.context() as m:
        m.setattr(D, "_tokenize", no_tokenize)
        # A given vocabulary equal to the built one encodes identically: the cache is reused.
        assert load_corpus(p, vocab=Vocab(built.vocab.tokens)).vocab == built.vocab
    given = Vocab(list(D.SPECIAL_TOKENS) + ["c", "b"])
    c = load_corpus(p, vocab=given)
    assert c.vocab == given
    assert c.tokens.tolist() == [UNK_ID, 6, 5, 6, UNK_ID]
    with monkeypatch.context() as m:
        m.setattr(D, "_tokenize", no_tokenize)
        assert load_corpus(p, vocab=given).tokens.tolist() == c.tokens.tolist()
    # Without a vocabulary the file's own is built again, not the given one reused.
    again = load_corpus(p)
    assert again.vocab == built.vocab and again.tokens.tolist() == built.tokens.tolist()


def test_cache_corrupt_is_rebuilt(tmp_path):
    p = write(tmp_path / "d.txt", "a b\n")
    load_corpus(p)
    (tmp_path / "d.txt.use-cache" / "tokens.npy").unlink()
    assert load_corpus(p).tokens.tolist() == [5, 6]
    (tmp_path / "d.txt.use-cache" / "meta.json").write_text("{")
    assert load_corpus(p).tokens.tolist() == [5, 6]


def test_cache_is_on_disk_before_install_with_normal_permissions(tmp_path, monkeypatch):
    """Every cache file and the temporary directory are fsynced before the rename that makes
    them visible (a power loss must not leave a valid meta.json beside empty arrays), and the
    installed entries get the umask's permissions, not mkdtemp's/mkstemp's private 0700/0600."""
    p = write(tmp_path / "d.txt", "a b c\nb c\n")
    events = []
    real_fsync, real_install = D.fsync_path, D._install_dir
    monkeypatch.setattr(D, "fsync_path", lambda f: (events.append(("fsync", Path(f))), real_fsync(f)))
    monkeypatch.setattr(D, "_install_dir", lambda t, c: (events.append(("install", Path(t))), real_install(t, c)))
    old_mask = os.umask(0o027)
    try:
        load_corpus(p)
        cdir = D.cache_dir_for(p)
        names = sorted(os.listdir(cdir))
        modes = {n: (cdir / n).stat().st_mode & 0o777 for n in names}
        assert (cdir.stat().st_mode & 0o777) == 0o750 and set(modes.values()) == {0o640}, (oct(cdir.stat().st_mode), modes)

        kinds = [k for k, _ in events]
        assert kinds.count("install") == 1, events
        tmp = events[kinds.index("install")][1]
        before = [f for k, f in events[:kinds.index("install")]]
        assert {f.name for f in before if f.parent == tmp} == set(names), before
        assert tmp in before and before.index(tmp) > max(i for i, f in enumerate(before) if f.parent == tmp), \
            "the directory is fsynced after its files"

        # The mtime-only refresh rewrites meta.json atomically with the same permissions.
        os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
        before_meta = (cdir / "meta.json").stat().st_ino
        load_corpus(p)
        assert (cdir / "meta.json").stat().st_ino != before_meta, "meta.json was not rewritten"
        assert (cdir / "meta.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old_mask)


def test_cache_unwritable_falls_back_to_memory(tmp_path, monkeypatch):
    p = write(tmp_path / "d.txt", "a b\nb\n")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(D.tempfile, "mkdtemp", refuse)
    with pytest.warns(UserWarning, match="cannot write the cache next to"):
        c = load_corpus(p)
    assert c.tokens.tolist() == [6, 5, 5] and not D.cache_dir_for(p).exists()


def test_corpus_csv(tmp_path):
    p = write(tmp_path / "d.csv", "user_id,sequence\nu2,a b\nu1,c\nu2,d\n")
    c = load_corpus(p)
    assert c.user_ids == ["u2", "u1"] and c.lengths().tolist() == [3, 1]


def test_corpus_validates_arrays():
    v = Vocab.build(["a"])
    with pytest.raises(TypeError, match="int32"):
        Corpus(np.zeros(3, np.int64), np.array([0, 3]), v, ["u"])
    with pytest.raises(ValueError, match="len\\(tokens\\)=3"):
        Corpus(np.zeros(3, np.int32), np.array([0, 2]), v, ["u"])


def synthetic_corpus(lengths, num_events=7, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(EVENT_OFFSET, EVENT_OFFSET + num_events, size=int(offsets[-1])).astype(np.int32)
    vocab = Vocab(list(D.SPECIAL_TOKENS) + [f"e{i}" for i in range(num_events)])
    return Corpus(tokens, offsets, vocab, [str(i) for i in range(len(lengths))])


def test_split():
    c = synthetic_corpus([5] * 101)
    tr, va = c.split(0.1, seed=3)
    assert len(va) == 10 and len(tr) == 91 and tr.dtype == np.int64
    assert not set(tr) & set(va) and sorted(set(tr) | set(va)) == list(range(101))
    tr2, va2 = c.split(0.1, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(va, c.split(0.1, seed=4)[1])
    assert len(c.split(0.0)[1]) == 0 and len(c.split(0.001)[1]) == 1  # nonzero fraction -> >= 1
    with pytest.raises(ValueError, match="val_fraction"):
        c.split(1.0)


# ----------------------------------------------------------------------------------------------
# BatchSampler

def fep_truth(tokens, offsets, u, p_abs, W, E):
    """Multi-hot of the next W tokens of user u after absolute position p_abs (None if < W left)."""
    end = offsets[u + 1]
    if p_abs + W >= end:
        return None
    out = np.zeros(E, np.uint8)
    for t in tokens[p_abs + 1:p_abs + W + 1]:
        out[t - EVENT_OFFSET] = 1
    return out


@pytest.mark.parametrize("objective", ["clm", "fep", "sup", "fep_sup", "clm_fep_sup"])
def test_batch_sampler_shapes_and_content(objective):
    c = synthetic_corpus([40, 3, 70, 25, 90, 33, 60, 12, 55, 48])
    bs = BatchSampler(c, batch_size=4, min_len=4, max_len=11, objective=objective, gap=2,
                      fep_window=3, seed=1)
    sup, fep = "sup" in objective, "fep" in objective
    for _ in range(3):
        b = bs.next_batch()
        assert len(b.views) == (2 if sup else 1) and b.users.shape == (4,)
        width = max(int(ln.max()) for ln in b.lengths)
        assert b.num_tokens == sum(int(ln.sum()) for ln in b.lengths)
        if sup:
            assert len(set(b.users.tolist())) == 4  # in-batch negatives are other users
            assert np.all(b.starts[1] >= b.starts[0] + b.lengths[0] + 2)  # non-overlapping, gap 2
        for v, st, ln in zip(b.views, b.starts, b.lengths):
            assert v.input_ids.shape == (4, width) and v.input_ids.dtype == torch.int64
            assert v.attention_mask.dtype == torch.bool
            assert np.all((ln >= 4) & (ln <= 11))
            assert (v.fep_labels is not None) == fep and (v.fep_mask is not None) == fep
            for r in range(4):
                u, s, n = int(b.users[r]), int(st[r]), int(ln[r])
                seg = c.tokens[c.offsets[u] + s:c.offsets[u] + s + n]
                assert v.input_ids[r, :n].tolist() == seg.tolist()
                assert torch.all(v.input_ids[r, n:] == PAD_ID)
                assert v.attention_mask[r].tolist() == [True] * n + [False] * (width - n)
                if fep:
                    assert v.fep_labels.shape == (4, width, c.vocab.num_events)
                    assert v.fep_labels.dtype == torch.uint8
                    for i in range(n):
                        truth = fep_truth(c.tokens, c.offsets, u, c.offsets[u] + s + i, 3, 7)
                        assert bool(v.fep_mask[r, i]) == (truth is not None)
                        if truth is not None:
                            assert v.fep_labels[r, i].tolist() == truth.tolist()


def batches_equal(a, b):
    return (np.array_equal(a.users, b.users) and a.num_tokens == b.num_tokens
            and all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.views, b.views)))


def test_batch_sampler_determinism_and_resume():
    c = synthetic_corpus(list(range(20, 60)))
    kw = dict(batch_size=5, min_len=3, max_len=9, objective="fep_sup", gap=1, fep_window=2, seed=7)
    a = BatchSampler(c, **kw)
    run = [a.next_batch() for _ in range(6)]
    b = BatchSampler(c, **kw)
    assert all(batches_equal(x, b.next_batch()) for x in run)
    assert not batches_equal(run[0], run[1])
    assert not batches_equal(run[0], BatchSampler(c, **{**kw, "seed": 8}).next_batch())

    a = BatchSampler(c, **kw)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    resumed = BatchSampler(c, **kw)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    for x in run[3:]:
        y = resumed.next_batch()
        assert y.step == x.step and batches_equal(x, y)
    with pytest.raises(ValueError, match="seed=7 in the saved state, 8 in this sampler"):
        BatchSampler(c, **{**kw, "seed": 8}).load_state_dict(state)


def test_batch_sampler_shards():
    c = synthetic_corpus([30] * 23)
    train = np.arange(2, 23)
    seen = []
    for rank in range(3):
        bs = BatchSampler(c, users=train, batch_size=4, min_len=2, max_len=5, objective="sup",
                          seed=0, rank=rank, world_size=3)
        assert np.array_equal(bs.users, train[rank::3])
        drawn = set()
        for _ in range(10):
            drawn |= set(bs.next_batch().users.tolist())
        assert drawn <= set(train[rank::3].tolist())
        seen.append(drawn)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(c, batch_size=2, min_len=2, max_len=5, objective="clm", rank=3, world_size=3)


def test_batch_sampler_too_short_corpus():
    c = synthetic_corpus([5, 30, 8, 40, 9])
    with pytest.raises(ValueError) as e:
        BatchSampler(c, batch_size=4, min_len=6, max_len=12, objective="fep_sup", gap=3, fep_window=2)
    msg = str(e.value)
    # SUP needs 2*6+3 = 15 events per user: 2 of the 5 users have them, 4 are needed.
    assert "only 2 of 5 users" in msg and ">= 15 events" in msg and "4 are needed" in msg
    with pytest.raises(ValueError, match=r"only 0 of 5 users .*>= 41 events.*longest has 40"):
        BatchSampler(c, batch_size=2, min_len=41, max_len=50, objective="clm")
    # clm/fep rows may repeat a user: one long-enough user suffices.
    bs = BatchSampler(c, batch_size=4, min_len=31, max_len=50, objective="clm")
    assert bs.next_batch().users.tolist() == [3, 3, 3, 3]


def test_batch_sampler_argument_errors():
    c = synthetic_corpus([30] * 4)
    with pytest.raises(ValueError, match="objective must be one of"):
        BatchSampler(c, batch_size=2, min_len=2, max_len=5, objective="mlm")
    with pytest.raises(ValueError, match="fep_window >= 1"):
        BatchSampler(c, batch_size=2, min_len=2, max_len=5, objective="fep")
    with pytest.raises(ValueError, match="min_len <= max_len"):
        BatchSampler(c, batch_size=2, min_len=6, max_len=5, objective="clm")
    with pytest.raises(ValueError, match=r"user indices must be in \[0, 4\)"):
        BatchSampler(c, users=[0, 4], batch_size=2, min_len=2, max_len=5, objective="clm")
