"""Reports of use-eval: the terminal table, results.json and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..io import atomic_write, atomic_write_text

STYLE = {"trained": "-", "untrained": "--", "tf": ":", "tfidf": "-."}
COLORS = {"recent": "tab:orange", "pool": "tab:green", "stateful": "tab:blue", "recompute": "tab:purple"}


def _fmt_ms(m: Dict[str, float]) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def format_table(results: dict) -> str:
    meta = results["meta"]
    P = meta["periods"]
    lines: List[str] = []
    lines.append(f"use-eval: {meta['num_users']} users, {P} periods × {meta['period_len']} events, "
                 f"data {meta['data']}, model {meta['model']}")
    lines.append("")
    lines.append(f"Re-ID after the last period (query = context, candidates = {meta['num_users']} histories; ties pessimistic)")
    ks = [k for k in next(iter(next(iter(results["reid"].values())).values())) if k != "mrr"]
    head = f"  {'method':<10} {'strategy':<10} {'MRR':>7} " + " ".join(f"{k:>6}" for k in ks) + f" {'embed s (total)':>16}"
    lines.append(head)
    for method, per in results["reid"].items():
        for strategy, m in per.items():
            secs = results.get("timing", {}).get(method, {}).get(strategy)
            t = f"{sum(secs['seconds']):16.2f}" if secs else f"{'-':>16}"
            lines.append(f"  {method:<10} {strategy:<10} {m['mrr'][-1]:7.3f} "
                         + " ".join(f"{m[k][-1]:6.3f}" for k in ks) + f" {t}")
    c = results.get("classification")
    if c:
        lines.append("")
        lines.append(f"Classification: {c['description']}")
        lines.append(f"  probe MLP(hidden {c['probe_hidden']}), seeds {c['seeds']}; mean ± std")
        lines.append(f"  {'method':<10} {'input':<18} {'macro AUC':>15} {'macro F1':>15}")
        for method, m in c["history"].items():
            lines.append(f"  {method:<10} {'history':<18} {_fmt_ms(m['auc']):>15} {_fmt_ms(m['f1']):>15}")
        for method, per in c["periods"].items():
            for strategy, m in per.items():
                a = {"mean": m["auc"]["mean"][-1], "std": m["auc"]["std"][-1]}
                f = {"mean": m["f1"]["mean"][-1], "std": m["f1"]["std"][-1]}
                lines.append(f"  {method:<10} {'context ' + strategy:<18} {_fmt_ms(a):>15} {_fmt_ms(f):>15}")
    tm = results.get("timing", {}).get("trained", {})
    if "stateful" in tm and "recompute" in tm:
        s, r = np.asarray(tm["stateful"]["seconds"]), np.asarray(tm["recompute"]["seconds"])
        lines.append("")
        lines.append(f"Embedding cost per period (trained model, all users): stateful {s[0]:.3f}s → {s[-1]:.3f}s "
                     f"(flat), recompute {r[0]:.3f}s → {r[-1]:.3f}s (growing); cumulative {s.sum():.2f}s vs "
                     f"{r.sum():.2f}s ({r.sum() / max(s.sum(), 1e-12):.1f}×)")
    chk = results.get("checks", {})
    if "stateful_vs_recompute_max_abs_diff" in chk:
        lines.append(f"Check: max |stateful − recompute| = {chk['stateful_vs_recompute_max_abs_diff']:.2e} "
                     f"(embeddings up to {chk['embedding_max_abs']:.2e})")
    return "\n".join(lines)


def write_json(path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, write)
    plt.close(fig)


def _legend_below(fig, ax) -> None:
    """One legend for the figure, under the axes, so no curve is hidden behind it."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8, frameon=False)


def write_plots(out_dir, results: dict) -> List[Path]:
    """reid.png (MRR and top-1 vs period), classification.png (AUC and F1 vs period),
    timing.png (cumulative and per-period embedding time, stateful vs recompute)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []
    P = results["meta"]["periods"]
    x = np.arange(1, P + 1)

    def lines(ax, data, metric, getter):
        for method, per in data.items():
            for strategy, m in per.items():
                same = " (= stateful)" if strategy == "recompute" and "stateful" in per else ""
                ax.plot(x, getter(m[metric]), STYLE.get(method, "-"), color=COLORS.get(strategy),
                        label=f"{method} {strategy}{same}", marker="o", ms=3)
        ax.set_xlabel("period")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("mrr", "top1")):
        lines(ax, results["reid"], metric, lambda v: v)
        ax.set_ylabel(metric.upper() if metric == "mrr" else "top-1")
    axes[0].set_title("Re-ID: context after each period vs histories")
    _legend_below(fig, axes[0])
    written.append(out / "reid.png")
    _savefig(fig, written[-1])

    c = results.get("classification")
    if c and c.get("periods"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, metric in zip(axes, ("auc", "f1")):
            lines(ax, c["periods"], metric, lambda v: v["mean"])
            ax.set_ylabel(f"macro {metric.upper()} (mean over seeds)")
        axes[0].set_title("Probe (trained on histories) on context embeddings")
        _legend_below(fig, axes[0])
        written.append(out / "classification.png")
        _savefig(fig, written[-1])

    tm = results.get("timing", {})
    if tm:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for method, per in tm.items():
            for strategy, t in per.items():
                if strategy not in ("stateful", "recompute"):
                    continue
                s = np.asarray(t["seconds"])
                kw = dict(color=COLORS[strategy], marker="o", ms=3, label=f"{method} {strategy}")
                axes[0].plot(x, np.cumsum(s), STYLE.get(method, "-"), **kw)
                axes[1].plot(x, s, STYLE.get(method, "-"), **kw)
        axes[0].set_ylabel("cumulative embedding time (s)")
        axes[1].set_ylabel("embedding time of the period (s)")
        axes[0].set_title(f"Keeping {results['meta']['num_users']} users' embeddings current")
        for ax in axes:
            ax.set_xlabel("period")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        written.append(out / "timing.png")
        _savefig(fig, written[-1])
    return written
