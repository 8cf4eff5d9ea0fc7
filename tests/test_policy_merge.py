"""D2O-style merging: an evicted token joins the survivor whose key it resembles, if it resembles one
enough; the rest are dropped."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvrec.compression import parse_policy
from kvrec.models.state import LayerState, State

H, D = 2, 8


def make_state(t: int, layers: int = 2) -> State:
    g = torch.Generator().manual_seed(0)
    parts = [LayerState({"k": torch.randn(H, t, D, generator=g), "v": torch.randn(H, t, D, generator=g)},
                        torch.arange(t), torch.arange(t) * 10, torch.ones(t)) for _ in range(layers)]
    return State("kv", parts, events_consumed=t)


def with_attention(state: State, acc: torch.Tensor) -> State:
    state.extras["acc"] = [acc.expand(H, -1) / H for _ in state.layers]
    return state


def cosines(state: State, layer: int, i: int, others: list[int]) -> torch.Tensor:
    keys = F.normalize(state.k[layer].transpose(0, 1).reshape(state.tokens(layer), -1), dim=-1)
    return keys[others] @ keys[i]


def test_merge_folds_each_evicted_token_into_its_own_twin_and_drops_the_unlike():
    state = make_state(10)
    acc = torch.zeros(10)
    acc[[3, 7]] = 5.0  # heavy hitters: survivors 3 and 7, with the recent 8 and 9
    for layer in range(2):
        for twin, of in ((2, 7), (5, 3)):  # token 2 is a copy of survivor 7, token 5 of survivor 3
            for name in ("k", "v"):
                getattr(state, name)[layer][:, twin] = getattr(state, name)[layer][:, of] * (1.5 if name == "v" else 1)
    for i in (0, 1, 4, 6):  # the rest resemble no survivor
        assert cosines(state, 0, i, [3, 7, 8, 9]).max() < 0.9
    v7 = state.v[0][:, 7].clone()
    out = parse_policy("merge:budget=4,recent=2,threshold=0.9").compress(with_attention(state, acc), None)
    assert out.pos[0].tolist() == [3, 7, 8, 9]
    assert out.weight[0].tolist() == [2.0, 2.0, 1.0, 1.0]  # 0, 1, 4, 6 dropped, not folded in
    torch.testing.assert_close(out.v[0][:, 1], v7 * 1.25)  # the mean of 7's value and its twin's
    torch.testing.assert_close(out.extras["acc"][0].sum(0)[:2], torch.tensor([5.0, 5.0]))


def test_merge_without_a_threshold_keeps_every_events_weight_and_value():
    state = make_state(40)
    total_v = [(v * w[None, :, None]).sum(1) for v, w in zip(state.v, state.weight)]
    out = parse_policy("merge:budget=8,recent=4,threshold=-1").compress(with_attention(state, torch.rand(40)), None)
    for layer in range(2):
        assert out.tokens(layer) == 8 and float(out.weight[layer].sum()) == 40.0
        torch.testing.assert_close((out.v[layer] * out.weight[layer][None, :, None]).sum(1), total_v[layer])


def test_merge_goes_to_the_most_similar_survivor():
    state = make_state(12, layers=1)
    acc = torch.zeros(12)
    acc[[1, 4, 6]] = 3.0
    out = parse_policy("merge:budget=5,recent=2,threshold=-1").compress(with_attention(state, acc), None)
    survivors = [1, 4, 6, 10, 11]
    assert out.pos[0].tolist() == survivors
    expected = torch.ones(5)
    for i in set(range(12)) - set(survivors):
        expected[int(cosines(state, 0, i, survivors).argmax())] += 1
    assert out.weight[0].tolist() == expected.tolist()


def test_merge_survivors_are_heavy_hitters_per_query():
    """The same score as h2o's: token 6 drew 1.0 from the 4 queries that saw it, token 1 drew 2.0 from
    9; per query, 6 is the heavier hitter."""
    state = make_state(10, layers=1)
    acc = torch.zeros(10)
    acc[1], acc[6] = 2.0, 1.0
    out = parse_policy("merge:budget=3,recent=2,threshold=1").compress(with_attention(state, acc), None)
    assert out.pos[0].tolist() == [6, 8, 9]
