"""SnapKV votes with its whole observation window and pools the votes; PyramidKV shrinks budgets with
depth at the same total; AdaKV shares one budget across heads by score."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import PolicyContext, PolicyError, encode_state, parse_policy
from kvrec.compression.policies.pruning import pyramid_budgets
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import AttentionStats, LayerState, State

H, D = 2, 4


def make_state(t: int, layers: int = 1) -> State:
    g = torch.Generator().manual_seed(0)
    parts = [LayerState({"k": torch.randn(H, t, D, generator=g), "v": torch.randn(H, t, D, generator=g)},
                        torch.arange(t), torch.arange(t), torch.ones(t)) for _ in range(layers)]
    return State("kv", parts, events_consumed=t)


def stats(window: torch.Tensor, layers: int = 1) -> AttentionStats:
    """window [H, w, T] for every layer; `received` points elsewhere (all on token 0), so a policy that
    reads it instead of the window is caught."""
    received = torch.zeros(window.shape[0], window.shape[-1])
    received[:, 0] = 100.0
    return AttentionStats([received] * layers, [window] * layers)


def kept(state: State, layer: int = 0) -> list[int]:
    return state.pos[layer].tolist()


def test_snapkv_pooling_keeps_a_cluster_over_an_isolated_spike():
    votes = torch.zeros(H, 4, 40)
    votes[:, :, 5] = 1.0 / 4  # one token voted 1.0 in all
    votes[:, :, [20, 21, 22]] = 0.6 / 4  # three neighbours voted 0.6 each
    out = parse_policy("snapkv:budget=7,window=4,kernel=3").compress(make_state(40), stats(votes))
    assert kept(out) == [20, 21, 22, 36, 37, 38, 39]


def test_snapkv_counts_every_query_of_its_window_and_only_those():
    votes = torch.zeros(H, 6, 30)
    votes[:, 0, 8] = 5.0  # the oldest reported query is outside the window of 4: no vote
    votes[:, 2, 12] = 1.0  # the first query of the window
    votes[:, 5, 15] = 0.9  # the last one
    out = parse_policy("snapkv:budget=6,window=4,kernel=1").compress(make_state(30), stats(votes))
    assert kept(out) == [12, 15, 26, 27, 28, 29]


def test_snapkv_window_is_at_most_what_the_model_reports():
    model = build_model(ModelConfig(num_items=10, dim=16, heads=2, d_k=8, d_v=8, obs_window=8))
    parse_policy("snapkv:window=8", PolicyContext(model=model))
    with pytest.raises(PolicyError, match="obs_window"):
        parse_policy("snapkv:window=9", PolicyContext(model=model))


def test_pyramid_budgets_shrink_with_depth_at_the_same_total():
    budgets = pyramid_budgets(10, 4, 2.0)  # top 10 / 2, bottom 2 x 10 - 5, evenly spaced between
    assert budgets[-1] == 5 and budgets[0] in (15, 16) and sum(budgets) == 40
    assert all(a > b for a, b in zip(budgets, budgets[1:]))
    assert pyramid_budgets(10, 1, 2.0) == [10]
    assert sum(pyramid_budgets(3, 5, 20.0)) == 15 and min(pyramid_budgets(3, 5, 20.0)) >= 1


def test_pyramid_is_snapkv_at_each_layers_budget():
    layers, t = 4, 30
    votes = torch.rand(H, 4, t, generator=torch.Generator().manual_seed(1))
    pipeline = parse_policy("pyramid:budget=10,beta=2,window=2,kernel=3")
    out = pipeline.compress(make_state(t, layers), stats(votes, layers))
    budgets = pyramid_budgets(10, layers, 2.0)
    assert [out.tokens(layer) for layer in range(layers)] == budgets
    for layer, budget in enumerate(budgets):
        alone = parse_policy(f"snapkv:budget={budget},window=2,kernel=3").compress(make_state(t), stats(votes))
        assert kept(out, layer) == kept(alone)


def test_pyramid_byte_budget_shrinks_with_depth_and_fits():
    layers, t, limit = 4, 60, 6000
    pipeline = parse_policy(f"pyramid:bytes={limit},beta=4,window=2")
    state = make_state(t, layers)
    state.last_hidden = torch.zeros(8)
    out = pipeline.compress(state, stats(torch.rand(H, 4, t), layers))
    assert len(encode_state(out, pipeline, "m")) <= limit
    counts = [out.tokens(layer) for layer in range(layers)]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    uniform = parse_policy(f"snapkv:bytes={limit},window=2").compress(state, stats(torch.rand(H, 4, t), layers))
    assert abs(sum(counts) - uniform.tokens_kept()) < layers  # the same total as an even split


def ada_votes(t: int = 20) -> torch.Tensor:
    """Head 0 concentrates on tokens 3 and 8; head 1 spreads over 11-14, which head 0 also touches."""
    votes = torch.zeros(H, 1, t)
    votes[0, 0, [3, 8]] = torch.tensor([0.46, 0.45])
    votes[1, 0, [11, 12, 13, 14]] = torch.tensor([0.31, 0.30, 0.29, 0.28])
    votes[0, 0, [11, 12, 13, 14]] = 0.2  # summed over heads, 11-14 beat 3 and 8
    return votes


def test_ada_allocates_one_budget_across_heads_by_score():
    out = parse_policy("ada:budget=4,window=2,kernel=1,floor=0").compress(make_state(20), stats(ada_votes()))
    assert kept(out) == [3, 8, 18, 19]
    snap = parse_policy("snapkv:budget=4,window=2,kernel=1").compress(make_state(20), stats(ada_votes()))
    assert kept(snap) == [11, 12, 18, 19]


def test_ada_safeguard_gives_every_head_its_top_tokens():
    out = parse_policy("ada:budget=4,window=2,kernel=1,floor=1").compress(make_state(20), stats(ada_votes()))
    assert kept(out) == [3, 11, 18, 19]  # each head's best first, then by score: nothing left
    out = parse_policy("ada:budget=6,window=2,kernel=1,floor=0.5").compress(make_state(20), stats(ada_votes()))
    assert kept(out) == [3, 8, 11, 12, 18, 19]  # 1 guaranteed each (3, 11), then 8 (0.45), 12 (0.30)
