"""H2O keeps heavy hitters, not the oldest tokens; TOVA keeps what the current query looks at."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvrec.compression import parse_policy
from kvrec.models.state import AttentionStats, LayerState, State

H, D = 2, 4


def grow(state: State, n: int) -> State:
    """The state with n new tokens appended (random K/V), extras padded with zeros, as `extend` does."""
    part, start = state.layers[0], state.events_consumed
    new_pos = torch.arange(start, start + n)
    part = LayerState({name: torch.cat([x, torch.randn(H, n, D)], 1) for name, x in part.tokens.items()},
                      torch.cat([part.pos, new_pos]), torch.cat([part.ts, new_pos]),
                      torch.cat([part.weight, torch.ones(n)]))
    extras = {name: [F.pad(t, (0, n)) for t in per_layer] for name, per_layer in state.extras.items()}
    return State("kv", [part], None, start + n, extras)


def softmax_stats(state: State, n: int, like: torch.Tensor) -> AttentionStats:
    """Statistics of the last n queries of a softmax model whose attention to a visible token is
    proportional to like[T] (renormalised over the tokens each query can see)."""
    pos = state.pos[0]
    sees = pos[None, :] <= torch.arange(state.events_consumed - n, state.events_consumed)[:, None]  # [n, T]
    w = like[None] * sees
    w = w / w.sum(1, keepdim=True)  # [n, T]
    return AttentionStats([w.sum(0).expand(H, -1)], [w.expand(H, -1, -1)])


def replay(spec: str, heavy: list[int], events: int = 400, per_request: int = 10, strength: float = 3.0) -> list[int]:
    """Positions a token policy keeps after `events` events in requests of `per_request`, when every
    query gives the tokens at `heavy` `strength` times the attention of any other token."""
    torch.manual_seed(0)
    pipeline = parse_policy(spec)
    state = State("kv", [LayerState({"k": torch.zeros(H, 0, D), "v": torch.zeros(H, 0, D)})])
    for _ in range(events // per_request):
        state = grow(state, per_request)
        like = 1 + (strength - 1) * torch.isin(state.pos[0], torch.tensor(heavy)).float()
        state = pipeline.compress(state, softmax_stats(state, per_request, like))
    return state.pos[0].tolist()


def test_h2o_keeps_heavy_hitters_whenever_they_arrived():
    """A raw sum of attention keeps the oldest 48 tokens here (each has been seen by hundreds more
    queries than a late heavy hitter); per query, the heavy hitters win."""
    heavy = [30, 170, 290, 350]
    kept = replay("h2o:budget=64,recent=16", heavy)
    assert len(kept) == 64 and kept[-16:] == list(range(384, 400))
    assert set(heavy) <= set(kept)
    assert kept[:48] != list(range(48))


def test_h2o_splits_a_bare_budget_between_recent_tokens_and_heavy_hitters():
    """Without `recent`, half the budget is recent and half heavy hitters (H2O's equal split): a fixed
    default of 64 recent tokens made every budget up to 64 a sliding window that keeps no heavy hitter."""
    heavy = [30, 170, 290, 350]
    kept = replay("h2o:budget=32", heavy)
    assert len(kept) == 32 and kept[-16:] == list(range(384, 400))
    assert set(heavy) <= set(kept)
    merged = replay("merge:budget=32", heavy)  # merge's survivors are chosen the same way
    assert len(merged) == 32 and merged[-16:] == list(range(384, 400))


def test_h2o_divides_accumulated_attention_by_the_queries_that_saw_each_token():
    state = grow(State("kv", [LayerState({"k": torch.zeros(H, 0, D), "v": torch.zeros(H, 0, D)})]), 10)
    acc = torch.zeros(10)
    acc[1] = 2.0  # seen by the 9 queries at positions 1..9: 0.22 per query
    acc[6] = 1.0  # seen by 4 queries: 0.25 per query
    acc[3] = 1.9  # seen by 7, but stands for 2 merged events: 0.14 per query and event
    state.layers[0].weight[3] = 2.0
    state.extras["acc"] = [acc.expand(H, -1) / H]
    out = parse_policy("h2o:budget=4,recent=2").compress(state, None)
    assert out.pos[0].tolist() == [1, 6, 8, 9]
    out = parse_policy("h2o:budget=3,recent=2").compress(out, None)
    assert out.pos[0].tolist() == [6, 8, 9]


def test_h2o_scores_accumulate_across_requests():
    """What a token received in earlier requests counts: a token attended in the first request only
    outlives one that was never attended."""
    state = grow(State("kv", [LayerState({"k": torch.zeros(H, 0, D), "v": torch.zeros(H, 0, D)})]), 10)
    like = torch.ones(10)
    like[2] = 50.0
    pipeline = parse_policy("h2o:budget=6,recent=2")
    state = pipeline.compress(state, softmax_stats(state, 10, like))
    assert 2 in state.pos[0].tolist()
    for _ in range(3):  # later requests attend uniformly: token 2 keeps its lead from the first
        state = grow(state, 4)
        state = pipeline.compress(state, softmax_stats(state, 4, torch.ones(state.tokens())))
        assert 2 in state.pos[0].tolist()


def window_stats(window: torch.Tensor) -> AttentionStats:
    """window [H, w, T]; received is deliberately unlike it (all attention on token 0)."""
    received = torch.zeros(window.shape[0], window.shape[-1])
    received[:, 0] = 100.0
    return AttentionStats([received], [window])


def test_tova_keeps_what_the_last_query_attends_to_averaged_over_heads():
    t = 12
    window = torch.zeros(H, 3, t)
    window[:, :2, [3, 4, 5]] = 10.0  # earlier queries of the window look elsewhere
    window[0, -1, 7] = 0.9  # one head only: 0.45 on average
    window[:, -1, 2] = 0.5  # both heads: 0.5 on average
    window[:, -1, 9] = 0.6
    state = grow(State("kv", [LayerState({"k": torch.zeros(H, 0, D), "v": torch.zeros(H, 0, D)})]), t)
    out = parse_policy("tova:budget=2").compress(state, window_stats(window))
    assert out.pos[0].tolist() == [2, 9]  # not the newest tokens: TOVA keeps no recent window
    out = parse_policy("tova:budget=3").compress(state, window_stats(window))
    assert out.pos[0].tolist() == [2, 7, 9]


def test_tova_keeps_the_most_recent_without_a_query():
    state = grow(State("kv", [LayerState({"k": torch.zeros(H, 0, D), "v": torch.zeros(H, 0, D)})]), 8)
    empty = AttentionStats([torch.zeros(H, 8)], [torch.zeros(H, 0, 8)])
    assert parse_policy("tova:budget=3").compress(state, empty).pos[0].tolist() == [5, 6, 7]
