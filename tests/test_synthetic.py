"""use.synthetic: determinism, learnable structure (groups, users, sequences) and the data set files."""
import json
import os

import numpy as np
import pytest

from use import synthetic as S
from use.data import load_corpus, read_eval_tsv, read_txt


def histograms(seqs, names):
    index = {n: i for i, n in enumerate(names)}
    H = np.zeros((len(seqs), len(names)))
    for r, s in enumerate(seqs):
        np.add.at(H[r], [index[e] for e in s], 1)
    return H


def tfidf(H, idf):
    X = H / H.sum(1, keepdims=True) * idf
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_generate_is_deterministic():
    a, ga = S.generate(num_users=30, events_per_user=(50, 120), num_groups=4, seed=5)
    b, gb = S.generate(num_users=30, events_per_user=(50, 120), num_groups=4, seed=5)
    c, _ = S.generate(num_users=30, events_per_user=(50, 120), num_groups=4, seed=6)
    assert a == b and np.array_equal(ga, gb)
    assert a != c
    assert all(50 <= len(s) <= 120 for s in a)
    assert ga.dtype == np.int64 and np.bincount(ga).tolist() == [8, 8, 7, 7]  # balanced
    names = set(S.event_names(48))
    assert all(e in names for s in a for e in s)


def test_event_names():
    assert S.event_names(48)[:5] == ["view_news", "like_news", "share_news", "buy_news", "view_sports"]
    assert len(set(S.event_names(60))) == 60 and S.event_names(60)[-1] == "buy_topic14"
    with pytest.raises(ValueError, match="num_events"):
        S.event_names(0)
    with pytest.raises(ValueError, match="events_per_user"):
        S.generate(num_users=2, events_per_user=(10, 5))


def test_groups_are_distinguishable():
    """TF-IDF nearest centroid, fit on some users and tested on others, beats chance (1/G) clearly.
    Without the group structure (or with labels shuffled) this stays near 1/G."""
    G = 6
    seqs, groups = S.generate(num_users=240, events_per_user=400, num_groups=G, seed=1)
    names = S.event_names(48)
    H = histograms(seqs, names)
    idf = np.log(len(H) / (1 + (H > 0).sum(0))) + 1
    X = tfidf(H, idf)
    fit, test = np.arange(160), np.arange(160, 240)
    cent = np.stack([X[fit][groups[fit] == g].mean(0) for g in range(G)])
    acc = np.mean(np.argmax(X[test] @ cent.T, 1) == groups[test])
    assert acc > 3.0 / G, acc


def test_users_are_reidentifiable_and_sequences_structured():
    seqs, _ = S.generate(num_users=60, events_per_user=600, num_groups=4, seed=2)
    names = S.event_names(48)
    early = histograms([s[:300] for s in seqs], names)
    late = histograms([s[300:] for s in seqs], names)
    idf = np.ones(48)
    sim = tfidf(late, idf) @ tfidf(early, idf).T
    top1 = np.mean(np.argmax(sim, 1) == np.arange(60))
    assert top1 > 0.3, top1  # chance is 1/60
    # Sequential structure: the next event repeats the previous one far more often than
    # independent draws from the user's own event frequencies would.
    for s, h in zip(seqs[:10], early[:10]):
        p = h / h.sum()
        repeat = np.mean([a == b for a, b in zip(s[:-1], s[1:])])
        assert repeat > (p ** 2).sum() + 0.05


def small_params(**kw):
    return dict(num_users=40, events_per_user=(60, 90), num_eval_users=12, history_len=80,
                context_len=50, num_groups=3, seed=0) | kw


def test_write_default_dataset(tmp_path):
    ds = S.write_default_dataset(tmp_path / "d", **small_params())
    assert ds.generated and sorted(os.listdir(tmp_path / "d")) == ["eval.tsv", "meta.json", "train.txt"]
    train = list(read_txt(ds.train))
    seqs, groups = S.generate(num_users=40, events_per_user=(60, 90), num_groups=3, seed=0)
    assert [ev for _, ev in train] == seqs  # train.txt holds generate()'s users, line by line

    ev = read_eval_tsv(ds.eval)
    assert len(ev) == 12 and ev.user_ids[:2] == ["eval00", "eval01"]
    assert all(len(h) == 80 for h in ev.histories) and all(len(c) == 50 for c in ev.contexts)
    assert sorted(set(ev.labels)) == ["0", "1", "2"]
    # Eval users are other people than the training users (their own random stream).
    train_starts = {tuple(s[:20]) for s in seqs}
    assert not any(tuple(h[:20]) in train_starts for h in ev.histories)

    meta = json.loads(ds.meta.read_text())
    assert meta["params"]["num_users"] == 40 and len(meta["event_types"]) == 48
    assert meta["num_train_events"] == sum(len(s) for s in seqs)
    corpus = load_corpus(ds.train)
    assert corpus.num_users == 40 and set(corpus.vocab.event_types) <= set(meta["event_types"])


def test_write_default_dataset_is_idempotent(tmp_path):
    d = tmp_path / "d"
    S.write_default_dataset(d, **small_params())
    stamp = {f: (d / f).stat().st_mtime_ns for f in ("train.txt", "eval.tsv", "meta.json")}
    again = S.write_default_dataset(d, **small_params())
    assert not again.generated
    assert stamp == {f: (d / f).stat().st_mtime_ns for f in stamp}
    # Other parameters, a damaged file, or force: regenerated.
    assert S.write_default_dataset(d, **small_params(seed=1)).generated
    with open(d / "train.txt", "a") as f:
        f.write("extra\n")
    assert S.write_default_dataset(d, **small_params(seed=1)).generated
    assert S.write_default_dataset(d, **small_params(seed=1), force=True).generated
    assert sorted(os.listdir(d)) == ["eval.tsv", "meta.json", "train.txt"]  # no temp files


def test_cli(tmp_path, capsys):
    S.main(["--out", str(tmp_path / "c"), "--num-users", "5", "--min-events", "20", "--max-events", "30",
            "--num-eval-users", "3", "--history-len", "10", "--context-len", "10", "--num-groups", "2"])
    assert "wrote" in capsys.readouterr().out
    assert len(list(read_txt(tmp_path / "c" / "train.txt"))) == 5
