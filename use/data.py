"""Data for USE (SPEC §4): vocabulary, readers, the memory-mapped corpus and training batches.

Pipeline, top to bottom:

    Vocab            [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4, then event types (id = 5 + e)
    read_txt/csv     (user_id, [event, ...]) per user, in file order
    read_eval_tsv    history / context (/ label / user_id) rows for the evaluations
    load_corpus      one tokenisation pass -> CSR `tokens` int32 [N] + `offsets` int64 [U+1],
                     cached as .npy next to the data and memory-mapped on reuse
    BatchSampler     random segments (or SUP pairs) -> use_kernels.gather_segments -> TrainBatch

Every error names the file (and line, column or argument), what was expected and what was found.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

import use_kernels
from use_kernels import PaddedSegments

from .io import _umask, atomic_write_bytes, fsync_path
from .losses import OBJECTIVES  # noqa: F401  (re-exported: the objective names live with the losses)

PathLike = Union[str, os.PathLike]

SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
UNK_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID = range(5)
EVENT_OFFSET = len(SPECIAL_TOKENS)  # event type e has token id EVENT_OFFSET + e

_VOCAB_FORMAT = "use-vocab"
_CACHE_FORMAT = "use-corpus-cache"
_CACHE_VERSION = 1


def _atomic_write_text(path: Path, text: str) -> None:
    # Encoded here, not by the platform's locale: tokens may be any Unicode.
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

class Vocab:
    """Ordered token list: the five special tokens at ids 0..4, then the event types.

    `encode` maps events to ids; an event string equal to a special token (e.g. "[PAD]" found in
    the data) is encoded as [UNK], because data must never be able to inject padding or mask
    tokens into a sequence.
    """

    unk_id, cls_id, sep_id, pad_id, mask_id = UNK_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID
    event_offset = EVENT_OFFSET

    def __init__(self, tokens: Sequence[str], *, source: str = "tokens"):
        tokens = list(tokens)
        for i, (want, got) in enumerate(zip(SPECIAL_TOKENS, tokens)):
            if got != want:
                raise ValueError(f"{source}: expected special token {want} at id {i}, found {got!r}; "
                                 f"a USE vocabulary starts with {', '.join(SPECIAL_TOKENS)}")
        if len(tokens) < EVENT_OFFSET:
            raise ValueError(f"{source}: only {len(tokens)} tokens; expected at least the "
                             f"{EVENT_OFFSET} special tokens {', '.join(SPECIAL_TOKENS)}")
        index: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TypeError(f"{source}: token at id {i} is {type(t).__name__}, expected str")
            if t in index:
                raise ValueError(f"{source}: token {t!r} appears twice (ids {index[t]} and {i})")
            index[t] = i
        self._tokens = tokens
        self._index = index
        # The event-only view used by encode: special-token strings are not events.
        self._event_index = {t: i for t, i in index.items() if i >= EVENT_OFFSET}

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def build(cls, events: Iterable[str], min_count: int = 1) -> "Vocab":
        """Vocabulary of the events seen at least `min_count` times, most frequent first, ties
        broken by the string, so the same data always gives the same ids."""
        counts: dict[str, int] = {}
        for e in events:
            counts[e] = counts.get(e, 0) + 1
        return cls.from_counts(counts, min_count=min_count)

    @classmethod
    def from_counts(cls, counts: "dict[str, int]", min_count: int = 1) -> "Vocab":
        if min_count < 1:
            raise ValueError(f"Vocab.build: min_count must be >= 1, got {min_count}")
        specials = set(SPECIAL_TOKENS)
        kept = [(e, c) for e, c in counts.items() if c >= min_count and e not in specials]
        kept.sort(key=lambda ec: (-ec[1], ec[0]))
        return cls(list(SPECIAL_TOKENS) + [e for e, _ in kept])

    # -- persistence --------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": _VOCAB_FORMAT, "version": 1, "fingerprint": self.fingerprint(),
                "tokens": self._tokens}

    def save(self, path: PathLike) -> None:
        _atomic_write_text(Path(path), json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: PathLike) -> "Vocab":
        """Read our JSON, an HF `tokenizer.json` (its `model.vocab` token -> id map plus
        `added_tokens`), or a bare token -> id JSON map (HF `vocab.json`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a JSON vocabulary ({e})") from None
        return cls.from_json(obj, source=str(path))

    @classmethod
    def from_json(cls, obj, *, source: str = "vocab") -> "Vocab":
        if isinstance(obj, dict) and obj.get("format") == _VOCAB_FORMAT:
            tokens = obj.get("tokens")
            if not isinstance(tokens, list):
                raise ValueError(f"{source}: 'tokens' must be a list, got {type(tokens).__name__}")
            vocab = cls(tokens, source=source)
            want = obj.get("fingerprint")
            if want is not None and want != vocab.fingerprint():
                raise ValueError(f"{source}: fingerprint mismatch (file says {want}, tokens hash to "
                                 f"{vocab.fingerprint()}); the file is corrupt or was hand-edited")
            return vocab
        if isinstance(obj, dict) and "model" in obj:
            model = obj["model"]
            mapping = model.get("vocab") if isinstance(model, dict) else None
            if not isinstance(mapping, dict):
                kind = model.get("type") if isinstance(model, dict) else type(model).__name__
                raise ValueError(f"{source}: HF tokenizer model {kind!r} has no token -> id "
                                 f"'model.vocab' map; supported: WordLevel/WordPiece/BPE vocabularies")
            pairs = list(mapping.items())
            for at in obj.get("added_tokens") or []:
                if isinstance(at, dict) and "content" in at and "id" in at:
                    pairs.append((at["content"], at["id"]))
            return cls(_tokens_from_id_map(pairs, source), source=source)
        if isinstance(obj, dict) and obj and all(isinstance(v, int) for v in obj.values()):
            return cls(_tokens_from_id_map(list(obj.items()), source), source=source)
        raise ValueError(f"{source}: unrecognised vocabulary JSON; expected {{'format': "
                         f"'{_VOCAB_FORMAT}', 'tokens': [...]}}, an HF tokenizer.json or a token -> id map")

    # -- mapping ------------------------------------------------------------------------------

    def encode(self, events: Sequence[str]) -> np.ndarray:
        """Event strings -> int32 ids; unknown events (and special-token strings) -> [UNK]."""
        get = self._event_index.get
        return np.array([get(e, UNK_ID) for e in events], dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        out = []
        n = len(self._tokens)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"Vocab.decode: id {i} out of range [0, {n})")
            out.append(self._tokens[i])
        return out

    def token_to_id(self, token: str) -> int:
        return self._index.get(token, UNK_ID)

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    @property
    def event_types(self) -> list[str]:
        return self._tokens[EVENT_OFFSET:]

    @property
    def num_events(self) -> int:
        """E: the number of event types (FEP head width)."""
        return len(self._tokens) - EVENT_OFFSET

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens, {self.num_events} event types, {self.fingerprint()[:12]})"

    def fingerprint(self) -> str:
        """sha256 of the ordered token list; a checkpoint stores it to check its vocabulary.
        JSON-encoded so that no choice of separator can make two different lists collide."""
        blob = json.dumps(self._tokens, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _tokens_from_id_map(pairs: list, source: str) -> list[str]:
    """[(token, id), ...] -> dense token list; ids must be exactly 0..n-1."""
    by_id: dict[int, str] = {}
    for tok, i in pairs:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{source}: token {tok!r} has id {i!r}; expected a non-negative integer")
        if i in by_id and by_id[i] != tok:
            raise ValueError(f"{source}: id {i} is given to both {by_id[i]!r} and {tok!r}")
        by_id[i] = tok
    n = len(by_id)
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise ValueError(f"{source}: token ids are not contiguous: {len(missing)} ids in [0, {n}) "
                         f"have no token (first: {missing[:5]}); largest id is {max(by_id)}")
    tokens = [by_id[i] for i in range(n)]
    wrong = [(i, want, tokens[i] if i < n else None) for i, want in enumerate(SPECIAL_TOKENS)
             if i >= n or tokens[i] != want]
    if wrong:
        where = {t: i for i, t in by_id.items() if t in SPECIAL_TOKENS}
        details = "; ".join(f"expected {want} at id {i}, found {got!r}" for i, want, got in wrong)
        raise ValueError(f"{source}: special tokens are not at the ids USE needs ({details}); "
                         f"special tokens found at {where or 'no ids'}. Required order: "
                         + ", ".join(f"{t}={i}" for i, t in enumerate(SPECIAL_TOKENS)))
    return tokens


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------

def split_events(text: str, char_level: bool) -> list[str]:
    """One cell / line of text -> events: whitespace-separated, or one event per character."""
    return list(text) if char_level else text.split()


def _strip_eol(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n") or line.endswith("\r"):
        return line[:-1]
    return line


def _decoded_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file, decoded one at a time so a bad byte is reported with its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: unreadable line, not valid UTF-8 "
                                 f"(byte {e.start}: {e.reason})") from None
            if lineno == 1 and line.startswith("\ufeff"):  # BOM written by some spreadsheet tools
                line = line[1:]
            yield line


def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    return path


def read_txt(path: PathLike, *, char_level: bool = False) -> Iterator[tuple[str, list[str]]]:
    """`.txt`: one user per line. Yields (user_id, events) with user_id = the 1-based line number
    (so a user can be found in the file); blank lines hold no user and are skipped."""
    path = _check_file(path)
    for lineno, line in enumerate(_decoded_lines(path), start=1):
        events = split_events(_strip_eol(line), char_level)
        if events:
            yield str(lineno), events


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each record; the line number is where the record starts."""
    csv.field_size_limit(2**31 - 1)  # one cell can hold a whole user history (millions of chars)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(_decoded_lines(path), delimiter=delimiter, quoting=quoting)
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: unreadable line ({e})") from None


def _header(path: Path, rows: Iterator[tuple[int, list[str]]]) -> dict[str, int]:
    for _, row in rows:
        if any(c.strip() for c in row):
            return {c.strip().lower(): i for i, c in enumerate(row)}
    raise ValueError(f"{path}: empty file, expected a header row")


def _missing_columns(path: Path, cols: dict[str, int], needed: list[str]) -> None:
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                         f"columns found in the header: {', '.join(repr(c) for c in cols) or 'none'}")


def read_csv(path: PathLike, *, char_level: bool = False) -> Iterator[tuple[str, list[str]]]:
    """`.csv` with a header naming `sequence` and `user_id` (or `user`) columns. Rows of the same
    user are concatenated in file order; users come out in order of first appearance."""
    path = _check_file(path)
    rows = _csv_rows(path, ",")
    cols = _header(path, rows)
    user_col = "user" if "user" in cols and "user_id" not in cols else "user_id"
    missing = [c for c in ("sequence", user_col) if c not in cols]
    if missing:
        names = ", ".join("'user_id' (or 'user')" if c == "user_id" else repr(c) for c in missing)
        raise ValueError(f"{path}: missing column(s) {names}; columns found in the header: "
                         f"{', '.join(repr(c) for c in cols) or 'none'}")
    i_seq, i_user = cols["sequence"], cols[user_col]
    width = len(cols)
    users: dict[str, list[str]] = {}
    for lineno, row in rows:
        if not any(c.strip() for c in row):
            continue
        if len(row) != width:
            raise ValueError(f"{path}, line {lineno}: unreadable line, {len(row)} fields where the "
                             f"header has {width}")
        uid = row[i_user].strip()
        if not uid:
            raise ValueError(f"{path}, line {lineno}: empty {user_col!r} value")
        users.setdefault(uid, []).extend(split_events(row[i_seq], char_level))
    for uid, events in users.items():
        if events:
            yield uid, events


@dataclass
class EvalSet:
    """Rows of an eval `.tsv`: per user a history and a later context (lists of event strings),
    optional labels (strings, as written) and user ids (the 1-based row number when absent)."""
    histories: list[list[str]]
    contexts: list[list[str]]
    labels: Optional[list[str]]
    user_ids: list[str]

    def __len__(self) -> int:
        return len(self.histories)

    def encode(self, vocab: Vocab) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [vocab.encode(h) for h in self.histories], [vocab.encode(c) for c in self.contexts]


def read_eval_tsv(path: PathLike, *, char_level: bool = False) -> EvalSet:
    """Eval `.tsv`: header with `history` and `context`, optional `label` and `user_id`."""
    path = _check_file(path)
    rows = _csv_rows(path, "\t")
    cols = _header(path, rows)
    _missing_columns(path, cols, ["history", "context"])
    width = len(cols)
    hist, ctx, labels, uids = [], [], [], []
    for lineno, row in rows:
        if not any(c.strip() for c in row):
            continue
        if len(row) != width:
            raise ValueError(f"{path}, line {lineno}: unreadable line, {len(row)} tab-separated "
                             f"fields where the header has {width}")
        h = split_events(row[cols["history"]], char_level)
        c = split_events(row[cols["context"]], char_level)
        if not h or not c:
            raise ValueError(f"{path}, line {lineno}: empty {'history' if not h else 'context'}")
        hist.append(h)
        ctx.append(c)
        if "label" in cols:
            labels.append(row[cols["label"]].strip())
        uids.append(row[cols["user_id"]].strip() if "user_id" in cols else str(len(uids) + 1))
    if not hist:
        raise ValueError(f"{path}: no rows after the header")
    if len(set(uids)) != len(uids):
        raise ValueError(f"{path}: user_id values are not unique")
    return EvalSet(hist, ctx, labels if "label" in cols else None, uids)


_READERS = {".txt": read_txt, ".csv": read_csv}


def iter_users(path: PathLike, *, char_level: bool = False) -> Iterator[tuple[str, list[str]]]:
    """(user_id, events) for every user of a training file, chosen by suffix (.txt or .csv)."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        hint = " (.tsv is the eval format; read it with read_eval_tsv)" if path.suffix.lower() == ".tsv" else ""
        raise ValueError(f"{path}: unsupported data format {path.suffix!r}; expected one of "
                         f"{', '.join(_READERS)}{hint}")
    return reader(path, char_level=char_level)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """CSR corpus: user u owns `tokens[offsets[u]:offsets[u+1]]` (SPEC §4)."""
    tokens: np.ndarray        # [N] int32 token ids
    offsets: np.ndarray       # [U+1] int64, offsets[0] == 0, offsets[-1] == N
    vocab: Vocab
    user_ids: list[str]

    def __post_init__(self):
        if self.tokens.dtype != np.int32 or self.tokens.ndim != 1:
            raise TypeError(f"Corpus.tokens must be 1-D int32, got {self.tokens.ndim}-D {self.tokens.dtype}")
        if self.offsets.dtype != np.int64 or self.offsets.ndim != 1 or len(self.offsets) < 1:
            raise TypeError(f"Corpus.offsets must be 1-D int64 [U+1], got {self.offsets.ndim}-D "
                            f"{self.offsets.dtype} of length {len(self.offsets)}")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            raise ValueError(f"Corpus.offsets must run from 0 to len(tokens)={len(self.tokens)}, "
                             f"got {int(self.offsets[0])}..{int(self.offsets[-1])}")
        if len(self.user_ids) != self.num_users:
            raise ValueError(f"Corpus: {len(self.user_ids)} user ids for {self.num_users} users")

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def lengths(self) -> np.ndarray:
        """[U] int64 events per user."""
        return np.diff(self.offsets)

    def user_tokens(self, u: int) -> np.ndarray:
        return self.tokens[self.offsets[u]:self.offsets[u + 1]]

    def split(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Hold out whole users: (train_user_idx, val_user_idx), sorted int64, disjoint, covering
        all users, the same for the same (num_users, val_fraction, seed)."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"Corpus.split: val_fraction must be in [0, 1), got {val_fraction}")
        U = self.num_users
        n_val = int(round(val_fraction * U))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), U - 1)  # a nonzero fraction holds out >= 1 user, keeps >= 1
        perm = np.random.default_rng(np.random.SeedSequence([seed, U])).permutation(U)
        return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir_for(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".use-cache")


def _tokenize(path: Path, vocab: Optional[Vocab], char_level: bool, min_count: int):
    """One pass over the file. Events get provisional ids in order of first appearance (a dict
    lookup per event, no second pass over the text); when the vocabulary is built here its order
    needs the counts, so the provisional ids are remapped through one lookup array at the end."""
    provisional: dict[str, int] = {}
    pieces, user_ids, lengths = [], [], []
    for uid, events in iter_users(path, char_level=char_level):
        setdefault = provisional.setdefault
        pieces.append(np.array([setdefault(e, len(provisional)) for e in events], dtype=np.int32))
        user_ids.append(uid)
        lengths.append(len(events))
    if not user_ids:
        raise ValueError(f"{path}: empty file, no users (no line/row with any event)")
    raw = np.concatenate(pieces)
    names = list(provisional)
    if vocab is None:
        counts = np.bincount(raw, minlength=len(names))
        vocab = Vocab.from_counts(dict(zip(names, counts.tolist())), min_count=min_count)
    remap = vocab.encode(names)  # provisional id -> final id ([UNK] for unknown / dropped)
    tokens = remap[raw]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens, offsets, vocab, user_ids


def _read_cache(cdir: Path, meta_want: dict, vocab: Optional[Vocab]) -> Optional[Corpus]:
    """The cached corpus if it is complete and fresh for this request, else None."""
    try:
        meta = json.loads((cdir / "meta.json").read_text(encoding="utf-8"))
        for k in ("format", "version", "size", "char_level"):
            if meta.get(k) != meta_want[k]:
                return None
        if vocab is None and (meta.get("vocab_given") or meta.get("min_count") != meta_want["min_count"]):
            return None  # the cached tokens used another vocabulary than the one built here
        if vocab is not None and meta.get("vocab_fingerprint") != vocab.fingerprint():
            return None
        if meta.get("mtime_ns") != meta_want["mtime_ns"]:
            # Touched (copied, checked out) but maybe unchanged: the hash decides.
            if meta.get("sha256") != _file_sha256(Path(meta_want["_path"])):
                return None
            try:  # remember the new mtime so the next load skips the hash
                meta["mtime_ns"] = meta_want["mtime_ns"]
                _atomic_write_text(cdir / "meta.json", json.dumps(meta, indent=1))
            except OSError:
                pass  # read-only data directory: still valid, just hashed again next time
        cached_vocab = Vocab.load(cdir / "vocab.json")
        user_ids = json.loads((cdir / "user_ids.json").read_text(encoding="utf-8"))
        tokens = np.load(cdir / "tokens.npy", mmap_mode="r")
        offsets = np.load(cdir / "offsets.npy", mmap_mode="r")
        return Corpus(tokens, offsets, vocab if vocab is not None else cached_vocab, user_ids)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None  # missing or corrupt: rebuild


def load_corpus(path: PathLike, *, vocab: Optional[Vocab] = None, char_level: bool = False,
                cache: bool = True, min_count: int = 1) -> Corpus:
    """Tokenise a `.txt`/`.csv` file into a Corpus.

    With `vocab` (e.g. a checkpoint's) events are encoded with it, unknown ones as [UNK];
    otherwise a vocabulary is built from the file (`min_count`, frequency order).
    With `cache`, the arrays live in `<path>.use-cache/` as .npy files and are memory-mapped
    (read-only) on the next call while the source is unchanged (same size and mtime, or same
    sha256 when only the mtime moved). The cache directory is written whole in a temporary
    directory and renamed into place, so concurrent loaders (one per rank) never see half of it.
    If the data directory is not writable the corpus is built in memory with a warning.
    """
    path = _check_file(path)
    st = path.stat()
    meta_want = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "char_level": bool(char_level),
                 "min_count": min_count if vocab is None else None, "_path": str(path)}
    cdir = cache_dir_for(path)
    if cache and cdir.is_dir():
        hit = _read_cache(cdir, meta_want, vocab)
        if hit is not None:
            return hit

    sha = _file_sha256(path) if cache else None
    tokens, offsets, built_vocab, user_ids = _tokenize(path, vocab, char_level, min_count)
    if not cache:
        return Corpus(tokens, offsets, built_vocab, user_ids)

    meta = {k: v for k, v in meta_want.items() if not k.startswith("_")}
    meta.update(source=path.name, sha256=sha, vocab_fingerprint=built_vocab.fingerprint(),
                vocab_given=vocab is not None, num_users=len(user_ids), num_tokens=int(len(tokens)))
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{cdir.name}.tmp-"))
    except OSError as e:
        warnings.warn(f"load_corpus: cannot write the cache next to {path} ({e}); using an "
                      f"in-memory corpus (tokenised again next time)", stacklevel=2)
        return Corpus(tokens, offsets, built_vocab, user_ids)
    try:
        # mkdtemp/mkstemp create private (0700/0600) entries; a shared data directory needs the
        # permissions any other file there would get.
        os.chmod(tmp, 0o777 & ~_umask())
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "offsets.npy", offsets)
        built_vocab.save(tmp / "vocab.json")
        (tmp / "user_ids.json").write_text(json.dumps(user_ids, ensure_ascii=False), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        # On disk before the rename makes them visible: otherwise a power loss can leave the
        # installed cache with a valid meta.json beside empty or stale arrays.
        for name in ("tokens.npy", "offsets.npy", "vocab.json", "user_ids.json", "meta.json"):
            fsync_path(tmp / name)
        fsync_path(tmp)
        _install_dir(tmp, cdir)
        fsync_path(path.parent)        # the rename itself
    except OSError as e:  # disk full, quota, ...: the corpus itself is fine
        warnings.warn(f"load_corpus: could not write the cache {cdir} ({e}); using an in-memory "
                      f"corpus (tokenised again next time)", stacklevel=2)
        return Corpus(tokens, offsets, built_vocab, user_ids)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    hit = _read_cache(cdir, meta_want, vocab)
    if hit is None:  # another process replaced it with something else in the meantime
        return Corpus(tokens, offsets, built_vocab, user_ids)
    return hit


def _install_dir(tmp: Path, cdir: Path) -> None:
    """Move a finished cache directory into place. A directory cannot be os.replace()d over a
    non-empty one, so the old one is first renamed aside (readers that already memory-mapped its
    files keep valid mappings after the unlink) and then removed."""
    for _ in range(3):
        try:
            os.rename(tmp, cdir)
            return
        except OSError:
            if not cdir.exists():
                raise
        trash = cdir.with_name(f".{cdir.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.rename(cdir, trash)
        except FileNotFoundError:
            continue  # someone else moved it away first; retry the install
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not install the corpus cache at {cdir} (it keeps being replaced)")


# ----------------------------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainBatch:
    """One training step's input. `views` has one PaddedSegments for clm/fep, two for objectives
    with SUP (view 0 = segment a, view 1 = segment b of the same users, row for row). All views
    share one padded width: the longest segment in the batch, not the global max_len."""
    views: list[PaddedSegments]
    users: np.ndarray          # [B] int64 corpus user index of each row
    starts: list[np.ndarray]   # per view [B] int64, start inside the user's sequence
    lengths: list[np.ndarray]  # per view [B] int64, real tokens of each row
    num_tokens: int            # real (unpadded) tokens over all views
    step: int                  # the sampler step that drew this batch


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a (possibly read-only, memory-mapped) array. torch warns that it
    cannot protect read-only memory; the gather only reads, so the warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(a))


class BatchSampler:
    """Random training batches, deterministic in (seed, rank, step).

    Each step draws `batch_size` segments whose lengths are uniform in [min_len, max_len] (SPEC
    §3: random lengths so length cannot identify a user), or SUP pairs: two non-overlapping
    segments of the same user with >= `gap` events between them. Rows are gathered by
    `use_kernels.gather_segments`, with FEP multi-hot labels of window `fep_window` when the
    objective has FEP. With world_size > 1, rank r draws only from users[r::world_size].

    The random generator is re-seeded from (seed, rank, step) at every step, so `state_dict()`
    is just the step counter and resuming reproduces the exact batches that would have followed.
    """

    def __init__(self, corpus: Corpus, *, users: Optional[Sequence[int]] = None, batch_size: int,
                 min_len: int, max_len: int, objective: str = "fep_sup", gap: int = 0,
                 fep_window: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1):
        if objective not in OBJECTIVES:
            raise ValueError(f"BatchSampler: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if batch_size < 1:
            raise ValueError(f"BatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"BatchSampler: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if gap < 0:
            raise ValueError(f"BatchSampler: gap must be >= 0, got {gap}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BatchSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.use_fep = "fep" in objective.split("_")
        self.use_sup = "sup" in objective.split("_")
        if self.use_fep and fep_window < 1:
            raise ValueError(f"BatchSampler: objective {objective!r} needs fep_window >= 1, got {fep_window}")
        if self.use_sup and batch_size < 2:
            raise ValueError(f"BatchSampler: objective {objective!r} contrasts users within a batch "
                             f"and needs batch_size >= 2, got {batch_size}")

        self.corpus = corpus
        self.objective = objective
        self.batch_size, self.min_len, self.max_len = batch_size, min_len, max_len
        self.gap, self.fep_window = gap, fep_window if self.use_fep else 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

        all_users = np.arange(corpus.num_users, dtype=np.int64) if users is None \
            else np.asarray(users, dtype=np.int64).reshape(-1)
        if len(all_users) and (all_users.min() < 0 or all_users.max() >= corpus.num_users):
            raise ValueError(f"BatchSampler: user indices must be in [0, {corpus.num_users}), got "
                             f"{int(all_users.min())}..{int(all_users.max())}")
        self.users = all_users[rank::world_size]

        # Fail now, with numbers, rather than at step 1 inside the sampler. SUP needs batch_size
        # distinct users (a repeated user would be its own in-batch negative); clm/fep rows may
        # repeat a user (the sampler then draws with replacement), so one long-enough user is enough.
        self.min_user_len = 2 * min_len + gap if self.use_sup else min_len
        needed = batch_size if self.use_sup else 1
        lengths = corpus.lengths()[self.users]
        long_enough = int((lengths >= self.min_user_len).sum())
        if long_enough < needed:
            what = (f"two segments of >= {min_len} events with a gap of {gap}, i.e. >= {self.min_user_len} events"
                    if self.use_sup else f">= {min_len} events")
            shard = f" in the shard of rank {rank}/{world_size}" if world_size > 1 else ""
            longest = int(lengths.max()) if len(lengths) else 0
            raise ValueError(f"BatchSampler: only {long_enough} of {len(self.users)} users{shard} are long "
                             f"enough ({what}; the longest has {longest}), but {needed} are needed"
                             + (f" (batch_size={batch_size} distinct users for SUP)" if self.use_sup else "")
                             + ". Lower min_len/gap/batch_size or use longer sequences.")

        self._tokens = _torch_view(corpus.tokens)
        self._offsets = _torch_view(corpus.offsets)
        self._offsets_np = np.asarray(corpus.offsets)

    @property
    def num_views(self) -> int:
        return 2 if self.use_sup else 1

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, step]))

    def next_batch(self) -> TrainBatch:
        step = self.step
        rng = self._rng(step)
        kw = dict(min_len=self.min_len, max_len=self.max_len, rng=rng, users=self.users)
        if self.use_sup:
            p = use_kernels.sample_sup_pairs(self._offsets_np, self.batch_size, gap=self.gap, **kw)
            users = np.asarray(p.users, dtype=np.int64)
            segs = [(p.starts_a, p.lengths_a), (p.starts_b, p.lengths_b)]
        else:
            s = use_kernels.sample_segments(self._offsets_np, self.batch_size, **kw)
            users = np.asarray(s.users, dtype=np.int64)
            segs = [(s.starts, s.lengths)]
        width = max(int(np.max(ln)) for _, ln in segs)  # pad to this batch's longest row only
        users_t = torch.from_numpy(users)
        views = []
        for st, ln in segs:
            views.append(use_kernels.gather_segments(
                self._tokens, self._offsets, users_t,
                torch.from_numpy(np.asarray(st, dtype=np.int64)),
                torch.from_numpy(np.asarray(ln, dtype=np.int64)),
                max_len=width, pad_id=PAD_ID, fep_window=self.fep_window,
                num_events=self.corpus.vocab.num_events if self.use_fep else 0,
                event_offset=EVENT_OFFSET))
        starts = [np.asarray(st, dtype=np.int64) for st, _ in segs]
        lengths = [np.asarray(ln, dtype=np.int64) for _, ln in segs]
        self.step = step + 1
        return TrainBatch(views=views, users=users, starts=starts, lengths=lengths,
                          num_tokens=int(sum(int(ln.sum()) for ln in lengths)), step=step)

    def __iter__(self) -> Iterator[TrainBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "objective": self.objective}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state['step']`. Seed/rank/world_size must match: with other values the same
        step would draw different batches, which is not a resume."""
        for k in ("seed", "rank", "world_size"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"BatchSampler.load_state_dict: {k}={state[k]} in the saved state, "
                                 f"{getattr(self, k)} in this sampler")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"BatchSampler.load_state_dict: step must be >= 0, got {step}")
        self.step = step
