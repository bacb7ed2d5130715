"""A persistent store of per-user model state: embeddings updated at O(new events) cost.

Per user the store keeps what continuing the user's sequence needs (use.embed.Carry):

    states   [L, H, d, d]  each layer's retention state (float32; float64 for a float64 model)
    sums     [h]           float64 running sum of last-layer token states
    counts   []            int64 events seen = the absolute position of the next event

`update(user_ids, event_sequences)` runs only the new events (one packed batch of many users,
cut into chunks of users to bound memory) and returns the new embeddings; they equal embedding
each user's whole history at once (tests/test_store.py checks it in float64).

On disk (`save` / `load`), one directory per saved version and a pointer to the live one:

    <store>/CURRENT                 "v000007\\n": the live version (replaced atomically)
    <store>/v000007/manifest.json   format, version, model architecture hash, weights
                                    fingerprint, shapes and dtypes
    <store>/v000007/users.json      user ids in row order
    <store>/v000007/states.npy      [U, L, H, d, d]
    <store>/v000007/sums.npy        [U, h]
    <store>/v000007/counts.npy      [U]

A save writes a complete new version in a temporary directory, fsyncs it, renames it to its
final name and only then replaces CURRENT (atomic rename): a crash at any point leaves CURRENT
naming the previous complete version. Old versions and leftovers of crashed saves are removed
after the switch. One writer at a time per store directory.

Loading memory-maps the arrays copy-on-write (np.load mmap_mode="c"): a store larger than
memory opens instantly, `update` reads only the rows of the users it touches, and the saved
files are never modified in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .embed import Carry, Embedder, as_token_array, state_dtype
from .io import atomic_write_text, fsync_path

FORMAT = "use-user-state-store"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_ARRAYS = ("states", "sums", "counts")


class _Rows:
    """A growable [U, *row_shape] array: rows [0, len(base)) live in `base` (possibly a
    copy-on-write memory map of a saved version), later rows in an in-memory tail that grows by
    doubling, so adding users never copies (or pages in) the saved rows."""

    def __init__(self, row_shape, dtype, base: Optional[np.ndarray] = None):
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.base = base if base is not None else np.zeros((0,) + self.row_shape, self.dtype)
        self.tail = np.zeros((0,) + self.row_shape, self.dtype)
        self.n_tail = 0

    def __len__(self) -> int:
        return len(self.base) + self.n_tail

    def grow(self, n: int) -> None:
        need = self.n_tail + n
        if need > len(self.tail):
            new = np.zeros((max(need, 2 * len(self.tail), 16),) + self.row_shape, self.dtype)
            new[:self.n_tail] = self.tail[:self.n_tail]
            self.tail = new
        self.n_tail = need

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        nb = len(self.base)
        out = np.empty((rows.size,) + self.row_shape, self.dtype)
        m = rows < nb
        out[m] = self.base[rows[m]]
        out[~m] = self.tail[rows[~m] - nb]
        return out

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        nb = len(self.base)
        m = rows < nb
        if m.any():
            self.base[rows[m]] = values[m]
        self.tail[rows[~m] - nb] = values[~m]

    def blocks(self, max_bytes: int):
        """The rows in order, as arrays of at most ~max_bytes."""
        per = max(1, max_bytes // max(1, self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))))
        for arr, n in ((self.base, len(self.base)), (self.tail, self.n_tail)):
            for i in range(0, n, per):
                yield np.asarray(arr[i:min(n, i + per)])


def weights_fingerprint(model) -> str:
    """sha256 over the model's parameters (as float32, in state_dict order): states saved with
    one set of weights are meaningless under another, even with the same architecture."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _describe(cfg: dict) -> str:
    return (f"hidden {cfg.get('hidden_size')}, {cfg.get('num_layers')} layers, {cfg.get('num_heads')} heads, "
            f"vocab {cfg.get('vocab_size')}")


class UserStateStore:
    """Per-user retention states, running sums and counts, for one model.

    >>> store = UserStateStore(model)                  # or UserStateStore.load(dir, model)
    >>> emb = store.update(["alice", "bob"], [ids_a, ids_b])   # [2, h]; unknown users start empty
    >>> store.embedding("alice")                       # [h]
    >>> store.save(dir)                                # atomic; loadable only with this model

    Sequences are token-id arrays, or lists of event strings when a `vocab` is given.
    User ids are strings (other values are converted with str()).
    """

    def __init__(self, model, *, vocab=None, max_tokens: int = 32768, max_seqs: int = 8192,
                 recurrent_max_len: int = 16, chunk_bytes: int = 256 << 20, progress: bool = False):
        cfg = model.config
        self.model = model
        self.vocab = vocab
        self.progress = progress
        self.chunk_bytes = int(chunk_bytes)
        self._embedder = Embedder(model, max_tokens=max_tokens, max_seqs=max_seqs,
                                  recurrent_max_len=recurrent_max_len, progress=False)
        self._arch_hash = cfg.architecture_hash()
        self._weights_fp: Optional[str] = None
        self._state_shape = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        self._hidden = cfg.hidden_size
        sd = np.float64 if state_dtype(model) == torch.float64 else np.float32
        self._ids: List[str] = []
        self._index: Dict[str, int] = {}
        self._rows = {"states": _Rows(self._state_shape, sd), "sums": _Rows((self._hidden,), np.float64),
                      "counts": _Rows((), np.int64)}
        self.path: Optional[Path] = None

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, user_id) -> bool:
        return str(user_id) in self._index

    @property
    def user_ids(self) -> List[str]:
        return list(self._ids)

    def _row(self, user_id) -> int:
        uid = str(user_id)
        if uid not in self._index:
            raise KeyError(f"unknown user {uid!r}: the store has {len(self)} users; "
                           f"add the user's events with update() first")
        return self._index[uid]

    def embeddings(self, user_ids: Optional[Sequence] = None) -> np.ndarray:
        """[N, h] mean of each user's last-layer token states (all users, in store order, by
        default). A user with no events has the zero vector."""
        rows = np.arange(len(self)) if user_ids is None else np.array([self._row(u) for u in user_ids], dtype=np.int64)
        sums = self._rows["sums"].take(rows)
        counts = np.maximum(self._rows["counts"].take(rows), 1)
        npd = np.float64 if state_dtype(self.model) == torch.float64 else np.float32
        return (sums / counts[:, None]).astype(npd)

    def embedding(self, user_id) -> np.ndarray:
        return self.embeddings([user_id])[0]

    def num_events(self, user_id) -> int:
        """Events seen for this user (also the position of the user's next event)."""
        return int(self._rows["counts"].take(np.array([self._row(user_id)]))[0])

    def state(self, user_id) -> dict:
        """A copy of one user's raw state: states [L, H, d, d], sum [h], count."""
        r = np.array([self._row(user_id)])
        return {"states": self._rows["states"].take(r)[0], "sum": self._rows["sums"].take(r)[0],
                "count": int(self._rows["counts"].take(r)[0])}

    # ------------------------------------------------------------------ update
    def _encode(self, seq, i: int) -> np.ndarray:
        where = f"event_sequences[{i}]"
        if isinstance(seq, str):
            raise TypeError(f"{where} is a string; pass a list of events (or token ids) per user")
        if isinstance(seq, (list, tuple)) and seq and isinstance(seq[0], str):
            if self.vocab is None:
                raise TypeError(f"{where} holds event strings; create the store with vocab= to encode "
                                f"them, or pass token ids")
            return self.vocab.encode(list(seq)).astype(np.int64)
        return as_token_array(seq, where)

    def update(self, user_ids: Sequence, event_sequences: Sequence, *, progress: Optional[bool] = None) -> np.ndarray:
        """Appends `event_sequences[i]` to user `user_ids[i]`; returns the embeddings [N, h]
        after the update, row for row. Unknown users start empty. A user listed several times
        gets the sequences in order (each such row returns the user's final embedding).

        Cost: the new events only. All users go through one packed batch, cut into chunks of
        users so the gathered states stay within `chunk_bytes`.

        All or nothing: if it raises (bad input, out of memory, KeyboardInterrupt in any chunk)
        the store is exactly as before, so the same call can simply be retried.
        """
        if isinstance(user_ids, str):
            raise TypeError("user_ids must be a sequence of ids, got one string")
        ids = [str(u) for u in user_ids]
        if len(ids) != len(event_sequences):
            raise ValueError(f"update: {len(ids)} user ids but {len(event_sequences)} event sequences")
        seqs = [self._encode(s, i) for i, s in enumerate(event_sequences)]
        V = self.model.config.vocab_size
        for i, a in enumerate(seqs):     # check everything before changing anything
            if a.size and (a.min() < 0 or a.max() >= V):
                bad = a[(a < 0) | (a >= V)][0]
                raise ValueError(f"event_sequences[{i}] (user {ids[i]!r}): token id {bad} outside the "
                                 f"model vocabulary [0, {V})")

        # One row per distinct user; a user's sequences are concatenated in order (exactly the
        # same as applying them one after the other: stateful == whole).
        groups: Dict[str, List[int]] = {}
        for i, u in enumerate(ids):
            groups.setdefault(u, []).append(i)
        uniq = list(groups)
        useqs = [seqs[g[0]] if len(g) == 1 else np.concatenate([seqs[i] for i in g]) for g in groups.values()]
        new = [u for u in uniq if u not in self._index]

        L, H, d, _ = self._state_shape
        item = self._rows["states"].dtype.itemsize
        per_user = L * H * d * d * item + self._hidden * 8 + 8
        users_per_chunk = max(1, self.chunk_bytes // per_user)
        edt = state_dtype(self.model)
        out = np.empty((len(uniq), self._hidden), dtype=np.float64 if edt == torch.float64 else np.float32)
        show = self.progress if progress is None else progress
        from tqdm.auto import tqdm
        total = int(sum(s.size for s in useqs))

        # All or nothing: chunks are written back as they finish, so a failure in a later chunk
        # (OOM, Ctrl-C) must undo the earlier ones, else a retry counts their events twice. Kept
        # for that: a copy of the touched rows of users already in the store (one copy of what
        # the update reads anyway; new users' rows are zeros and need none) and the counts.
        old_rows = np.array([self._index[u] for u in uniq if u in self._index], dtype=np.int64)
        old = {k: r.take(old_rows) for k, r in self._rows.items()}
        n_ids, n_tail = len(self._ids), {k: r.n_tail for k, r in self._rows.items()}
        try:
            if new:
                for r in self._rows.values():
                    r.grow(len(new))
                for u in new:
                    self._index[u] = len(self._ids)
                    self._ids.append(u)
            rows = np.array([self._index[u] for u in uniq], dtype=np.int64)
            with tqdm(total=total, desc="updating users", unit="tok", unit_scale=True,
                      disable=not show or total == 0) as bar:
                for c0 in range(0, len(uniq), users_per_chunk):
                    sl = slice(c0, c0 + users_per_chunk)
                    r = rows[sl]
                    st = torch.from_numpy(self._rows["states"].take(r))               # [n, L, H, d, d]
                    carry = Carry([st[:, l] for l in range(L)],                       # views: updated in place
                                  torch.from_numpy(self._rows["sums"].take(r)),
                                  torch.from_numpy(self._rows["counts"].take(r)))
                    self._embedder.advance(useqs[sl], carry, bar=bar)
                    self._rows["states"].put(r, st.numpy())
                    self._rows["sums"].put(r, carry.sums.numpy())
                    self._rows["counts"].put(r, carry.counts.numpy())
                    out[sl] = carry.embeddings(edt).numpy()
        except BaseException:
            self._rollback(old_rows, old, n_ids, n_tail, new)
            raise
        pos = {u: j for j, u in enumerate(uniq)}
        return out[[pos[u] for u in ids]]

    def _rollback(self, old_rows: np.ndarray, old: dict, n_ids: int, n_tail: dict, new: List[str]) -> None:
        """Undoes a failed update: the touched rows of users already in the store get their old
        values back, the users it added are forgotten."""
        for k, r in self._rows.items():
            if old_rows.size:
                r.put(old_rows, old[k])
            # grow() hands out tail rows past n_tail without clearing them: they must stay zero.
            r.tail[n_tail[k]:r.n_tail] = 0
            r.n_tail = n_tail[k]
        for u in new:                  # may have stopped between registering and appending
            self._index.pop(u, None)
        del self._ids[n_ids:]

    # ------------------------------------------------------------------ persistence
    def _fingerprint(self) -> str:
        if self._weights_fp is None:
            self._weights_fp = weights_fingerprint(self.model)
        return self._weights_fp

    @staticmethod
    def exists(path) -> bool:
        """True if `path` holds a saved store (a CURRENT pointer)."""
        return (Path(path) / CURRENT).is_file()

    def save(self, path=None) -> Path:
        """Writes a new version and switches CURRENT to it atomically; returns the version dir.

        Default path: where the store was loaded from or last saved to.
        """
        if path is None:
            if self.path is None:
                raise ValueError("save: no path given and the store was never loaded or saved")
            path = self.path
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        if not self.exists(root) and any(not p.name.startswith(".tmp-") for p in root.iterdir()):
            raise ValueError(f"save: {root} is a non-empty directory that is not a user-state store "
                             f"(no {CURRENT} file); refusing to write into it")
        versions = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name))]
        name = f"v{(max(versions) + 1) if versions else 1:06d}"
        tmp = root / f".tmp-{name}-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        try:
            self._write_version(tmp)
            os.rename(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(root)
        atomic_write_text(root / CURRENT, name + "\n")     # the commit point
        for p in root.iterdir():                           # old versions, crashed saves' leftovers
            if p.name != name and (_VERSION_RE.match(p.name) or p.name.startswith(".tmp-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        self.path = root
        # Re-open from what was just written: drops the in-memory tail and copy-on-write pages.
        self._open_version(root / name, mmap=True)
        return root / name

    def _write_version(self, vdir: Path) -> None:
        files = {}
        for key in _ARRAYS:
            rows = self._rows[key]
            shape = (len(rows),) + rows.row_shape
            f = vdir / f"{key}.npy"
            # Written block by block through a memory map: saving never holds the store twice.
            mm = np.lib.format.open_memmap(f, mode="w+", dtype=rows.dtype, shape=shape)
            i = 0
            for block in rows.blocks(64 << 20):
                mm[i:i + len(block)] = block
                i += len(block)
            mm.flush()
            del mm
            fsync_path(f)
            files[key] = {"shape": list(shape), "dtype": rows.dtype.str}
        with open(vdir / "users.json", "w", encoding="utf-8") as fh:
            json.dump(self._ids, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "architecture_hash": self._arch_hash, "weights_fingerprint": self._fingerprint(),
            "model_config": self.model.config.to_dict(), "num_users": len(self._ids),
            "files": files, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(vdir / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(vdir)

    @classmethod
    def load(cls, path, model, *, mmap: bool = True, check_weights: bool = True, **kw) -> "UserStateStore":
        """Opens the live version of a saved store for `model` (keyword arguments as in the
        constructor). Errors if the store was written for another architecture or (with
        check_weights) other weights."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"user-state store {str(root)!r} does not exist")
        if not cls.exists(root):
            raise ValueError(f"{root} is not a user-state store: no {CURRENT} file")
        name = (root / CURRENT).read_text(encoding="utf-8").strip()
        if not _VERSION_RE.match(name):
            raise ValueError(f"{root / CURRENT}: expected a version name like v000001, found {name!r}")
        if not (root / name).is_dir():
            raise ValueError(f"{root / CURRENT} names version {name}, but {root / name} is missing")
        store = cls(model, **kw)
        store._open_version(root / name, mmap=mmap, check_weights=check_weights)
        store.path = root
        return store

    def _open_version(self, vdir: Path, *, mmap: bool, check_weights: bool = False) -> None:
        mpath = vdir / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{mpath}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{mpath}: format version {manifest.get('format_version')}, this code reads "
                             f"version {FORMAT_VERSION}")
        if manifest.get("architecture_hash") != self._arch_hash:
            raise ValueError(
                f"{vdir.parent}: the store was written for another model architecture "
                f"(hash {manifest.get('architecture_hash')}: {_describe(manifest.get('model_config', {}))}); "
                f"this model has hash {self._arch_hash} ({_describe(self.model.config.to_dict())}). "
                f"User states only mean something to the model that produced them: rebuild the store.")
        if check_weights and manifest.get("weights_fingerprint") != self._fingerprint():
            raise ValueError(
                f"{vdir.parent}: the store was written with other model weights (fingerprint "
                f"{manifest.get('weights_fingerprint')}, this model's is {self._fingerprint()}), e.g. by a "
                f"model trained again with the same config. Rebuild the store, or pass check_weights=False.")
        try:
            ids = json.loads((vdir / "users.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{vdir / 'users.json'}: unreadable ({e})") from None
        U = manifest.get("num_users")
        if not isinstance(ids, list) or len(ids) != U:
            raise ValueError(f"{vdir / 'users.json'}: expected a list of {U} user ids")
        want = {"states": (U,) + self._state_shape, "sums": (U, self._hidden), "counts": (U,)}
        arrays = {}
        for key in _ARRAYS:
            f = vdir / f"{key}.npy"
            try:
                a = np.load(f, mmap_mode="c" if mmap else None)
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: unreadable ({e})") from None
            if a.shape != want[key]:
                raise ValueError(f"{f}: shape {a.shape}, expected {want[key]} from the manifest and the model")
            arrays[key] = a
        index = {u: i for i, u in enumerate(ids)}
        if len(index) != len(ids):
            raise ValueError(f"{vdir / 'users.json'}: user ids are not unique")
        self._ids, self._index = list(ids), index
        self._rows = {k: _Rows(want[k][1:], arrays[k].dtype, arrays[k]) for k in _ARRAYS}
