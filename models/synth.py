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
  re-consuming an item of the same session. What it draws depends on the current cluster only, which
  the recent events show: the far history adds nothing to it.
- A user also has `favourites`: items drawn uniformly from the whole catalogue, so that neither
  popularity nor the interest clusters point to them. With probability `long_range` a session is
  instead a *return* (mean length `return_len`): the user goes back to favourites not consumed in the
  last `window` events. The first returns introduce the favourites early in the history; every later
  return re-consumes one first seen far back. Which item comes next is then known only from the far
  history: a model that sums over the whole history sees which items keep coming back (a bag-of-items
  pattern one attention layer learns), while a model or a compressed state that keeps only the last
  `window` events cannot tell a favourite from any other item of the catalogue.

So `long_range` in [0, 1] is the share of sessions whose content lives only in the far history:
`long_range=0` gives data where the last 50 events suffice, `long_range=0.5` data where a policy that
drops old events must lose accuracy. `long_range_share` measures this without a model (about 0.31 at
0.9 and 0.11 at 0 for mean length 300: at 0 what remains are Zipf draws of items last seen long ago,
which popularity within the current cluster predicts as well as the far history does).

History lengths are lognormal (heavy-tailed) with mean `mean_len`, clipped to [min_len, max_len].
Scale: generation is a Python loop over events at about 300,000 events a second; 1,000 users of mean
length 1,000 take about 3 s, and the total is capped at `max_events` (lengths are scaled down to fit).
The presets (300 users, 1,500 items, mean length about 1,030: about 300,000 events, histories up to
10,000) are the long-history setting the benchmarks need; trained on whole-history windows they take
minutes on a GPU and about 10 minutes an epoch on 2 CPU cores. Overrides such as
`synth-long:users=200,mean_len=300` give smaller sets for demos and tests.
"""

from __future__ import annotations

import bisect
import inspect

import numpy as np
from kvrec.models.data import DataError, Dataset, build_dataset

PRESETS: dict[str, dict] = {
    "synth-long": dict(users=300, items=1500, mean_len=1050, long_range=0.8, seed=0),
    "synth-short": dict(users=300, items=1500, mean_len=1050, long_range=0.0, seed=0),
}

_MINUTE, _HOUR, _DAY = 60, 3600, 86400
_START = 1_600_000_000  # unix seconds of the earliest possible first event


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
    favourites: int = 16,
    return_len: float = 1.5,
    max_events: int = 5_000_000,
    name: str = "synth",
) -> Dataset:
    """A deterministic (by `seed`) synthetic dataset; see the module docstring for the process.

    window:     recency horizon: returns go to favourites not seen within the last `window` events, and
                ordinary sessions are at most window // 2 long
    favourites: items per user that return sessions go back to; more favourites than a window's worth
                of returns, so that some are always far-history only
    return_len: mean length of a return session (geometric, at most the favourites not seen recently)
    repeat:     chance that an ordinary event re-consumes an item of its own session
    drift:      chance, per ordinary session, that one interest cluster is replaced by a new one
    """
    # DataError: the parameters come from a user (a synth spec, `kvrec data synth`), so a bad one is theirs
    if not 0.0 <= long_range <= 1.0:
        raise DataError(f"long_range must be in [0, 1], got {long_range}")
    if items < cluster_size or users < 1:
        raise DataError(f"need users >= 1 and items >= cluster_size ({cluster_size}), got {users}, {items}")
    if not (mean_len > 0 and min_len <= max_len):
        raise DataError(f"need mean_len > 0 and max_len >= min_len ({min_len}), got {mean_len}, {max_len}")
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, users, mean_len, len_sigma, min_len, max_len, max_events)  # [users]
    n_clusters = items // cluster_size
    cluster_pop = _zipf(n_clusters, zipf)  # [C] probability of each cluster being an interest
    rank_cdf = np.cumsum(_zipf(cluster_size, zipf)).tolist()  # [S] within-cluster Zipf by rank
    p = dict(
        long_range=long_range, interests=min(interests, n_clusters), session_len=session_len,
        repeat=repeat, drift=drift, window=window, cluster_size=cluster_size,
        favourites=min(favourites, items), return_len=return_len,
    )
    seq_items, seq_ts = [], []
    for u, n in enumerate(lengths.tolist()):
        urng = np.random.default_rng([seed, u])
        it, starts = _user_items(urng, n, items, cluster_pop, rank_cdf, **p)
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
    rng, n, items, cluster_pop, rank_cdf, *, long_range, interests, session_len, repeat, drift, window,
    cluster_size, favourites, return_len,
) -> tuple[np.ndarray, list[int]]:
    """[n] item ids of one user's history and the start position of each session."""
    n_clusters = len(cluster_pop)
    interest = rng.choice(n_clusters, size=interests, replace=False, p=cluster_pop).tolist()
    weights = np.cumsum(rng.dirichlet(np.ones(interests))).tolist()
    favs = rng.choice(items, size=favourites, replace=False).tolist()  # uniform over the catalogue
    sess_lens = np.minimum(rng.geometric(1.0 / session_len, size=n), max(1, window // 2)).tolist()
    ret_lens = rng.geometric(1.0 / return_len, size=n).tolist()
    u_sess = rng.random((n, 3)).tolist()  # per session: return?, cluster, drift?
    u_event = rng.random((n, 3)).tolist()  # per event: repeat?, which repeat, Zipf rank
    out: list[int] = []
    last_seen: dict[int, int] = {}
    starts: list[int] = []  # start position of every session
    t = 0
    while t < n:
        r_return, r_cluster, r_drift = u_sess[len(starts)]
        session: list[int] = []
        if r_return < long_range:  # the favourites not seen in the last `window` events, longest-unseen first
            far = [f for f in favs if t - last_seen.get(f, -window - 1) > window]
            far.sort(key=lambda f: last_seen.get(f, -1))
            session = far[: ret_lens[len(starts)]]
        if not session:
            if r_drift < drift:
                interest[int(rng.integers(interests))] = int(rng.choice(n_clusters, p=cluster_pop))
            base = interest[bisect.bisect_right(weights, r_cluster * weights[-1])] * cluster_size
            for pos in range(t, min(n, t + sess_lens[len(starts)])):
                r_rep, r_which, r_rank = u_event[pos]
                if session and r_rep < repeat:
                    session.append(session[int(r_which * len(session))])
                else:
                    session.append(base + bisect.bisect_right(rank_cdf, r_rank * rank_cdf[-1]))
        session = session[: n - t]
        for pos, item in enumerate(session, start=t):
            last_seen[item] = pos
        starts.append(t)
        out.extend(session)
        t += len(session)
    return np.array(out, dtype=np.int64), starts


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
        raise DataError(f"unknown synth preset {preset!r}; known: {', '.join(PRESETS)}")
    params = {**PRESETS[preset], "name": preset}
    defaults = {k: v.default for k, v in inspect.signature(generate).parameters.items()}
    for item in filter(None, overrides.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in defaults or key == "name":
            raise DataError(f"bad synth override {item!r}; use key=value with keys {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            params[key] = int(float(value)) if kind is int else kind(value)
        except ValueError:
            raise DataError(f"bad synth override {item!r}: {key} must be {kind.__name__}") from None
    return generate(**params)
