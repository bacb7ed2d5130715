"""Synthetic user behavior: the embedded default data set (SPEC §4), deterministic by seed.

The world has E event types, each an (action, topic) pair such as `view_sports` or `buy_travel`,
and G latent user groups. The structure a model can learn:

- Long-term preference: each group has a preference over topics and actions (sparse Dirichlet);
  each user mixes its group's preference with a personal one (weight λ_u ~ U(0.3, 0.7)), so the
  group is recoverable (classification) and the user is recognisable (re-identification).
- Sessions with short-term drift: behavior comes in sessions of 5-60 events; each session mixes
  a session-specific topic focus into the user's preference (β ~ U(0.2, 0.5)).
- Sequential structure: inside a session the next event repeats the previous one (probability
  r_u), moves to a related event (same topic other action, or same action on a neighbouring
  topic; probability m_u), or is drawn afresh from the session's preference. This is what makes
  future-event prediction better than frequency counting.

All users are simulated in lockstep, one vectorised step per event position ([U, E] work per
step instead of a Python loop per event): 2000 users x 3000 events take about a second.

`python -m use.synthetic --out DIR` writes the default data set (see --help).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .io import atomic_write_bytes

PathLike = Union[str, os.PathLike]

ACTIONS = ("view", "like", "share", "buy")
ACTION_RATES = np.array([0.55, 0.25, 0.12, 0.08])   # views dominate, purchases are rare
TOPICS = ("news", "sports", "music", "movies", "games", "food", "travel", "fashion", "tech",
          "finance", "health", "kids")

SESSION_LEN = (5, 60)          # events per session, uniform inclusive
GROUP_WEIGHT = (0.3, 0.7)      # λ_u: share of the group preference in a user's preference
SESSION_DRIFT = (0.2, 0.5)     # β: share of the session's own topic focus
REPEAT_PROB = (0.1, 0.35)      # r_u: repeat the previous event
RELATED_PROB = (0.1, 0.3)      # m_u: move to a related event

# Independent random streams under one seed: the world (groups, event relations), the training
# users and the eval users. Eval users come from their own stream, so they are distinct people.
_WORLD, _TRAIN, _EVAL = 0, 1, 2

_META_FORMAT = "use-synthetic"
_META_VERSION = 1


def event_names(num_events: int) -> list[str]:
    """`{action}_{topic}` for event e = topic * len(ACTIONS) + action; topics past the named ones
    are `topic12`, `topic13`, ..."""
    if num_events < 1:
        raise ValueError(f"num_events must be >= 1, got {num_events}")
    names = []
    for e in range(num_events):
        t, a = divmod(e, len(ACTIONS))
        topic = TOPICS[t] if t < len(TOPICS) else f"topic{t:02d}"
        names.append(f"{ACTIONS[a]}_{topic}")
    return names


@dataclass
class _World:
    group_pref: np.ndarray     # [G, E] each row sums to 1
    related_cdf: np.ndarray    # [E, E] row-wise CDF of the "related event" move
    topic_of: np.ndarray       # [E] topic index of each event
    action_w: np.ndarray       # [E] base rate of each event's action
    num_topics: int


def _event_pref(topic_p: np.ndarray, action_p: np.ndarray, topic_of: np.ndarray,
                action_of: np.ndarray) -> np.ndarray:
    """[..., K] topic and [..., A] action preferences -> [..., E] event preference (normalised)."""
    p = topic_p[..., topic_of] * action_p[..., action_of]
    return p / p.sum(-1, keepdims=True)


def _make_world(seed: int, num_groups: int, num_events: int) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _WORLD]))
    E, A = num_events, len(ACTIONS)
    K = -(-E // A)  # topics (the last one may have fewer than A actions)
    topic_of = np.arange(E) // A
    action_of = np.arange(E) % A
    # Sparse topic tastes (α = 0.4 puts most mass on a few topics); action habits vary less.
    g_topic = rng.dirichlet(np.full(K, 0.4), size=num_groups)
    g_action = rng.dirichlet(20.0 * ACTION_RATES, size=num_groups)
    group_pref = _event_pref(g_topic, g_action, topic_of, action_of)

    # Related events: same topic, other action (weight 2); same action, neighbouring topic on a
    # ring of topics (weight 1).
    same_topic = (topic_of[:, None] == topic_of[None, :]).astype(float) * 2.0
    dt = np.abs(topic_of[:, None] - topic_of[None, :])
    ring = np.minimum(dt, K - dt) == 1
    related = same_topic + ((action_of[:, None] == action_of[None, :]) & ring)
    np.fill_diagonal(related, 0.0)
    if E == 1:
        related[0, 0] = 1.0
    related[related.sum(1) == 0] = 1.0  # isolated event (tiny E): any event is "related"
    related /= related.sum(1, keepdims=True)
    return _World(group_pref, np.cumsum(related, 1), topic_of, ACTION_RATES[action_of], K)


def _draw(cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of a [U, E] CDF (inverse transform, vectorised)."""
    r = rng.random(cdf.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < r[:, None]).sum(1), cdf.shape[1] - 1)


def _simulate(world: _World, groups: np.ndarray, lengths: np.ndarray,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Event ids (int16) for users of the given groups and sequence lengths."""
    U, E = len(groups), world.group_pref.shape[1]
    K = world.num_topics
    topic_of = world.topic_of
    action_of = np.arange(E) % len(ACTIONS)

    lam = rng.uniform(*GROUP_WEIGHT, size=(U, 1))
    personal = _event_pref(rng.dirichlet(np.full(K, 0.4), size=U),
                           rng.dirichlet(20.0 * ACTION_RATES, size=U), topic_of, action_of)
    user_pref = lam * world.group_pref[groups] + (1.0 - lam) * personal          # [U, E]
    repeat_p = rng.uniform(*REPEAT_PROB, size=U)
    related_p = rng.uniform(*RELATED_PROB, size=U)

    T = int(lengths.max()) if U else 0
    out = np.empty((U, T), dtype=np.int16)
    session_cdf = np.empty((U, E))
    left = np.zeros(U, dtype=np.int64)        # events left in the current session
    prev = np.zeros(U, dtype=np.int64)
    for t in range(T):
        new = np.flatnonzero(left == 0)
        if new.size:
            # New session: a topic focus (α = 0.2: one or two topics) mixed into the preference.
            n = new.size
            beta = rng.uniform(*SESSION_DRIFT, size=(n, 1))
            focus = _event_pref(rng.dirichlet(np.full(K, 0.2), size=n),
                                np.broadcast_to(ACTION_RATES, (n, len(ACTIONS))), topic_of, action_of)
            session_cdf[new] = np.cumsum((1.0 - beta) * user_pref[new] + beta * focus, 1)
            left[new] = rng.integers(SESSION_LEN[0], SESSION_LEN[1] + 1, size=n)
        fresh = _draw(session_cdf, rng)
        related = _draw(world.related_cdf[prev], rng)
        u = rng.random(U)
        # The first event of a session has no predecessor in the session: always fresh.
        first = np.zeros(U, dtype=bool)
        first[new] = True
        ev = np.where(u < repeat_p, prev, np.where(u < repeat_p + related_p, related, fresh))
        ev = np.where(first, fresh, ev)
        out[:, t] = ev
        prev = ev
        left -= 1
    return [out[i, :lengths[i]] for i in range(U)]


def _lengths(events_per_user: Union[int, Sequence[int]], n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(events_per_user, (int, np.integer)):
        lo = hi = int(events_per_user)
    else:
        lo, hi = (int(x) for x in events_per_user)
    if not 1 <= lo <= hi:
        raise ValueError(f"events_per_user must be an int >= 1 or a range (lo, hi) with 1 <= lo <= hi, "
                         f"got {events_per_user!r}")
    return rng.integers(lo, hi + 1, size=n)


def _groups(n: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced group labels in random order (every group gets n/G users, up to one)."""
    return rng.permutation(np.arange(n) % num_groups).astype(np.int64)


def _check(num_users: int, num_groups: int, num_events: int) -> None:
    if num_users < 0:
        raise ValueError(f"num_users must be >= 0, got {num_users}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if num_events < 1:
        raise ValueError(f"num_events must be >= 1, got {num_events}")


def _generate_ids(stream: int, num_users: int, events_per_user, num_groups: int, num_events: int,
                  seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    _check(num_users, num_groups, num_events)
    world = _make_world(seed, num_groups, num_events)
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    groups = _groups(num_users, num_groups, rng)
    lengths = _lengths(events_per_user, num_users, rng)
    return _simulate(world, groups, lengths, rng), groups


def generate(num_users: int = 2000, events_per_user: Union[int, Sequence[int]] = (1000, 3000),
             num_groups: int = 8, num_events: int = 48, seed: int = 0) -> tuple[list[list[str]], np.ndarray]:
    """Simulate users. Returns (sequences: one list of event names per user, groups: int64 [U]).

    `events_per_user` is a fixed length or an inclusive (lo, hi) range drawn per user. The same
    arguments always give the same output; these are the training users of
    `write_default_dataset` with the same seed.
    """
    ids, groups = _generate_ids(_TRAIN, num_users, events_per_user, num_groups, num_events, seed)
    names = event_names(num_events)
    return [[names[e] for e in seq.tolist()] for seq in ids], groups


@dataclass
class SyntheticDataset:
    train: Path     # train.txt: one user per line, events separated by spaces
    eval: Path      # eval.tsv: user_id, history, context, label
    meta: Path      # meta.json: the parameters and the event types
    generated: bool  # False when existing files with the same parameters were kept


def write_default_dataset(out_dir: PathLike, *, num_users: int = 2000,
                          events_per_user: Union[int, Sequence[int]] = (1000, 3000),
                          num_eval_users: int = 200, history_len: int = 4000, context_len: int = 4000,
                          num_groups: int = 8, num_events: int = 48, seed: int = 0,
                          force: bool = False) -> SyntheticDataset:
    """Write `train.txt`, `eval.tsv` and `meta.json` to `out_dir`.

    Eval users are simulated separately from the training users (same world and groups, other
    people); each has `history_len` events of history followed by `context_len` later events as
    context (disjoint, in time order), and its group id as label. Idempotent: when meta.json
    records the same parameters and both data files have the sizes it records, nothing is
    written (unless `force`). Files are written atomically, meta.json last.
    """
    if history_len < 1 or context_len < 1:
        raise ValueError(f"history_len and context_len must be >= 1, got {history_len}, {context_len}")
    if num_eval_users < 1:
        raise ValueError(f"num_eval_users must be >= 1, got {num_eval_users}")
    if not isinstance(events_per_user, (int, np.integer)):
        events_per_user = [int(x) for x in events_per_user]
    params = {"num_users": num_users, "events_per_user": events_per_user, "num_eval_users": num_eval_users,
              "history_len": history_len, "context_len": context_len, "num_groups": num_groups,
              "num_events": num_events, "seed": seed}
    out = Path(out_dir)
    paths = SyntheticDataset(out / "train.txt", out / "eval.tsv", out / "meta.json", True)
    if not force and _up_to_date(paths, params):
        paths.generated = False
        return paths
    out.mkdir(parents=True, exist_ok=True)

    names = np.array(event_names(num_events), dtype=object)
    train, train_groups = _generate_ids(_TRAIN, num_users, events_per_user, num_groups, num_events, seed)
    atomic_write_bytes(paths.train, "".join(" ".join(names[s]) + "\n" for s in train).encode())

    evals, eval_groups = _generate_ids(_EVAL, num_eval_users, history_len + context_len,
                                       num_groups, num_events, seed)
    width = len(str(num_eval_users - 1))
    rows = ["user_id\thistory\tcontext\tlabel\n"]
    for i, (s, g) in enumerate(zip(evals, eval_groups)):
        rows.append(f"eval{i:0{width}d}\t{' '.join(names[s[:history_len]])}\t"
                    f"{' '.join(names[s[history_len:]])}\t{int(g)}\n")
    atomic_write_bytes(paths.eval, "".join(rows).encode())

    meta = {"format": _META_FORMAT, "version": _META_VERSION, "params": params,
            "event_types": names.tolist(), "num_train_events": int(sum(len(s) for s in train)),
            "train_group_counts": np.bincount(train_groups, minlength=num_groups).tolist(),
            "sizes": {"train.txt": paths.train.stat().st_size, "eval.tsv": paths.eval.stat().st_size},
            "model": {"session_len": SESSION_LEN, "group_weight": GROUP_WEIGHT,
                      "session_drift": SESSION_DRIFT, "repeat_prob": REPEAT_PROB,
                      "related_prob": RELATED_PROB}}
    atomic_write_bytes(paths.meta, json.dumps(meta, indent=1).encode())
    return paths


def _up_to_date(paths: SyntheticDataset, params: dict) -> bool:
    try:
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
        return (meta.get("format") == _META_FORMAT and meta.get("version") == _META_VERSION
                and meta.get("params") == params
                and meta["sizes"]["train.txt"] == paths.train.stat().st_size
                and meta["sizes"]["eval.tsv"] == paths.eval.stat().st_size)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m use.synthetic",
                                description="Write the synthetic default data set (train.txt, eval.tsv, meta.json).")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--num-users", type=int, default=2000, help="training users, one line each in train.txt")
    p.add_argument("--min-events", type=int, default=1000, help="fewest events of a training user")
    p.add_argument("--max-events", type=int, default=3000, help="most events of a training user")
    p.add_argument("--num-eval-users", type=int, default=200, help="eval users (distinct from training users)")
    p.add_argument("--history-len", type=int, default=4000, help="events in each eval user's history")
    p.add_argument("--context-len", type=int, default=4000, help="later events in each eval user's context")
    p.add_argument("--num-groups", type=int, default=8, help="latent user groups (the eval label)")
    p.add_argument("--num-events", type=int, default=48, help="event types E")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data")
    p.add_argument("--force", action="store_true", help="rewrite even if the files are up to date")
    a = p.parse_args(argv)
    ds = write_default_dataset(a.out, num_users=a.num_users, events_per_user=(a.min_events, a.max_events),
                               num_eval_users=a.num_eval_users, history_len=a.history_len,
                               context_len=a.context_len, num_groups=a.num_groups, num_events=a.num_events,
                               seed=a.seed, force=a.force)
    state = "wrote" if ds.generated else "up to date:"
    print(f"{state} {ds.train}, {ds.eval}, {ds.meta}")


if __name__ == "__main__":
    main()
