"""Evaluation metrics on hand-made inputs, the probe on separable data, and use-eval end to end."""
import json

import numpy as np
import pytest
import torch

from use.evals.baselines import BagOfEvents, count_matrix, untrained_model
from use.evals.classify import score_probe, split_by_class, train_probe
from use.evals.cli import main as eval_main, select_users
from use.evals.metrics import (binary_auc, cosine_similarity, macro_auc_ovr, macro_f1, reid_metrics,
                               reid_ranks)
from use.evals.reid import reid_curves

from test_embed import V_EVENTS, tiny_model, tiny_vocab


# ----------------------------------------------------------------------------- re-ID metrics
def test_reid_ranks_ties_are_pessimistic():
    sim = np.array([
        [0.9, 0.9, 0.1, 0.0],    # tie with the true one: rank 2
        [0.2, 0.8, 0.1, 0.3],    # strictly best: rank 1
        [0.5, 0.7, 0.3, 0.3],    # two above, one tie: rank 4
        [0.4, 0.4, 0.4, 0.4],    # everyone tied: rank 4 (last), not 1
    ])
    ranks = reid_ranks(sim)
    assert ranks.tolist() == [2, 1, 4, 4]
    m = reid_metrics(ranks)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 4 + 1 / 4) / 4, abs=1e-15)
    assert (m["top1"], m["top3"], m["top5"], m["top10"]) == (0.25, 0.5, 1.0, 1.0)
    assert reid_ranks(sim, targets=np.array([1, 1, 1, 1])).tolist() == [2, 1, 1, 4]


def test_identical_embeddings_get_the_worst_rank():
    e = np.ones((5, 3))
    assert reid_ranks(cosine_similarity(e, e)).tolist() == [5] * 5


def test_cosine_similarity_values_and_zero_vectors():
    q = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    c = np.array([[2.0, 0.0], [0.0, 5.0]])
    np.testing.assert_allclose(cosine_similarity(q, c), [[1, 0], [0.6, 0.8], [0, 0]], atol=1e-15)
    with pytest.raises(ValueError, match="need \\[N, h\\] and \\[M, h\\]"):
        cosine_similarity(q, np.ones((2, 3)))


def test_reid_curves_shapes_and_values():
    cand = np.eye(3)
    q = np.stack([np.eye(3)[[1, 0, 2]], np.eye(3)])          # period 1: users 0, 1 swapped
    out = reid_curves({"stateful": q}, cand)
    assert out["stateful"]["top1"] == [1 / 3, 1.0]
    assert out["stateful"]["mrr"] == [pytest.approx((1 / 3 + 1 / 3 + 1) / 3, abs=1e-15), 1.0]


# ----------------------------------------------------------------------------- classification metrics
def test_binary_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)                # rounded: many ties
    assert binary_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert binary_auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="need positives and negatives"):
        binary_auc([1, 1], [0.2, 0.3])


def test_macro_auc_skips_classes_absent_from_the_test_set():
    y = np.array(["a", "a", "b", "b"])
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0], [0.1, 0.9, 0.0]])
    # class a: positives {0.9, 0.2} vs negatives {0.3, 0.1}: 3 of 4 pairs -> 0.75
    # class b: positives {0.7, 0.9} vs negatives {0.1, 0.8}: 3 of 4 -> 0.75; class c has no positives
    assert macro_auc_ovr(y, scores, ["a", "b", "c"]) == 0.75
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 0.8) / 2, abs=1e-12)


def test_split_by_class_is_seeded_disjoint_and_balanced():
    labels = np.array(list("aaaabbbcd"))
    tr, te = split_by_class(labels, seed=1)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(9)) and not set(tr) & set(te)
    assert sorted(labels[tr].tolist()) == list("aabbcd")          # ceil(n/2) per class
    assert (tr.tolist(), te.tolist()) == tuple(x.tolist() for x in split_by_class(labels, seed=1))
    assert any(split_by_class(labels, seed=s)[0].tolist() != tr.tolist() for s in range(2, 6))


def test_probe_on_separable_data():
    rng = np.random.default_rng(0)
    centers = np.array([[6.0, 0, 0], [0, 6.0, 0], [0, 0, 6.0]])
    y = np.repeat(["x", "y", "z"], 30)
    X = centers[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 3))
    tr, te = split_by_class(y, seed=0)
    probe = train_probe(X[tr], y[tr], seed=0, hidden=64)
    assert score_probe(probe, X[te], y[te]) == {"auc": 1.0, "f1": 1.0}
    # labels carrying no information: the probe must not score perfectly
    yr = rng.permutation(y)
    r = score_probe(train_probe(X[tr], yr[tr], seed=0, hidden=64), X[te], yr[te])
    assert r["auc"] < 0.8 and r["f1"] < 0.7


# ----------------------------------------------------------------------------- baselines
def test_bag_of_events():
    seqs = [np.array([5, 5, 6]), np.array([6, 7, 7, 7]), np.array([], dtype=np.int64)]
    assert count_matrix(seqs, 8).toarray().tolist() == [[0] * 5 + [2, 1, 0], [0] * 5 + [0, 1, 3], [0] * 8]
    tf = BagOfEvents(8, idf=False).fit(seqs).transform(seqs)
    np.testing.assert_allclose(tf[0, 5:7], np.array([2, 1]) / np.sqrt(5), atol=1e-15)
    per = BagOfEvents(8, idf=True).fit(seqs).periods([np.array([5, 6, 7, 7, 5])], periods=3, period_len=2)
    assert per["stateful"].shape == (3, 1, 8)
    np.testing.assert_array_equal(per["stateful"][2], per["stateful"][1])     # only 2 full periods: frozen
    assert per["recent"][1, 0, 5] == 0 and per["recent"][1, 0, 7] > 0         # period 2 = [7, 7]


def test_untrained_model_is_seeded_and_leaves_global_rng_alone():
    m = tiny_model()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = untrained_model(m, seed=0), untrained_model(m, seed=0)
    assert torch.rand(1) == before
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert next(a.parameters()).dtype == torch.float64


# ----------------------------------------------------------------------------- use-eval
def test_select_users_reports_short_contexts():
    ctx = [np.zeros(n) for n in (40, 39, 25, 10)]
    keep, msg = select_users(ctx, 2, 20, "drop")
    assert keep.tolist() == [0] and msg.startswith("3 of 4 users have contexts shorter than P×L = 40 events (shortest 10); dropped")
    keep, msg = select_users(ctx, 2, 20, "freeze")
    assert keep.tolist() == [0, 1, 2] and "1 with no full period dropped" in msg
    with pytest.raises(SystemExit, match="longest has 40 events = 1 full periods; use --periods 1"):
        select_users(ctx, 2, 40, "drop")


def _eval_setup(tmp_path, n_users=6, hist=60, ctx=40, labels=True, seed=7):
    from use.checkpoint import save_model_dir
    save_model_dir(tiny_model(dtype=torch.float32, seed=seed).float(), tiny_vocab(), tmp_path / "model")
    rng = np.random.default_rng(0)
    rows = ["user_id\thistory\tcontext" + ("\tlabel" if labels else "")]
    for u in range(n_users):
        g = u % 2                                           # two groups with different favourite events
        ev = lambda n: " ".join(f"e{(i if rng.random() < 0.5 else g)}" for i in rng.integers(0, V_EVENTS, n))
        rows.append(f"user{u}\t{ev(hist)}\t{ev(ctx)}" + (f"\tg{g}" if labels else ""))
    (tmp_path / "eval.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "model", tmp_path / "eval.tsv"


def test_use_eval_end_to_end(tmp_path, capsys):
    model, data = _eval_setup(tmp_path)
    out = tmp_path / "out"
    assert eval_main(["--model", str(model), "--data", str(data), "--periods", "2", "--period-len", "20",
                      "--seeds", "0,1", "--probe-hidden", "32", "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "Re-ID after the last period" in table and "trained    stateful" in table and "tfidf" in table
    r = json.loads((out / "results.json").read_text())
    assert r["meta"]["num_users"] == 6 and r["meta"]["periods"] == 2
    assert set(r["reid"]) == {"trained", "untrained", "tf", "tfidf"}
    assert set(r["reid"]["trained"]) == {"recent", "pool", "stateful", "recompute"}
    assert len(r["reid"]["trained"]["stateful"]["mrr"]) == 2
    assert r["reid"]["trained"]["stateful"] == r["reid"]["trained"]["recompute"]
    assert r["checks"]["stateful_vs_recompute_max_abs_diff"] < 1e-6 * r["checks"]["embedding_max_abs"]
    c = r["classification"]
    assert c["protocol"] == "column" and c["num_classes"] == 2
    assert len(c["history"]["trained"]["auc"]["values"]) == 2
    assert len(c["periods"]["tf"]["stateful"]["auc"]["mean"]) == 2
    t = r["timing"]["trained"]
    assert t["recompute"]["tokens"] == [6 * 20, 6 * 40] and t["stateful"]["tokens"] == [6 * 20, 6 * 20]
    for png in ("reid.png", "classification.png", "timing.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_use_eval_identity_labels(tmp_path, capsys):
    model, data = _eval_setup(tmp_path, n_users=4, labels=False)
    out = tmp_path / "out"
    assert eval_main(["--model", str(model), "--data", str(data), "--periods", "2", "--period-len", "20",
                      "--seeds", "0", "--probe-hidden", "16", "--no-baselines", "--no-plots",
                      "--strategies", "stateful,recompute", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["classification"]["protocol"] == "identity" and r["classification"]["num_classes"] == 4
    assert set(r["reid"]) == {"trained"} and set(r["reid"]["trained"]) == {"stateful", "recompute"}
    assert "user identity, 4 users" in capsys.readouterr().out


def test_use_eval_bad_inputs(tmp_path, capsys):
    model, data = _eval_setup(tmp_path)
    (tmp_path / "nocontext.tsv").write_text("user_id\thistory\nu1\te1 e2\n")
    err = _err(eval_main, capsys, model, tmp_path / "nocontext.tsv")
    assert err.startswith("use-eval: error: ") and "nocontext.tsv: missing column(s) 'context'" in err
    with pytest.raises(SystemExit, match="no user has a context of 4000 events"):
        eval_main(["--model", str(model), "--data", str(data), "--quiet"])
    with pytest.raises(SystemExit, match="--labels column, but .* has no 'label' column"):
        _, nolab = _eval_setup(tmp_path / "n", labels=False)
        eval_main(["--model", str(model), "--data", str(nolab), "--periods", "2", "--period-len", "20",
                   "--labels", "column", "--quiet"])
    (model / "model.safetensors").unlink()
    assert "has no model.safetensors (train one with `use-train" in _err(eval_main, capsys, model, data)


def _err(fn, capsys, model, data) -> str:
    assert fn(["--model", str(model), "--data", str(data), "--quiet"]) == 2
    return capsys.readouterr().err
