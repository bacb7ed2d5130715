"""Embedding users with a trained USE model (SPEC §5), and the `use-embed` command.

A user's embedding is the mean of the last-layer token states over everything the user did.
Because retention has an exact recurrent form, that mean can be carried forward: keep each
layer's retention state, the running sum of last-layer token states and the number of events
seen (which is also the absolute position of the next event), and a new batch of events costs
O(new events) while giving the numbers of embedding the whole history at once.

Top to bottom:

    Carry           what a user's embedding needs to continue (states, running sum, count)
    Embedder        runs packed variable-length batches through the model, carrying state;
                    long sequences are cut into pieces (state carried), so memory is bounded
    embed_periods   the four strategies of SPEC §5 over P periods of L events:
                    recent | pool | stateful | recompute
    main            `use-embed`: read `user_id<TAB>events` lines, update a UserStateStore
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

STRATEGIES = ("recent", "pool", "stateful", "recompute")


# ----------------------------------------------------------------------------- the carried state
@dataclass
class Carry:
    """Per sequence: each layer's retention state, the running sum of last-layer token states
    and the number of events seen so far (= the position offset of the next event)."""

    states: List[Tensor]    # per layer [N, H, d, d] (float32; float64 for a float64 model)
    sums: Tensor            # [N, h] float64: Σ last-layer token states so far
    counts: Tensor          # [N] int64: events seen so far

    @classmethod
    def empty(cls, model, n: int, device=None) -> "Carry":
        cfg = model.config
        dev = torch.device(device) if device is not None else _model_device(model)
        sd = state_dtype(model)
        H, d = cfg.num_heads, cfg.head_dim
        return cls([torch.zeros(n, H, d, d, dtype=sd, device=dev) for _ in range(cfg.num_layers)],
                   torch.zeros(n, cfg.hidden_size, dtype=torch.float64, device=dev),
                   torch.zeros(n, dtype=torch.int64, device=dev))

    def __len__(self) -> int:
        return self.counts.numel()

    def embeddings(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Running means [N, h]; a sequence with no events yet has the zero vector."""
        n = self.counts.clamp(min=1).to(torch.float64).unsqueeze(1)
        return (self.sums / n).to(dtype)


def state_dtype(model) -> torch.dtype:
    """Retention states and embeddings are float32 whatever the compute dtype (bf16 too),
    float64 for a float64 model."""
    return torch.float64 if _model_dtype(model) == torch.float64 else torch.float32


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_token_array(seq, where: str) -> np.ndarray:
    """One sequence of token ids -> int64 numpy array (1-D); clear error otherwise."""
    a = np.asarray(seq)
    if a.ndim != 1:
        raise ValueError(f"{where}: a sequence must be 1-D token ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{where}: token ids must be integers, got dtype {a.dtype}"
                        f"{' (encode event strings with the model vocabulary first)' if a.dtype.kind in 'UO' else ''}")
    return a.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- the embedder
class Embedder:
    """Runs sequences through a USE model in packed variable-length batches, carrying state.

    max_tokens bounds the tokens of one forward call (a longer sequence is cut into pieces run
    one after the other with its state carried, which is exact); max_seqs bounds the sequences
    of one call. Batches whose longest piece has at most `recurrent_max_len` tokens use the
    recurrent retention kernel (a few new events per user), longer ones the chunk kernel —
    when the model's forward takes a `retention` argument; otherwise the model's own kernel.
    """

    def __init__(self, model, *, max_tokens: int = 32768, max_seqs: int = 8192,
                 recurrent_max_len: int = 16, progress: bool = False):
        if max_tokens < 1 or max_seqs < 1:
            raise ValueError(f"Embedder: max_tokens and max_seqs must be >= 1, got {max_tokens}, {max_seqs}")
        self.model = model
        self.max_tokens, self.max_seqs = int(max_tokens), int(max_seqs)
        self.recurrent_max_len = int(recurrent_max_len)
        self.progress = progress
        self.device = _model_device(model)
        self.vocab_size = model.config.vocab_size
        self._has_retention_arg = "retention" in inspect.signature(model.forward).parameters

    # -------------------------------------------------------------- core
    @torch.no_grad()
    def advance(self, seqs: Sequence, carry: Optional[Carry] = None, *, index=None,
                desc: str = "embedding", bar=None) -> Carry:
        """Runs `seqs[i]` from where row `index[i]` of `carry` stopped; updates `carry` in place.

        seqs: token-id sequences (1-D int arrays). carry: None to start fresh (one row per
        sequence). index: rows of `carry` the sequences continue (default 0..N-1); must be
        unique. bar: a tqdm bar to advance by the tokens run (default: a fresh one when
        `progress` is on). Returns the carry.
        """
        arrays = [as_token_array(s, f"sequence {i}") for i, s in enumerate(seqs)]
        n = len(arrays)
        if carry is None:
            carry = Carry.empty(self.model, n)
        if index is None:
            if n != len(carry):
                raise ValueError(f"Embedder.advance: {n} sequences but the carry has {len(carry)} rows; pass index=")
            rows = np.arange(n)
        else:
            rows = np.asarray(index, dtype=np.int64).reshape(-1)
            if rows.size != n:
                raise ValueError(f"Embedder.advance: index has {rows.size} entries for {n} sequences")
            if n and (rows.min() < 0 or rows.max() >= len(carry)):
                raise IndexError(f"Embedder.advance: index must be in [0, {len(carry)}), got {rows.min()}..{rows.max()}")
            if np.unique(rows).size != n:
                raise ValueError("Embedder.advance: index has repeated rows (concatenate a row's sequences instead)")
        for i, a in enumerate(arrays):
            if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
                bad = a[(a < 0) | (a >= self.vocab_size)][0]
                raise ValueError(f"sequence {i}: token id {bad} outside the model vocabulary [0, {self.vocab_size})")

        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        pieces = -(-lengths // self.max_tokens)                       # ceil: pieces per sequence
        total = int(lengths.sum())
        own_bar = bar is None
        if own_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False,
                       disable=not self.progress or total == 0)
        # Round r runs piece r of every sequence that has one: pieces of one sequence stay in
        # order, and each round packs pieces of many sequences into few forward calls.
        for r in range(int(pieces.max()) if n else 0):
            active = np.nonzero(pieces > r)[0]
            lo = r * self.max_tokens
            plen = np.minimum(lengths[active] - lo, self.max_tokens)
            for sel in _greedy_batches(plen, self.max_tokens, self.max_seqs):
                seq_ids = active[sel]
                chunks = [arrays[i][lo:lo + self.max_tokens] for i in seq_ids]
                self._run(chunks, carry, torch.from_numpy(rows[seq_ids]))
                bar.update(int(plen[sel].sum()))
        if own_bar:
            bar.close()
        return carry

    def _run(self, chunks: List[np.ndarray], carry: Carry, rows: Tensor) -> None:
        """One packed forward for `chunks`, continuing carry rows `rows`."""
        dev = self.device
        lens = torch.tensor([c.size for c in chunks], dtype=torch.int64)
        cu = torch.zeros(len(chunks) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        ids = torch.from_numpy(np.concatenate(chunks)).to(dev)                    # [total]
        crow = rows.to(carry.counts.device)
        sd = state_dtype(self.model)
        states = [s.index_select(0, crow).to(device=dev, dtype=sd) for s in carry.states]   # [n, H, d, d]
        offset = carry.counts.index_select(0, crow).to(dev)                       # [n]
        kw = {}
        if self._has_retention_arg:
            kw["retention"] = "recurrent" if int(lens.max()) <= self.recurrent_max_len else "chunk"
        out = self.model(ids, cu_seqlens=cu.to(dev), states=states, offset=offset, **kw)
        seg = torch.repeat_interleave(torch.arange(len(chunks), device=dev), lens.to(dev))
        # Sums in float64: a running mean over thousands of events keeps float32's precision.
        sums = torch.zeros(len(chunks), out.hidden.shape[-1], dtype=torch.float64, device=dev)
        sums.index_add_(0, seg, out.hidden.reshape(-1, out.hidden.shape[-1]).to(torch.float64))
        cdev = carry.counts.device
        carry.sums.index_add_(0, crow, sums.to(cdev))
        carry.counts.index_add_(0, crow, lens.to(cdev))
        for dst, new in zip(carry.states, out.states):
            dst.index_copy_(0, crow, new.to(device=cdev, dtype=dst.dtype))

    # -------------------------------------------------------------- conveniences
    def embed(self, seqs: Sequence, *, desc: str = "embedding") -> np.ndarray:
        """Embeddings [N, h] of whole sequences from scratch (mean of last-layer token states)."""
        carry = self.advance(seqs, None, desc=desc)
        return carry.embeddings(state_dtype(self.model)).cpu().numpy()


def _greedy_batches(lengths: np.ndarray, max_tokens: int, max_seqs: int):
    """Consecutive index ranges whose lengths sum to <= max_tokens (each length <= max_tokens)."""
    start, tokens = 0, 0
    for i, L in enumerate(lengths.tolist()):
        if i > start and (tokens + L > max_tokens or i - start >= max_seqs):
            yield slice(start, i)
            start, tokens = i, 0
        tokens += L
    if start < len(lengths):
        yield slice(start, len(lengths))


def embed_sequences(model, seqs: Sequence, **kw) -> np.ndarray:
    """Embeddings [N, h] of whole token-id sequences (see Embedder for the keyword arguments)."""
    return Embedder(model, **kw).embed(seqs)


# ----------------------------------------------------------------------------- strategies (SPEC §5)
@dataclass
class PeriodRun:
    """Embeddings of N users after each of P periods under each strategy, and what it cost."""

    embeddings: Dict[str, np.ndarray]          # strategy -> [P, N, h]
    seconds: Dict[str, np.ndarray]             # strategy -> [P] wall seconds of period p, all users
    tokens: Dict[str, np.ndarray]              # strategy -> [P] tokens run in period p
    periods_available: np.ndarray              # [N] full periods each user has (capped at P)
    period_len: int = 0
    extra: dict = field(default_factory=dict)


def embed_periods(embedder: Embedder, seqs: Sequence, periods: int, period_len: int,
                  strategies: Sequence[str] = STRATEGIES, *, progress: bool = True,
                  desc: str = "") -> PeriodRun:
    """Embeds each user after each period of `period_len` events under each strategy.

    recent     the newest period alone, from a fresh state at position 0;
    pool       the mean of the (independently computed) period embeddings so far;
    stateful   carry states, running sum and position offset across periods: cost per period
               is one period of events (flat);
    recompute  re-embed the whole prefix from scratch each period: same numbers as stateful,
               cost growing with the period index.

    A user with k < P full periods is updated in periods 1..k and keeps its period-k embedding
    afterwards (events past the last full period are not used); k = 0 leaves zeros.
    """
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; expected any of {', '.join(STRATEGIES)}")
    if periods < 1 or period_len < 1:
        raise ValueError(f"periods and period_len must be >= 1, got {periods}, {period_len}")
    arrays = [as_token_array(s, f"sequence {i}") for i, s in enumerate(seqs)]
    N, P, L = len(arrays), int(periods), int(period_len)
    h = embedder.model.config.hidden_size
    edt = state_dtype(embedder.model)
    npd = np.float64 if edt == torch.float64 else np.float32
    avail = np.minimum(np.array([a.size // L for a in arrays], dtype=np.int64), P)
    emb = {s: np.zeros((P, N, h), dtype=npd) for s in strategies}
    secs = {s: np.zeros(P) for s in strategies}
    toks = {s: np.zeros(P, dtype=np.int64) for s in strategies}
    dev = embedder.device
    want_single = "recent" in strategies or "pool" in strategies
    pool_sum = np.zeros((N, h), dtype=np.float64)
    pool_n = np.zeros(N, dtype=np.int64)
    carry = Carry.empty(embedder.model, N) if "stateful" in strategies else None
    prev_progress, embedder.progress = embedder.progress, False
    from tqdm.auto import tqdm
    try:
        for p in tqdm(range(P), desc=desc or "periods", unit="period", disable=not progress):
            act = np.nonzero(avail > p)[0]
            if p > 0:                                     # frozen users keep their last embedding
                for s in strategies:
                    emb[s][p] = emb[s][p - 1]
            if act.size == 0:
                continue
            period = [arrays[i][p * L:(p + 1) * L] for i in act]
            if want_single:
                _sync(dev)
                t0 = time.perf_counter()
                e = embedder.embed(period)
                _sync(dev)
                dt = time.perf_counter() - t0
                pool_sum[act] += e
                pool_n[act] += 1
                for s in ("recent", "pool"):
                    if s in strategies:
                        secs[s][p], toks[s][p] = dt, act.size * L
                if "recent" in strategies:
                    emb["recent"][p, act] = e
                if "pool" in strategies:
                    emb["pool"][p, act] = (pool_sum[act] / pool_n[act, None]).astype(npd)
            if "stateful" in strategies:
                _sync(dev)
                t0 = time.perf_counter()
                embedder.advance(period, carry, index=act)
                e = carry.embeddings(edt)[torch.from_numpy(act).to(carry.counts.device)].cpu().numpy()
                _sync(dev)
                secs["stateful"][p], toks["stateful"][p] = time.perf_counter() - t0, act.size * L
                emb["stateful"][p, act] = e
            if "recompute" in strategies:
                prefix = [arrays[i][:(p + 1) * L] for i in act]
                _sync(dev)
                t0 = time.perf_counter()
                e = embedder.embed(prefix)
                _sync(dev)
                secs["recompute"][p], toks["recompute"][p] = time.perf_counter() - t0, act.size * (p + 1) * L
                emb["recompute"][p, act] = e
    finally:
        embedder.progress = prev_progress
    return PeriodRun(emb, secs, toks, avail, L)


# ----------------------------------------------------------------------------- use-embed
def read_user_events(path, vocab, *, char_level: bool = False):
    """`user_id<TAB>events` lines -> (user ids, token-id arrays), in file order.

    Blank lines are skipped; a first line whose first field is `user_id` is a header. A user
    may appear on several lines: the lines are applied in order.
    """
    from .data import split_events

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    users, seqs = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}, line {lineno}: expected `user_id<TAB>events`, found no tab")
            uid, events = line.split("\t", 1)
            uid = uid.strip()
            if lineno == 1 and uid.lower() == "user_id":
                continue
            if not uid:
                raise ValueError(f"{path}, line {lineno}: empty user_id")
            users.append(uid)
            seqs.append(vocab.encode(split_events(events, char_level)).astype(np.int64))
    if not users:
        raise ValueError(f"{path}: no `user_id<TAB>events` lines")
    return users, seqs


def write_embeddings(path, user_ids: Sequence[str], emb: np.ndarray) -> List[Path]:
    """`.tsv` (user_id, then the h values) or `.npy` ([N, h], with the ids in `<name>.ids.txt`)."""
    from .io import atomic_write, atomic_write_text

    path = Path(path)
    ids_text = "".join(f"{u}\n" for u in user_ids)
    if path.suffix == ".npy":
        ids_path = path.with_suffix(".ids.txt")
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:          # a file object: np.save(str) would append ".npy"
                np.save(f, emb)
        atomic_write(path, write)
        atomic_write_text(ids_path, ids_text)
        return [path, ids_path]
    if path.suffix == ".tsv":
        atomic_write_text(path, _tsv(user_ids, emb, header=True))
        return [path]
    raise ValueError(f"--output {path}: unsupported suffix {path.suffix!r}; expected .tsv or .npy")


def _tsv(user_ids, emb, header: bool) -> str:
    lines = []
    if header:
        lines.append("user_id\t" + "\t".join(f"e{j}" for j in range(emb.shape[1])))
    for u, row in zip(user_ids, emb):
        lines.append(u + "\t" + "\t".join(f"{x:.9g}" for x in row))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="use-embed",
        description="Update a persistent user-state store with new events and print or write the "
                    "users' embeddings. Each user's update costs O(new events): the model's "
                    "retention states are carried from the last update.")
    p.add_argument("--model", required=True, help="model directory written by use-train (config.json, vocab.json, model.safetensors)")
    p.add_argument("--store", required=True, help="user-state store directory; created if it does not exist, updated atomically")
    p.add_argument("--input", required=True, help="file of `user_id<TAB>events` lines (events space-separated; a user may appear on several lines)")
    p.add_argument("--output", default=None, help="write the updated users' embeddings to this .tsv or .npy (default: print them as TSV)")
    p.add_argument("--char-level", action="store_true", help="one event per character instead of space-separated events")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--backend", default=None, choices=["auto", "triton", "torch", "reference"],
                   help="retention backend (default: the model's config)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per forward call; bounds memory (default: 32768)")
    p.add_argument("--no-save", action="store_true", help="compute the embeddings but leave the store on disk unchanged")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:      # bad input: the message says what and where
        print(f"use-embed: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .checkpoint import load_model_dir
    from .store import UserStateStore

    model, vocab = load_model_dir(args.model, device=args.device, backend=args.backend)
    users, seqs = read_user_events(args.input, vocab, char_level=args.char_level)
    store_dir = Path(args.store)
    kw = dict(max_tokens=args.max_tokens, progress=not args.quiet)
    if UserStateStore.exists(store_dir):
        store = UserStateStore.load(store_dir, model, **kw)
    else:
        store = UserStateStore(model, **kw)
    t0 = time.perf_counter()
    store.update(users, seqs)
    dt = time.perf_counter() - t0
    unique = list(dict.fromkeys(users))
    emb = store.embeddings(unique)
    if not args.no_save:
        store.save(store_dir)
    n_events = int(sum(s.size for s in seqs))
    print(f"use-embed: {len(unique)} users, {n_events} new events in {dt:.2f}s; "
          f"store {store_dir} holds {len(store)} users"
          + (" (not saved: --no-save)" if args.no_save else ""), file=sys.stderr)
    if args.output:
        for w in write_embeddings(args.output, unique, emb):
            print(f"use-embed: wrote {w}", file=sys.stderr)
    else:
        sys.stdout.write(_tsv(unique, emb, header=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
