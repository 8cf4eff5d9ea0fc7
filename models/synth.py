"""Synthetic interaction data with a controlled amount of long-range signal.

Real public datasets have short histories; this generator makes thousands-long ones whose structure
decides whether forgetting old events costs accuracy. The process, per user:

- Items fall into clusters of equal size; within a cluster popularity is Zipf, and clusters themselves
  are Zipf-popular across users, so the catalogue is skewed the way real ones are.
- A user has a few interest clusters (Dirichlet weights) that drift slowly: now and then one interest is
  swapped for a new cluster.
- Events come in sessions (geometric length, shorter than the recency window) separated by long time
  gaps; within a session gaps are minutes.
- An ordinary session stays in one interest cluster and draws Zipf-popular items from it, sometimes
  re-consuming an item of the same session. It never draws an item last seen more than `window` events
  ago: everything it does is predictable from the recent events alone.
- With probability `long_range` a session is instead a *recall*: the user replays, in order, the
  distinct items of one of their own ordinary sessions that ended `recall_gap` to `recall_horizon`
  (100 to 200) events ago,
  skipping those seen in the last `window` events. Which items follow is then known only from the far
  history: a model finds the earlier occurrence of the current item and copies what came after it (an
  induction pattern that attention with relative positions learns), while a model or a compressed
  state that keeps only the last `window` events cannot.

So `long_range` in [0, 1] is the share of sessions whose content lives only in the far history
(recalls need an old enough session, so the first ~100 events of a user are always ordinary):
`long_range=0` gives data where the last 50 events suffice, `long_range=0.8` data where a policy that
drops old events must lose accuracy. `long_range_share` measures this without a model (about 0.25 at
0.9 and exactly 0 at 0 for mean length 300). One faint far-history cue remains at `long_range=0`: the
items an ordinary session may not draw (seen, but not recently) are known only from the full history.

History lengths are lognormal (heavy-tailed) with mean `mean_len`, clipped to [min_len, max_len].
Scale: generation is a Python loop over events at about 300,000 events a second; 1,000 users of mean
length 1,000 take about 3 s, and the total is capped at `max_events` (lengths are scaled down to fit).
The presets (300 users, 1,500 items, mean length about 1,030: about 300,000 events, histories up to
10,000) are the long-history setting the benchmarks need and still train on a CPU in minutes; overrides
such as `synth-long:users=200,mean_len=300` give smaller sets for demos and tests.
"""

from __future__ import annotations

import bisect
import inspect

import numpy as np

from models.data import Dataset, build_dataset

PRESETS: dict[str, dict] = {
    "synth-long": dict(users=300, items=1500, mean_len=1050, long_range=0.8, seed=0),
    "synth-short": dict(users=300, items=1500, mean_len=1050, long_range=0.0, seed=0),
}

_MINUTE, _HOUR, _DAY = 60, 3600, 86400
_START = 1_600_000_000  # unix seconds of the earliest possible first event
_TRIES = 4  # Zipf draws an ordinary event gets before it falls back to a recent item


def generate(
    *,
    users: int = 500,
    items: int = 1500,
    mean_len: float = 400,
    max_len: int = 10_000,
    long_range: float = 0.8,
    seed: int = 0,
    cluster_size: int = 25,
    interests: int = 3,
    session_len: float = 8.0,
    repeat: float = 0.2,
    drift: float = 0.1,
    zipf: float = 1.0,
    len_sigma: float = 1.0,
    min_len: int = 5,
    window: int = 50,
    recall_gap: int = 100,
    recall_horizon: int = 200,
    max_events: int = 5_000_000,
    name: str = "synth",
) -> Dataset:
    """A deterministic (by `seed`) synthetic dataset; see the module docstring for the process.

    window:     recency horizon: ordinary sessions only use items seen within the last `window` events
                (or new ones), and sessions are at most window // 2 long
    recall_gap: a recalled session ended at least this many events before the recall starts
    recall_horizon: ... and at most this many: far beyond the recency window, yet within the training
                window of a model (200-300 events), so that the copy from the far past is learnable
    repeat:     chance that an ordinary event re-consumes an item of its own session
    drift:      chance, per ordinary session, that one interest cluster is replaced by a new one
    """
    if not 0.0 <= long_range <= 1.0:
        raise ValueError(f"long_range must be in [0, 1], got {long_range}")
    if items < cluster_size or users < 1:
        raise ValueError(f"need users >= 1 and items >= cluster_size ({cluster_size}), got {users}, {items}")
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, users, mean_len, len_sigma, min_len, max_len, max_events)  # [users]
    n_clusters = items // cluster_size
    cluster_pop = _zipf(n_clusters, zipf)  # [C] probability of each cluster being an interest
    rank_cdf = np.cumsum(_zipf(cluster_size, zipf)).tolist()  # [S] within-cluster Zipf by rank
    p = dict(
        long_range=long_range, interests=min(interests, n_clusters), session_len=session_len,
        repeat=repeat, drift=drift, window=window, recall_gap=recall_gap, recall_horizon=recall_horizon,
        cluster_size=cluster_size,
    )
    seq_items, seq_ts = [], []
    for u, n in enumerate(lengths.tolist()):
        urng = np.random.default_rng([seed, u])
        it, starts = _user_items(urng, n, cluster_pop, rank_cdf, **p)
        seq_items.append(it)
        seq_ts.append(_timestamps(urng, n, starts))
    user_col = np.repeat(np.arange(users), lengths)
    return build_dataset(
        name, user_col, np.concatenate(seq_items), np.concatenate(seq_ts), None, source=name
    )


def _lengths(rng, users, mean_len, sigma, min_len, max_len, max_events) -> np.ndarray:
    """[users] int64 lognormal lengths with mean about `mean_len`, summing to at most `max_events`."""
    raw = rng.lognormal(np.log(mean_len) - sigma**2 / 2, sigma, size=users)
    raw *= min(1.0, max_events / raw.sum())
    return np.clip(np.rint(raw), min_len, max_len).astype(np.int64)


def _zipf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


def _user_items(
    rng, n, cluster_pop, rank_cdf, *, long_range, interests, session_len, repeat, drift, window,
    recall_gap, recall_horizon, cluster_size,
) -> tuple[np.ndarray, list[int]]:
    """[n] item ids of one user's history and the start position of each session."""
    n_clusters = len(cluster_pop)
    interest = rng.choice(n_clusters, size=interests, replace=False, p=cluster_pop).tolist()
    weights = np.cumsum(rng.dirichlet(np.ones(interests))).tolist()
    sess_lens = np.minimum(rng.geometric(1.0 / session_len, size=n), max(1, window // 2)).tolist()
    u_sess = rng.random((n, 3 + _TRIES)).tolist()  # per session: recall?, cluster, drift?, recall picks
    u_event = rng.random((n, 2 + _TRIES)).tolist()  # per event: repeat?, which repeat, Zipf draws
    out: list[int] = []
    last_seen: dict[int, int] = {}
    starts: list[int] = []  # start position of every session
    sources: tuple[list[int], list[int]] = ([], [])  # starts, ends of ordinary sessions (recall sources)
    t = 0
    while t < n:
        r_recall, r_cluster, r_drift, *picks = u_sess[len(starts)]
        session = None
        if r_recall < long_range:
            session = _recall(out, sources, last_seen, t, picks, window, recall_gap, recall_horizon)
        if session is None:
            if r_drift < drift:
                interest[int(rng.integers(interests))] = int(rng.choice(n_clusters, p=cluster_pop))
            base = interest[bisect.bisect_right(weights, r_cluster * weights[-1])] * cluster_size
            session = []
            for pos in range(t, min(n, t + sess_lens[len(starts)])):
                r_rep, r_which, *draws = u_event[pos]
                item = -1
                if session and r_rep < repeat:
                    item = session[int(r_which * len(session))]
                for d in draws:
                    if item >= 0:
                        break
                    cand = base + bisect.bisect_right(rank_cdf, d * rank_cdf[-1])
                    if pos - last_seen.get(cand, pos) <= window:  # new, or seen recently
                        item = cand
                if item < 0:  # every draw was far-history only: stay short-range
                    item = session[-1] if session else out[-1]
                session.append(item)
            sources[0].append(t)
            sources[1].append(t + len(session))
        session = session[: n - t]
        for pos, item in enumerate(session, start=t):
            last_seen[item] = pos
        starts.append(t)
        out.extend(session)
        t += len(session)
    return np.array(out, dtype=np.int64), starts


def _recall(out, sources, last_seen, t, picks, window, recall_gap, recall_horizon) -> list[int] | None:
    """The distinct items of an ordinary session that ended between `recall_gap` and `recall_horizon`
    events before `t`, in their order, less those seen in the last `window` events (what is replayed is
    far-history only); None when no pick leaves any.
    """
    src_starts, src_ends = sources
    first = bisect.bisect_left(src_ends, t - recall_horizon)  # ends increase: sessions do not overlap
    old = bisect.bisect_right(src_ends, t - recall_gap)
    for r in picks if old > first else ():
        k = first + int(r * (old - first))
        far = [i for i in out[src_starts[k] : src_ends[k]] if t - last_seen[i] > window]
        session = list(dict.fromkeys(far))  # first occurrences, in order
        if session:
            return session
    return None


def _timestamps(rng, n: int, starts: list[int]) -> np.ndarray:
    """[n] int64 unix seconds: minutes apart within a session, a day or so between sessions."""
    gaps = 1 + rng.exponential(5 * _MINUTE, size=n)
    gaps[starts] = _HOUR + rng.exponential(_DAY, size=len(starts))
    gaps[0] = rng.uniform(0, 30 * _DAY)
    return _START + np.cumsum(gaps).astype(np.int64)


def long_range_share(ds: Dataset, window: int = 50) -> float:
    """Share of events whose item was seen before in the history but not in the last `window` events.

    The model-free check of the long-range knob: such an event is predictable from the far history only.
    """
    hits = total = 0
    for s in ds.seqs:
        last: dict[int, int] = {}
        for pos, item in enumerate(s.items.tolist()):
            seen = last.get(item)
            hits += seen is not None and pos - seen > window
            last[item] = pos
        total += len(s)
    return hits / max(1, total)


def from_spec(spec: str) -> Dataset:
    """A preset with overrides, `synth-long:users=100,mean_len=50`, named by its preset."""
    preset, _, overrides = spec.partition(":")
    if preset not in PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; known: {', '.join(PRESETS)}")
    params = {**PRESETS[preset], "name": preset}
    defaults = {k: v.default for k, v in inspect.signature(generate).parameters.items()}
    for item in filter(None, overrides.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in defaults or key == "name":
            raise ValueError(f"bad synth override {item!r}; use key=value with keys {', '.join(defaults)}")
        kind = type(defaults[key])
        params[key] = int(float(value)) if kind is int else kind(value)
    return generate(**params)
