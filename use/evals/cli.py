"""`use-eval`: the USE evaluation protocol (SPEC §5) on an eval .tsv or the synthetic default.

Each user has a `history` and a later `context`. The context arrives in P periods of L events
(default 16 × 250). After each period the context is embedded under each strategy (recent,
pool, stateful, recompute) and

- Re-ID: the context embedding must find the same user's history embedding among all users'
  (cosine similarity; MRR, top-1/3/5/10; ties pessimistic);
- classification: an MLP probe trained on history embeddings (see use.evals.classify for the
  two label protocols) is scored on held-out histories and on the context embeddings;
- timing: seconds per period for every strategy (stateful flat, recompute growing).

The same is done for the baselines — TF, TF-IDF and an untrained model — on the same users and
splits. Users whose context has fewer than P·L events are dropped (default) or kept with their
embedding frozen after their last full period (--short freeze); the count is reported.
Output: a table on the terminal, OUT/results.json, OUT/reid.png, classification.png, timing.png.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..embed import STRATEGIES, Embedder, embed_periods
from .baselines import BagOfEvents, untrained_model
from .classify import PROBE_HIDDEN, mean_std, score_probe, split_by_class, train_probe
from .reid import reid_curves


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="use-eval",
        description="Evaluate USE embeddings as in the paper: re-identification and a classification "
                    "probe after each of P periods of context, for the recent / pool / stateful / "
                    "recompute strategies, against TF, TF-IDF and an untrained model.")
    p.add_argument("--model", default=None,
                   help="model directory written by use-train (default: runs/default)")
    p.add_argument("--data", default=None,
                   help="eval .tsv with columns history, context (optional label, user_id); default: the "
                        "synthetic default's eval.tsv, generated on first use")
    p.add_argument("--periods", type=int, default=16, help="P: periods of context (default: 16)")
    p.add_argument("--period-len", type=int, default=250, help="L: events per period (default: 250)")
    p.add_argument("--max-users", type=int, default=None,
                   help="use only the first N users of the file (default: all)")
    p.add_argument("--short", choices=("drop", "freeze"), default="drop",
                   help="users whose context has fewer than P·L events: drop them (default), or keep them "
                        "with their embedding frozen after their last full period")
    p.add_argument("--labels", choices=("auto", "column", "identity"), default="auto",
                   help="classification labels: the .tsv's label column, or user identity (probe trained on "
                        "even history periods, tested on odd ones); auto: the column if present")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated strategies of the trained model (default: {','.join(STRATEGIES)})")
    p.add_argument("--seeds", default="0,1,2", help="probe seeds (split and init), comma-separated (default: 0,1,2)")
    p.add_argument("--probe-hidden", type=int, default=PROBE_HIDDEN, help="probe MLP hidden units (default: 1024)")
    p.add_argument("--probe-max-iter", type=int, default=200, help="probe MLP training iterations (default: 200)")
    p.add_argument("--no-baselines", action="store_true", help="skip TF, TF-IDF and the untrained model")
    p.add_argument("--no-classification", action="store_true", help="skip the classification probe")
    p.add_argument("--batch-size", type=int, default=1024, help="sequences per forward call (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per forward call; bounds memory (default: 32768)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--backend", default=None, choices=["auto", "triton", "torch", "reference"],
                   help="retention backend (default: the model's config)")
    p.add_argument("--char-level", action="store_true", help="one event per character in the .tsv cells")
    p.add_argument("--out", default=None, help="output directory (default: MODEL/eval)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _log(msg: str) -> None:
    print(f"use-eval: {msg}", file=sys.stderr, flush=True)


def _parse_list(text: str, what: str, conv=str) -> list:
    try:
        vals = [conv(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"use-eval: --{what} {text!r}: expected comma-separated values") from None
    if not vals:
        raise SystemExit(f"use-eval: --{what} is empty")
    return vals


def select_users(contexts: Sequence[np.ndarray], periods: int, period_len: int, short: str):
    """Indices of the users evaluated, and a message about the short ones (or None)."""
    need = periods * period_len
    lens = np.array([len(c) for c in contexts], dtype=np.int64)
    short_ = lens < need
    n_short = int(short_.sum())
    full = lens // period_len
    if short == "freeze":
        keep = np.nonzero(full >= 1)[0]
    else:
        keep = np.nonzero(~short_)[0]
    if keep.size == 0:
        best = int(full.max()) if lens.size else 0
        hint = (f"use --periods {best} (or a smaller --period-len)" if best >= 1
                else f"use a --period-len of at most {int(lens.max())}")
        raise SystemExit(f"use-eval: no user has a context of {need} events (P={periods} × L={period_len}); "
                         f"the longest has {int(lens.max())} events = {best} full periods; {hint}")
    msg = None
    if n_short:
        how = ("dropped" if short == "drop" else
               f"kept with their embedding frozen after their last full period "
               f"({int((full[short_] == 0).sum())} with no full period dropped)")
        msg = (f"{n_short} of {lens.size} users have contexts shorter than P×L = {need} events "
               f"(shortest {int(lens.min())}); {how}"
               + (" (--short freeze keeps them)" if short == "drop" else ""))
    return keep, msg


def history_periods(histories: Sequence[np.ndarray], periods: int, period_len: int):
    """Identity protocol: (owner user, period index, tokens) of each full history period (≤ P)."""
    owner, index, chunks = [], [], []
    for u, h in enumerate(histories):
        for q in range(min(len(h) // period_len, periods)):
            owner.append(u)
            index.append(q)
            chunks.append(h[q * period_len:(q + 1) * period_len])
    return np.array(owner, dtype=np.int64), np.array(index, dtype=np.int64), chunks


def run_eval(args) -> dict:
    from ..checkpoint import load_model_dir
    from ..data import read_eval_tsv
    from ..defaults import DEFAULT_RUN_DIR

    t_start = time.perf_counter()
    P, L = args.periods, args.period_len
    if P < 1 or L < 1:
        raise SystemExit(f"use-eval: --periods and --period-len must be >= 1, got {P} and {L}")
    strategies = _parse_list(args.strategies, "strategies")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"use-eval: --strategies: unknown {bad}; expected any of {', '.join(STRATEGIES)}")
    seeds = _parse_list(args.seeds, "seeds", int)
    progress = not args.quiet

    # ---- model and data ------------------------------------------------------------------
    model_dir = Path(args.model) if args.model else DEFAULT_RUN_DIR
    if args.model is None and not model_dir.is_dir():
        raise SystemExit(f"use-eval: no model at the default {model_dir}; train one with `use-train` "
                         f"or pass --model DIR")
    model, vocab = load_model_dir(model_dir, device=args.device, backend=args.backend)
    if args.data is None:
        from ..defaults import ensure_default_dataset
        data_path = ensure_default_dataset() / "eval.tsv"
    else:
        data_path = Path(args.data)
    ev = read_eval_tsv(data_path, char_level=args.char_level)
    n_file = len(ev)
    if args.max_users is not None:
        if args.max_users < 2:
            raise SystemExit(f"use-eval: --max-users must be >= 2 (re-ID ranks users), got {args.max_users}")
        ev.histories, ev.contexts = ev.histories[:args.max_users], ev.contexts[:args.max_users]
        ev.user_ids = ev.user_ids[:args.max_users]
        if ev.labels is not None:
            ev.labels = ev.labels[:args.max_users]
    hist_all, ctx_all = ev.encode(vocab)
    n_unk = sum(int((h == vocab.unk_id).sum()) for h in hist_all) + sum(int((c == vocab.unk_id).sum()) for c in ctx_all)
    n_tok = sum(len(h) for h in hist_all) + sum(len(c) for c in ctx_all)
    if n_tok and n_unk / n_tok > 0.5:
        warnings.warn(f"{data_path}: {100 * n_unk / n_tok:.0f}% of the events are not in the model's vocabulary "
                      f"({model_dir}/vocab.json): was the model trained on this kind of data?", stacklevel=2)
    keep, short_msg = select_users(ctx_all, P, L, args.short)
    if short_msg:
        _log(short_msg)
    if keep.size < 2:
        raise SystemExit(f"use-eval: only {keep.size} user(s) left to evaluate; re-ID needs at least 2")
    hist = [hist_all[i].astype(np.int64) for i in keep]
    ctx = [ctx_all[i].astype(np.int64) for i in keep]
    user_ids = [ev.user_ids[i] for i in keep]
    N = len(keep)

    # ---- labels --------------------------------------------------------------------------
    protocol = args.labels
    if protocol == "auto":
        protocol = "column" if ev.labels is not None else "identity"
    if protocol == "column" and ev.labels is None:
        raise SystemExit(f"use-eval: --labels column, but {data_path} has no 'label' column")
    do_cls = not args.no_classification

    # ---- embeddings ------------------------------------------------------------------------
    models = {"trained": (model, strategies)}
    if not args.no_baselines:
        # recompute gives the stateful numbers again at a growing cost: timed for the trained model only.
        models["untrained"] = (untrained_model(model, seed=0), [s for s in strategies if s != "recompute"] or ["stateful"])
    cand: Dict[str, np.ndarray] = {}
    queries: Dict[str, Dict[str, np.ndarray]] = {}
    timing: Dict[str, dict] = {}
    hist_period_feats: Dict[str, np.ndarray] = {}
    owner = hp_index = None
    if do_cls and protocol == "identity":
        owner, hp_index, hp_chunks = history_periods(hist, P, L)
    for name, (m, strats) in models.items():
        emb = Embedder(m, max_tokens=args.max_tokens, max_seqs=args.batch_size, progress=progress)
        emb.embed([c[:L] for c in ctx[:8]])     # warm-up (allocator, kernels): not in the timings
        _log(f"{name} model: embedding {N} histories ({sum(len(h) for h in hist)} events)")
        cand[name] = emb.embed(hist, desc=f"{name} histories")
        _log(f"{name} model: {P} periods × {L} events of context under {', '.join(strats)}")
        run = embed_periods(emb, ctx, P, L, strats, progress=progress, desc=f"{name} periods")
        queries[name] = run.embeddings
        timing[name] = {s: {"seconds": run.seconds[s].tolist(), "tokens": run.tokens[s].tolist()} for s in strats}
        if owner is not None:
            hist_period_feats[name] = emb.embed(hp_chunks, desc=f"{name} history periods")
    checks = {}
    q = queries["trained"]
    if "stateful" in q and "recompute" in q:
        checks["stateful_vs_recompute_max_abs_diff"] = float(np.abs(q["stateful"] - q["recompute"]).max())
        checks["embedding_max_abs"] = float(np.abs(q["stateful"]).max())
    if not args.no_baselines:
        for idf in (False, True):
            bag = BagOfEvents(len(vocab), idf).fit(hist)
            cand[bag.name] = bag.transform(hist)
            queries[bag.name] = bag.periods(ctx, P, L)
            if owner is not None:
                hist_period_feats[bag.name] = bag.transform(hp_chunks)

    # ---- re-ID -----------------------------------------------------------------------------
    reid = {name: reid_curves(queries[name], cand[name]) for name in queries}

    # ---- classification --------------------------------------------------------------------
    classification = None
    if do_cls:
        classification = classify_all(protocol, ev, keep, user_ids, cand, queries, hist_period_feats,
                                      owner, hp_index, seeds, args, progress)

    return {
        "meta": {"model": str(model_dir), "architecture_hash": model.config.architecture_hash(),
                 "data": str(data_path), "users_in_file": n_file, "num_users": N,
                 "max_users": args.max_users, "short_policy": args.short, "short_users": short_msg,
                 "periods": P, "period_len": L, "strategies": strategies, "seeds": seeds,
                 "device": str(args.device), "backend": model.config.backend,
                 "torch": torch.__version__, "seconds": time.perf_counter() - t_start},
        "reid": reid, "classification": classification, "timing": timing, "checks": checks,
    }


def classify_all(protocol, ev, keep, user_ids, cand, queries, hist_period_feats, owner, hp_index,
                 seeds, args, progress) -> dict:
    """Probe per method and seed: scored on held-out histories and on each period's context."""
    from tqdm.auto import tqdm

    N = len(keep)
    if protocol == "column":
        y_users = np.array([ev.labels[i] for i in keep])
        classes = sorted(set(y_users.tolist()))
        if len(classes) < 2:
            raise SystemExit(f"use-eval: the label column has a single value ({classes[0]!r}); nothing to classify")
        desc = f"label column, {len(classes)} classes; users split per class in half by the seed"
    else:
        y_users = np.array(user_ids)
        has2 = np.bincount(owner, minlength=N) >= 2
        if has2.sum() < 2:
            raise SystemExit(f"use-eval: identity labels need users with >= 2 history periods of "
                             f"{args.period_len} events; only {int(has2.sum())} have them")
        if (~has2).any():
            _log(f"{int((~has2).sum())} of {N} users have fewer than 2 history periods of {args.period_len} "
                 f"events: left out of the identity probe (still in re-ID)")
        sel = has2[owner]
        owner, hp_index = owner[sel], hp_index[sel]
        hist_period_feats = {k: v[sel] for k, v in hist_period_feats.items()}
        classes = sorted(set(y_users[has2].tolist()))
        desc = (f"user identity, {len(classes)} users with >= 2 history periods; probe trained on even "
                f"history periods, tested on odd ones and on the context")
    out_hist: Dict[str, dict] = {}
    out_per: Dict[str, dict] = {}
    jobs = [(name, seed) for name in cand for seed in seeds]
    raw_h: Dict[str, List[Dict[str, float]]] = {name: [] for name in cand}
    raw_p: Dict[str, Dict[str, List[List[Dict[str, float]]]]] = {n: {s: [] for s in queries[n]} for n in cand}
    for name, seed in tqdm(jobs, desc="probes", disable=not progress):
        if protocol == "column":
            tr, te = split_by_class(y_users, seed)
            probe = train_probe(cand[name][tr], y_users[tr], seed, hidden=args.probe_hidden, max_iter=args.probe_max_iter)
            raw_h[name].append(score_probe(probe, cand[name][te], y_users[te]))
            test_users = te
        else:
            X, y = hist_period_feats[name], y_users[owner]
            tr, te = hp_index % 2 == 0, hp_index % 2 == 1
            probe = train_probe(X[tr], y[tr], seed, hidden=args.probe_hidden, max_iter=args.probe_max_iter)
            raw_h[name].append(score_probe(probe, X[te], y[te]))
            test_users = np.nonzero(np.isin(y_users, classes))[0]
        for strategy, qs in queries[name].items():
            raw_p[name][strategy].append([score_probe(probe, qs[p][test_users], y_users[test_users])
                                          for p in range(qs.shape[0])])
    for name in cand:
        out_hist[name] = {m: mean_std([r[m] for r in raw_h[name]]) for m in ("auc", "f1")}
        out_per[name] = {}
        for strategy, per_seed in raw_p[name].items():
            arr = {m: np.array([[d[m] for d in run] for run in per_seed]) for m in ("auc", "f1")}   # [seeds, P]
            out_per[name][strategy] = {m: {"mean": a.mean(0).tolist(), "std": a.std(0).tolist()} for m, a in arr.items()}
    return {"protocol": protocol, "description": desc, "num_classes": len(classes), "seeds": list(seeds),
            "probe_hidden": args.probe_hidden, "probe_max_iter": args.probe_max_iter,
            "history": out_hist, "periods": out_per}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .report import format_table, write_json, write_plots

    args = build_parser().parse_args(argv)
    try:
        results = run_eval(args)
    except (ValueError, FileNotFoundError) as e:      # bad input: the message says what and where
        print(f"use-eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(results["meta"]["model"]) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    written = [out / "results.json"]
    if not args.no_plots:
        written += write_plots(out, results)
    print(format_table(results))
    _log("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
