"""KIVI as the paper defines it, and as a stored unit under eviction: keys per channel over groups of
tokens, values per token, the residual exact, and a group once quantized never quantized again, however
many requests evict some of its tokens."""

from __future__ import annotations

import math

import pytest
import torch
from kvrec.compression import PolicyContext, PolicyError, all_policies, decode_state, encode_state, parse_policy
from kvrec.compression.base import READ
from kvrec.compression.codec import read_header
from kvrec.compression.spec import parse_stage
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import AttentionStats, Events, LayerState, State

H, D = 2, 8


def tiny(kind: str = "hstu", d: int = D):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, num_items=200, dim=2 * d, heads=H, d_k=d, d_v=d, dropout=0.0,
                                   obs_window=8)).eval()


def events(n: int, start: int, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    return Events.of(torch.randint(0, 200, (n,), generator=g), ts=(torch.arange(n) + start) * 60)


def round_trip(state: State, spec: str) -> State:
    pipeline = parse_policy(spec)
    return decode_state(encode_state(pipeline.compress(state, None), pipeline, "m"), pipeline, "m")


def hand_state(tokens: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> State:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(H, tokens, D, generator=g) if keys is None else keys
    v = torch.randn(H, tokens, D, generator=g) if values is None else values
    return State("kv", [LayerState({"k": k, "v": v}, torch.arange(tokens), torch.arange(tokens) * 60,
                                   torch.ones(tokens))], events_consumed=tokens)


def stored_runs(blob: bytes, layer: int = 0) -> list[int]:
    """Signed run lengths of a layer's keys (+n quantized, -n exact), from the blob itself."""
    header, payload = read_header(blob)
    from kvrec.compression.codec import views

    return views(blob, payload, header["tensors"])[f"{layer}.kl"].tolist()


# ------------------------------------------------------------------------------------ the paper's format

def test_keys_per_channel_values_per_token_and_the_residual_exact():
    """2 bits over a group of n numbers err by at most sqrt((n - 2) / 18) of the group's norm: each within
    range / 6 of its value, the min and max exact, the norm at least range / sqrt(2). Keys are grouped
    per channel over tokens and values per token over channels, so with every key channel and every
    value row on its own scale the bound holds per channel and per row; the other way round (keys per
    token, values per channel) the small channels and rows are lost in their group's range."""
    t, residual, group = 50, 8, 16
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(H, t, D, generator=g) * torch.logspace(-3, 3, D)
    values = torch.randn(H, t, D, generator=g) * torch.logspace(-3, 3, t)[None, :, None]
    out = round_trip(hand_state(t, keys, values), f"kivi:bits=2,residual={residual},group={group}")
    quantized_keys = (t - residual) // group * group  # 32: two whole groups; keys 32.. stay exact
    assert torch.equal(out.k[0][:, quantized_keys:], keys[:, quantized_keys:])
    assert torch.equal(out.v[0][:, t - residual:], values[:, t - residual:])  # values: the last 8 exact
    assert not torch.equal(out.v[0][:, :t - residual], values[:, :t - residual])
    blocks = lambda x: x[:, :quantized_keys].reshape(H, -1, group, D)  # [H, groups, G, d]
    key_error = (blocks(out.k[0]) - blocks(keys)).norm(dim=2) / blocks(keys).norm(dim=2)  # per channel and group
    assert (key_error <= math.sqrt((group - 2) / 18) * 1.01).all()
    row_error = (out.v[0] - values).norm(dim=-1) / values.norm(dim=-1)
    assert (row_error <= math.sqrt((D - 2) / 18) * 1.01).all()


def test_without_eviction_groups_are_whole_and_counted_from_the_oldest_token():
    model = tiny()
    pipeline = parse_policy("kivi:bits=2,residual=8,group=8")
    state, _, stats = model.prefill(events(30, 0, 0))
    blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    assert stored_runs(blob) == [8, 8, -14]  # floor((30 - 8) / 8) = 2 groups, 14 exact keys
    for request in range(3):  # each group formed once stays: 30 + 5 + 5 + 5 = 45 tokens -> 4 groups, 13 exact
        state, _, stats = model.extend(decode_state(blob, pipeline, "m"), events(5, 30 + 5 * request, 1 + request))
        blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    assert stored_runs(blob) == [8, 8, 8, 8, -13]


def test_re_encoding_a_decoded_state_gives_the_same_blob():
    model = tiny()
    pipeline = parse_policy("h2o:budget=40,recent=8+kivi:bits=2,residual=8,group=8")
    state, _, stats = model.prefill(events(90, 0, 0))
    blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    assert encode_state(decode_state(blob, pipeline, "m"), pipeline, "m") == blob


# ------------------------------------------------------------------------------- fixed once quantized

@pytest.mark.parametrize("spec", ["random:budget=64+kivi:bits=2", "random:budget=96,seed=4+kivi:bits=2,residual=0"])
def test_eviction_never_requantizes_survivors(spec):
    """35 requests of random eviction: every key, once stored quantized, decodes to the same value in
    every later blob that keeps it (the groups it was quantized in thin out, their scale and zero stay),
    so the key error stays what quantizing once made it. Regrouping survivors from the oldest kept
    token, as KIVI on an evicted cache would, re-quantizes them every request: their error compounds
    (0.27 -> 0.39 in 40 requests on the default model)."""
    model = tiny(d=16)
    pipeline, exact = parse_policy(spec), parse_policy(spec.split("+")[0])
    first = events(100, 0, 0)
    state, _, stats = model.prefill(first)
    blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    truth, _, stats = model.prefill(first)
    truth = exact.compress(truth, stats)
    decoded_once: dict[int, torch.Tensor] = {}  # position -> its layer-0 key when first stored quantized
    errors, thinned = [], False
    for request in range(35):
        new = events(3, 100 + 3 * request, 10 + request)
        state, _, stats = model.extend(decode_state(blob, pipeline, "m"), new)
        blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
        truth, _, stats = model.extend(truth, new)
        truth = exact.compress(truth, stats)
        out = decode_state(blob, pipeline, "m")
        assert out.pos[0].tolist() == truth.pos[0].tolist()  # random evicts by (seed, events, layer)
        quantized = out.extras["kivi_run"][0] > 0
        for i in quantized.nonzero()[:, 0].tolist():
            key = out.k[0][:, i]
            assert torch.equal(decoded_once.setdefault(int(out.pos[0][i]), key), key), (request, i)
        thinned |= any(0 < n < 32 for n in stored_runs(blob))
        # layer 0's keys depend on the events alone: the exact run's are the truth
        errors.append(float((out.k[0][:, quantized] - truth.k[0][:, quantized]).norm()
                            / truth.k[0][:, quantized].norm()))
    assert thinned  # eviction did cut into stored groups
    assert 0.1 < errors[0] and max(errors) < 1.25 * errors[0]


def test_a_merged_key_joins_the_group_beside_it_and_costs_no_group():
    """A survivor that absorbed evicted tokens is quantized against its neighbour's scale and zero (codes
    clamped into that range): no new group, and the untouched survivors keep their codes."""
    model = tiny()
    pipeline = parse_policy("merge:budget=40,recent=8,threshold=-1+kivi:bits=2,residual=8,group=8")
    state, _, stats = model.prefill(events(60, 0, 0))
    blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    for request in range(6):
        before = decode_state(blob, pipeline, "m")
        state, _, stats = model.extend(before, events(2, 60 + 2 * request, 5 + request))
        blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
        after = decode_state(blob, pipeline, "m")
        was = {p: (before.k[0][:, j], float(before.weight[0][j])) for j, p in enumerate(before.pos[0].tolist())
               if before.extras["kivi_run"][0][j] > 0}  # keys stored quantized, by position
        for i, p in enumerate(after.pos[0].tolist()):
            if p in was and float(after.weight[0][i]) == was[p][1]:
                assert torch.equal(after.k[0][:, i], was[p][0])  # untouched: as stored
        runs = [n for n in stored_runs(blob) if n > 0]
        assert len(runs) <= (after.tokens(0) - 8) // 8 + 2  # rewritten keys opened no groups


def test_moved_sinks_keep_their_group():
    """StreamingLLM renumbers its sinks' positions each request (READ no longer matches); on HSTU their
    keys are unchanged, so they still decode to their own group and keep it."""
    model = tiny()
    pipeline = parse_policy("streaming:sink=4,window=60+kivi:bits=2,residual=8,group=8", PolicyContext(model=model))
    state, _, stats = model.prefill(events(80, 0, 0))
    blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    sinks = decode_state(blob, pipeline, "m").k[0][:, :4]
    for request in range(5):
        state, _, stats = model.extend(decode_state(blob, pipeline, "m"), events(3, 80 + 3 * request, request))
        blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
        out = decode_state(blob, pipeline, "m")
        assert torch.equal(out.k[0][:, :4], sinks) and (out.extras["kivi_run"][0][:4] > 0).all()


# ------------------------------------------------------------------------------------ what is refused

@pytest.mark.parametrize("token,refused", [("streaming:sink=4,window=28", True), ("window:budget=63", True),
                                           ("random:budget=64", False), ("h2o:bytes=4000", False),
                                           ("streaming:sink=4,window=60", False)])
def test_a_budget_that_leaves_nothing_to_quantize_is_refused(token, refused):
    """With residual 32 and groups of 32, keys are quantized only once 64 tokens are kept: under a token
    stage that keeps fewer, `kivi` would store everything exact under its name."""
    kivi = parse_stage("kivi:bits=2,residual=32")
    if refused:
        with pytest.raises(PolicyError, match="nothing would ever be quantized"):
            kivi.check_token_stage(parse_stage(token))
    else:
        kivi.check_token_stage(parse_stage(token))


# ------------------------------------------------------------------- the contract READ depends on

def token_specs() -> list[str]:
    special = {"streaming": "streaming:sink=2,window=10", "pool": "pool:budget=12,window=4,chunk=4",
               "snapkv": "snapkv:budget=12,window=4", "pyramid": "pyramid:budget=12,window=4",
               "ada": "ada:budget=12,window=4"}
    return [special.get(name, f"{name}:budget=12") for name, cls in sorted(all_policies().items())
            if cls.role == "token"]


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
@pytest.mark.parametrize("spec", token_specs())
def test_token_stages_rewrite_a_token_only_by_changing_its_weight_or_position(spec, kind):
    """KIVI re-emits a token as stored when its position and weight are what the blob said (READ); so
    every token stage must keep a token's K and V bit for bit unless it changes one of them (merging
    adds weight, StreamingLLM renumbers). A new token policy that rewrites K or V otherwise fails here."""
    model = tiny(kind)
    state, _, stats = model.prefill(events(30, 0, 0))
    state.extras[READ] = [torch.stack([(p + 1).double(), w.double()]) for p, w in zip(state.pos, state.weight)]
    received = [torch.rand(H, 30) for _ in range(state.num_layers)]
    stats = AttentionStats(received, [r[:, None].expand(H, 8, 30).clone() for r in received])
    out = parse_policy(spec, PolicyContext(model=model)).compress(state, stats)
    for layer in range(out.num_layers):
        read = out.extras[READ][layer]
        same = (read[0] == out.pos[layer] + 1) & (read[1] == out.weight[layer])
        for i in same.nonzero()[:, 0].tolist():
            j = int(out.pos[layer][i])  # its index in the prefilled state
            for name in ("k", "v"):
                assert torch.equal(out.layers[layer].tokens[name][:, i], state.layers[layer].tokens[name][:, j])
