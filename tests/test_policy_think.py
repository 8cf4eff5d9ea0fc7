"""ThinK keeps the key channels that the observation window's queries read, chosen afresh at every
compression: hand-made states where key magnitude and query-weighted importance disagree, and the
score checked against ThinK's ||Q_w[:, c] K[:, c]^T||_F on the queries of real tiny models."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import PolicyContext, PolicyError, decode_state, encode_state, parse_policy
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import AttentionStats, Events, LayerState, State

H, D = 2, 8
FP = "fp"
BIG = [0, 1, 2, 3]  # channels whose keys are ten times larger than the others


def layer(t: int, seed: int) -> LayerState:
    """Random K/V of t consecutive events; channels BIG of every head's keys ten times larger."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, t, D, generator=g)
    k[:, :, BIG] *= 10.0
    return LayerState({"k": k, "v": torch.randn(H, t, D, generator=g)}, torch.arange(t), torch.arange(t),
                      torch.ones(t))


def state_of(t: int, seed: int = 0) -> State:
    return State("kv", [layer(t, seed)], events_consumed=t)


def energy_reading(channels: list[list[int]], rows: int = 1, rest: float = 1e-4) -> torch.Tensor:
    """Query energy [H, rows, D]: head h's window queries read channels[h] (energy 1 per query) and
    barely the others (`rest`)."""
    energy = torch.full((H, rows, D), rest)
    for head, read in enumerate(channels):
        energy[head, :, read] = 1.0
    return energy


def stats(energy: torch.Tensor, t: int) -> AttentionStats:
    """One layer's statistics with the given query energy [H, w, D]; attention all zero."""
    return AttentionStats([torch.zeros(H, t)], [torch.zeros(H, energy.shape[1], t)], 0, [energy])


def stored(pipeline, state: State, st: AttentionStats) -> State:
    """What the service goes on with after compressing `state` (checked to be what its blob decodes to)."""
    out = pipeline.compress(state, st)
    decoded = decode_state(encode_state(out, pipeline, FP), pipeline, FP)
    assert all(torch.equal(a, b) for a, b in zip([*out.k, *out.v], [*decoded.k, *decoded.v]))
    return decoded


def assert_keeps(out: torch.Tensor, original: torch.Tensor, channels: list[int]) -> None:
    """out, original [T, D] keys of one head: `channels` as they were, every other channel zero."""
    others = [c for c in range(D) if c not in channels]
    assert torch.equal(out[:, channels], original[:, channels])
    assert not out[:, others].any(), out[:, others].abs().sum(0)


def test_think_keeps_the_channels_the_window_reads_not_the_largest():
    state = state_of(20)
    read = [[4, 5, 6, 7], [1, 3, 5, 7]]  # head 0 reads only small channels, head 1 two big and two small
    out = stored(parse_policy("think:keep=0.5"), state, stats(energy_reading(read, rows=3), 20))
    for head in range(H):
        assert_keeps(out.k[0][head], state.k[0][head], read[head])
    assert torch.equal(out.v[0], state.v[0])  # values whole


def test_think_scores_with_its_window_only():
    state = state_of(20)
    energy = torch.cat([energy_reading([BIG, BIG], rows=2) * 1e4,  # older reported queries read BIG hard
                        energy_reading([[4, 5, 6, 7]] * H, rows=4)], dim=1)  # [H, 6, D]: the last 4
    windowed = stored(parse_policy("think:keep=0.5,window=4"), state, stats(energy, 20))
    every = stored(parse_policy("think:keep=0.5"), state, stats(energy, 20))  # all 6 reported queries
    for head in range(H):
        assert_keeps(windowed.k[0][head], state.k[0][head], [4, 5, 6, 7])
        assert_keeps(every.k[0][head], state.k[0][head], BIG)


def test_think_choice_follows_each_requests_queries():
    pipeline = parse_policy("think:keep=0.5")
    first, second = [0, 1, 2, 3], [2, 3, 4, 5]
    old = state_of(12)
    after_first = stored(pipeline, old, stats(energy_reading([first] * H, rest=0.0), 12))
    # the next request: the model extends the stored state with six new tokens, whose keys are whole
    new = layer(6, seed=1)
    part = after_first.layers[0]
    extended = State("kv", [LayerState({n: torch.cat([part.tokens[n], new.tokens[n]], dim=1) for n in ("k", "v")},
                                       torch.arange(18), torch.arange(18), torch.ones(18))], events_consumed=18)
    out = stored(pipeline, extended, stats(energy_reading([second] * H, rest=0.0), 18))
    for head in range(H):
        assert_keeps(out.k[0][head, 12:], new.tokens["k"][head], second)
        # the old tokens keep what both requests chose; channels 4 and 5, pruned by the first request,
        # stay zero there (they cannot come back), and 0 and 1 are pruned now
        assert_keeps(out.k[0][head, :12], old.k[0][head], [2, 3])


def events(n: int, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    return Events.of(torch.randint(0, 50, (n,), generator=g), ts=torch.arange(n) * 60 + seed * 100_000)


@pytest.mark.parametrize("kind,kv_heads", [("hstu", 0), ("sasrec", 0), ("hstu", 1), ("sasrec", 1)])
def test_think_keeps_the_top_channels_by_thinks_score(kind, kv_heads, monkeypatch):
    torch.manual_seed(0)
    window = 4
    model = build_model(ModelConfig(kind=kind, num_items=50, dim=16, heads=H, kv_heads=kv_heads, d_k=D, d_v=D,
                                    dropout=0.0, obs_window=window)).eval()
    pipeline = parse_policy("think:keep=0.5", PolicyContext(model=model))
    state, _, _ = model.prefill(events(30, seed=1))
    queries = {}  # layer -> the request's queries [H, n, D], as the block attends with them
    for index, block in enumerate(model.blocks):
        def spy(x, pos, project=block.project, index=index):
            q, cached, ctx = project(x, pos)
            queries[index] = q[0]
            return q, cached, ctx
        monkeypatch.setattr(block, "project", spy)
    state, _, st = model.extend(state, events(10, seed=2))  # ten queries, of which the last four are the window
    out = pipeline.compress(state, st)
    for index in range(len(model.blocks)):
        k = state.k[index]  # [G, T, D]
        heads = k.shape[0]
        group = queries[index][:, -window:].reshape(heads, -1, D)  # [G, r * w, D]: a K/V head's query heads stacked
        torch.testing.assert_close(st.query_energy[index].sum(1), group.square().sum(1))
        score = torch.tensor([[float(torch.linalg.matrix_norm(torch.outer(group[g][:, c], k[g][:, c])))
                               for c in range(D)] for g in range(heads)])  # ThinK's ||Q_w[:, c] K[:, c]^T||_F
        ranked = score.sort(dim=1, descending=True).values
        assert (ranked[:, D // 2 - 1] > ranked[:, D // 2] * (1 + 1e-4)).all()  # no tie at the cut
        for g in range(heads):
            assert_keeps(out.k[index][g], k[g], sorted(score[g].topk(D // 2).indices.tolist()))


@pytest.mark.parametrize("extra", [{"latent_dim": 8}, {"recurrent": "linear"}])
def test_think_refuses_states_without_keys(extra):
    model = build_model(ModelConfig(kind="hstu", num_items=50, dim=16, heads=H, d_k=D, d_v=D, **extra))
    with pytest.raises(PolicyError, match="think needs per-token 'k' tensors"):
        parse_policy("think", PolicyContext(model=model))


def test_think_window_is_at_most_what_the_model_reports():
    model = build_model(ModelConfig(num_items=10, dim=16, heads=H, d_k=D, d_v=D, obs_window=8))
    parse_policy("think:window=8", PolicyContext(model=model))
    with pytest.raises(PolicyError, match="obs_window"):
        parse_policy("think:window=9", PolicyContext(model=model))
