"""Each policy's defining behaviour, on hand-made states where the right answer is known."""

from __future__ import annotations

import torch
from kvrec.compression import PolicyContext, decode_state, encode_state, parse_policy
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import AttentionStats, LayerState, State

H, D = 2, 8
FP = "fp"


def make_state(t: int, layers: int = 2, seed: int = 0) -> State:
    """Random K/V for t consecutive events, the same positions in every layer."""
    g = torch.Generator().manual_seed(seed)
    parts = [LayerState({"k": torch.randn(H, t, D, generator=g), "v": torch.randn(H, t, D, generator=g)},
                        torch.arange(t), torch.arange(t) * 10, torch.ones(t)) for _ in range(layers)]
    return State("kv", parts, last_hidden=torch.randn(16, generator=g), events_consumed=t)


def stats_with(received: torch.Tensor, layers: int = 2, window: torch.Tensor | None = None) -> AttentionStats:
    """received [T] (same for every head and layer); window [w, T] likewise."""
    t = received.shape[0]
    win = torch.zeros(1, t) if window is None else window
    return AttentionStats([received.expand(H, t).clone() for _ in range(layers)],
                          [win.expand(H, *win.shape).clone() for _ in range(layers)])


def kept(state: State, layer: int = 0) -> list[int]:
    return state.pos[layer].tolist()


def round_trip(state: State, spec: str, context: PolicyContext | None = None) -> State:
    pipeline = parse_policy(spec, context)
    return decode_state(encode_state(pipeline.compress(state, None), pipeline, FP), pipeline, FP)


# ----------------------------------------------------------------------------- token pruning

def test_window_keeps_the_most_recent():
    out = parse_policy("window:budget=5").compress(make_state(20), None)
    assert kept(out) == list(range(15, 20)) and kept(out, 1) == list(range(15, 20))


def test_streaming_keeps_sinks_and_window():
    model = build_model(ModelConfig(kind="hstu", num_items=50, dim=16, heads=H, d_k=D, d_v=D))
    state = make_state(20)
    out = parse_policy("streaming:sink=3,window=4", PolicyContext(model=model)).compress(state, None)
    for layer in range(2):  # the sinks' positions move right before the window (tests/test_policy_streaming.py)
        torch.testing.assert_close(out.k[layer], state.k[layer][:, [0, 1, 2, 16, 17, 18, 19]], rtol=0, atol=0)
        assert kept(out, layer) == [13, 14, 15, 16, 17, 18, 19]


def test_snapkv_keeps_what_the_observation_window_attends_to():
    votes = torch.zeros(3, 30)
    votes[:, 10] = 1.0  # the last queries all look at token 10
    pipeline = parse_policy("snapkv:budget=7,window=4,kernel=3")
    out = pipeline.compress(make_state(30), stats_with(torch.zeros(30), window=votes))
    assert kept(out)[-4:] == [26, 27, 28, 29]  # the observation window itself
    assert {9, 10, 11} <= set(kept(out))  # the voted token and its pooled neighbours


def test_knorm_keeps_the_lowest_key_norms():
    state = make_state(12)
    scale = torch.ones(12)
    scale[[2, 7, 9]] = 0.01
    for layer, k in enumerate(state.k):
        state.k[layer] = k * scale[None, :, None]
    assert kept(parse_policy("knorm:budget=3").compress(state, None)) == [2, 7, 9]


def test_random_is_deterministic_and_seeded():
    state = make_state(50)
    a = kept(parse_policy("random:budget=10,seed=1").compress(state, None))
    assert a == kept(parse_policy("random:budget=10,seed=1").compress(state, None))
    assert a != kept(parse_policy("random:budget=10,seed=2").compress(state, None))
    assert a != list(range(40, 50))


# ----------------------------------------------------------------------------- token merging

def test_pool_averages_old_chunks_and_keeps_recent_exact():
    state = make_state(40)
    out = parse_policy("pool:budget=12,window=8,chunk=8").compress(state, None)
    layer = 0
    assert kept(out) == [4, 12, 20, 28] + list(range(32, 40))  # 4 chunk means (3.5 rounds to even), 8 exact
    torch.testing.assert_close(out.k[layer][:, -8:], state.k[layer][:, 32:])
    torch.testing.assert_close(out.k[layer][:, 1], state.k[layer][:, 8:16].mean(1))
    assert out.weight[layer].tolist() == [8.0] * 4 + [1.0] * 8
    # pooling again with nothing new changes nothing: a summary is stable across requests
    again = parse_policy("pool:budget=12,window=8,chunk=8").compress(out, None)
    assert kept(again) == kept(out)


def test_pool_folds_the_oldest_chunks_when_summaries_exceed_the_budget():
    state = make_state(40)
    out = parse_policy("pool:budget=10,window=6,chunk=8").compress(state, None)
    # 34 older tokens span 5 chunks but only 4 slots are left: chunks 0 and 1 become one token
    assert out.tokens(0) == 10 and out.weight[0][:4].tolist() == [16.0, 8.0, 8.0, 2.0]
    assert float(out.weight[0].sum()) == 40.0


# ----------------------------------------------------------------------------- precision

def test_kivi_keeps_recent_exact_and_quantizes_keys_per_channel():
    t = 50
    state = make_state(t)
    # every channel lives on its own scale: per-channel quantization is nearly exact, per-token is not
    offsets = torch.arange(D).float() * 100.0
    for layer, k in enumerate(state.k):
        state.k[layer] = k * 0.01 + offsets
    out = round_trip(state, "kivi:bits=2,residual=8,group=16")
    quantized = (t - 8) // 16 * 16  # 32: two whole key groups; tokens 32.. stay exact (>= the last 8)
    for layer in range(2):
        assert torch.equal(out.k[layer][:, quantized:], state.k[layer][:, quantized:])
        assert torch.equal(out.v[layer][:, t - 8:], state.v[layer][:, t - 8:])  # values: the last residual exact
        key_err = (out.k[layer][:, :quantized] - state.k[layer][:, :quantized]).abs().max()
        assert key_err < 0.05  # a per-token scheme would err by ~ 700 / 3 here
        assert not torch.equal(out.v[layer][:, :quantized], state.v[layer][:, :quantized])
    per_token = round_trip(state, "int4:group=8")
    assert (per_token.k[0] - state.k[0]).abs().max() > 10 * key_err


def test_int8_per_token_scales_isolate_outliers():
    state = make_state(10)
    for layer, k in enumerate(state.k):
        state.k[layer] = k.clone()
    state.k[0][:, 3] *= 1000.0
    out = round_trip(state, "int8")
    others = torch.cat([state.k[0][:, :3], state.k[0][:, 4:]], 1)
    out_others = torch.cat([out.k[0][:, :3], out.k[0][:, 4:]], 1)
    assert (others - out_others).abs().max() <= others.abs().max() / 127


def test_casts_and_fp8_are_close():
    state = make_state(20)
    for spec, tol in (("fp16", 1e-3), ("bf16", 1e-2), ("fp8", 0.07)):
        out = round_trip(state, spec)
        rel = (out.k[0] - state.k[0]).abs() / state.k[0].abs().amax(-1, keepdim=True)
        assert rel.max() < tol, spec


def test_int4_stores_half_a_byte_per_number_plus_fp16_scale_and_zero_per_group():
    state = make_state(200)
    parts = parse_policy("int4:group=4").storage.pack(state)
    numbers = 2 * 2 * H * 200 * D  # layers x (k, v) x heads x tokens x channels
    assert sum(t.numel() * t.element_size() for t in parts.values()) == numbers // 2 + numbers // 4 * 4


def test_intact_keeps_sinks_and_attended_pivots_exact():
    state = make_state(30)
    received = torch.zeros(30)
    received[[12, 20]] = 3.0
    pipeline = parse_policy("intact:sink=2,pivots=2,bits=4,group=8")
    out = decode_state(encode_state(pipeline.compress(state, stats_with(received)), pipeline, FP), pipeline, FP)
    exact = [i for i in range(30) if torch.equal(out.k[0][:, i], state.k[0][:, i])]
    assert exact == [0, 1, 12, 20]


# ----------------------------------------------------------------------------- low rank, channels, layers

def test_think_without_queries_keeps_the_strongest_key_channels():
    """No statistics, so no window queries to score with (tests/test_policy_think.py has them): ThinK's
    score with a uniform |Q_c| is the key norm."""
    state = make_state(20)
    strong = [1, 4, 6, 7]
    for layer in range(2):
        state.k[layer][:, :, strong] *= 10.0
    out = round_trip(state, "think:keep=0.5")
    for layer in range(2):
        assert torch.equal(out.k[layer][:, :, strong], state.k[layer][:, :, strong])
        assert not out.k[layer][:, :, [0, 2, 3, 5]].any()
        assert torch.equal(out.v[layer], state.v[layer])


