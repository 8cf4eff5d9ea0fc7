"""One matrix over every registered policy, both models: the checks every policy must pass."""

from __future__ import annotations

import math

import pytest
import torch
from kvrec.compression import PolicyContext, all_policies, decode_state, encode_state, parse_policy
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events

BUDGET = 24
D = 8  # channels per head of the tiny model
# every registered policy at a budget below the 60-event history (storage policies need no budget)
SPECS = {
    "full": "full", "recompute": "recompute", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8", "int8": "int8",
    "int4": "int4:group=4", "kivi": "kivi:bits=2,residual=8,group=8", "intact": "intact:sink=2,pivots=4,bits=4",
    "svd": "svd:rank=16", "think": "think:keep=0.5", "minicache": "minicache:threshold=0.5,start=0",
    "window": f"window:budget={BUDGET}", "streaming": f"streaming:sink=4,window={BUDGET - 4}",
    "h2o": f"h2o:budget={BUDGET},recent=8", "tova": f"tova:budget={BUDGET}",
    "snapkv": f"snapkv:budget={BUDGET},window=8,kernel=3", "pyramid": f"pyramid:budget={BUDGET},window=8,beta=4",
    "ada": f"ada:budget={BUDGET},window=8", "knorm": f"knorm:budget={BUDGET}", "random": f"random:budget={BUDGET}",
    "merge": f"merge:budget={BUDGET},recent=8", "pool": f"pool:budget={BUDGET},window=8,chunk=4",
}
TOKEN_POLICIES = {"window", "streaming", "h2o", "tova", "snapkv", "pyramid", "ada", "knorm", "random", "merge", "pool"}
# whose blob holds the compressed state exactly: the token policies, and think, which zeroes key channels
# when it compresses (its choice, from the window's queries, is tested in test_policy_think.py)
LOSSLESS = {"full", "think"} | TOKEN_POLICIES
# The most relative error (||decoded - x|| / ||x||) each lossy storage may make on keys and on values,
# from how it encodes, for each row (one token of one head), or, in KEYS_PER_HEAD, for a head's keys
# together (groups that run across tokens); a correct encoder is always within it, a wrong one (a
# scale per tensor, a basis after the rotary step, the weakest channels, directions shared between
# unlike tokens) is not.
ERROR_BOUND = {
    # elementwise relative rounding of the float format: 10, 7 and 3 fraction bits
    "fp16": (2**-11, 2**-11), "bf16": (2**-8, 2**-8), "fp8": (2**-4, 2**-4),
    # symmetric 8 bits per row with an fp32 scale: each element within absmax/254 and a row's norm is
    # at least its absmax, so a row of d errs by at most sqrt(d)/254
    "int8": (math.sqrt(D) / 254, math.sqrt(D) / 254),
    # asymmetric 4 bits per group of 4 (fp16 scale and zero): within range/30 <= absmax/15 of each group
    "int4": (2 / 15 * 1.01, 2 / 15 * 1.01),
    # min/max to `bits` over a group of n: every element within range / (2 (2^bits - 1)) of its value,
    # the min and max exact (zero rounded down, scale up in fp16) and the group's norm at least
    # range / sqrt(2), so the group errs by at most sqrt((n - 2) / 2) / (2^bits - 1) of its norm. KIVI:
    # 2 bits per channel over groups of 8 tokens (keys, checked per head) and per row of 8 (values)
    "kivi": (math.sqrt((8 - 2) / 2) / 3 * 1.01, math.sqrt((D - 2) / 2) / 3 * 1.01),
    "intact": (math.sqrt((D - 2) / 2) / 15 * 1.01, math.sqrt((D - 2) / 2) / 15 * 1.01),  # 4 bits per row (group = d)
    # rank 16 is the projections' full rank (heads x d = dim = 16): Palu's latent loses nothing
    "svd": (1e-5, 1e-5),
    # a merged (head, token) vector is rebuilt along the midpoint of two directions at most
    # arccos(threshold) apart: off by 2 sin(arccos(threshold) / 4) of its norm; the rest retained
    "minicache": (2 * math.sin(math.acos(0.5) / 4), 2 * math.sin(math.acos(0.5) / 4)),
}
KEYS_PER_HEAD = {"kivi"}
FP = "tiny-model"


def test_matrix_covers_every_policy():
    assert set(SPECS) == set(all_policies())
    assert set(ERROR_BOUND) | LOSSLESS == set(SPECS) - {"recompute"}


def tiny(kind: str):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, num_items=50, dim=16, heads=2, d_k=8, d_v=8, dropout=0.0,
                                   obs_window=8)).eval()


@pytest.fixture(scope="module", params=["hstu", "sasrec"])
def model(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def hstu():
    return tiny("hstu")  # byte accounting does not depend on the model


def events(n: int, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    return Events.of(torch.randint(0, 50, (n,), generator=g), ts=torch.arange(n) * 60 + seed * 100_000)


@pytest.fixture(scope="module")
def context(model):
    return PolicyContext(model=model, calibration=[events(40, seed) for seed in range(2)])


def finite(state) -> bool:
    return all(torch.isfinite(t).all() for t in [*state.k, *state.v, *state.weight])


@pytest.mark.parametrize("name", [n for n in SPECS if n != "recompute"])
def test_policy_contract(name, model, context):
    pipeline = parse_policy(SPECS[name], context)
    assert parse_policy(pipeline.spec, context) == pipeline
    state, _, stats = model.prefill(events(60, 1))
    state = pipeline.compress(state, stats)
    budget_held(pipeline, state)
    blob = encode_state(state, pipeline, FP)
    decoded = decode_state(blob, pipeline, FP)
    assert finite(state) and finite(decoded)
    assert [t.tolist() for t in decoded.pos] == [t.tolist() for t in state.pos]
    for kind, bound in enumerate(ERROR_BOUND.get(name, (0.0, 0.0))):
        for a, b in zip(*((state.k, state.v)[kind], (decoded.k, decoded.v)[kind])):  # [H, T, d]
            if name in LOSSLESS:
                assert torch.equal(a, b)
            else:
                dims = (1, 2) if kind == 0 and name in KEYS_PER_HEAD else (2,)
                error, norm = (a - b).norm(dim=dims), a.norm(dim=dims)
                assert (error <= bound * norm + 1e-6).all(), ("kv"[kind], float((error / norm).max()))
    # re-encoding what was decoded is a fixed point
    again = decode_state(encode_state(decoded, pipeline, FP), pipeline, FP)
    for a, b in zip([*decoded.k, *decoded.v], [*again.k, *again.v]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    # the model still extends the decoded state, and the pipeline keeps its budget request after request
    for request in range(3):
        state, hidden, stats = model.extend(decoded, events(7, 10 + request))
        assert torch.isfinite(hidden).all()
        state = pipeline.compress(state, stats)
        decoded = decode_state(encode_state(state, pipeline, FP), pipeline, FP)
        assert finite(decoded) and decoded.events_consumed == 60 + 7 * (request + 1)
        budget_held(pipeline, decoded)


def budget_held(pipeline, state) -> None:
    """Every layer within its own budget, and all layers together within layers x BUDGET (`pyramid`
    gives lower layers more than BUDGET and upper layers less)."""
    if pipeline.token is None:
        return
    budgets = pipeline.token.budgets(state, pipeline.storage)
    assert all(state.tokens(layer) <= budget for layer, budget in enumerate(budgets))
    assert sum(budgets) <= BUDGET * state.num_layers


@pytest.mark.parametrize("name", sorted(TOKEN_POLICIES))
def test_token_policy_leaves_short_history_whole(name, model):
    pipeline = parse_policy(SPECS[name])
    state, _, stats = model.prefill(events(BUDGET - 3, 2))
    out = pipeline.compress(state, stats)
    for field in ("k", "v", "pos", "ts", "weight"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(state, field), getattr(out, field))), field


@pytest.mark.parametrize("name", ["window", "h2o", "tova", "snapkv", "pyramid", "ada", "knorm", "random", "merge",
                                  "pool"])
@pytest.mark.parametrize("storage", ["", "+int8", "+kivi:bits=2,residual=8,group=8"])
def test_byte_budget_is_never_exceeded(name, storage, hstu):
    model = hstu
    limit = 4000
    pipeline = parse_policy(f"{name}:bytes={limit}{storage}")
    state, _, stats = model.prefill(events(120, 3))
    for request in range(3):
        state = pipeline.compress(state, stats)
        blob = encode_state(state, pipeline, FP)
        assert len(blob) <= limit
        assert min(state.tokens(layer) for layer in range(state.num_layers)) >= 1
        state, _, stats = model.extend(decode_state(blob, pipeline, FP), events(5, 20 + request))


def test_empty_state_round_trips(model, context):
    for name in SPECS:
        if name == "recompute":
            continue
        pipeline = parse_policy(SPECS[name], context)
        state = pipeline.compress(model.empty_state(), None)
        decoded = decode_state(encode_state(state, pipeline, FP), pipeline, FP)
        assert decoded.tokens_kept() == 0 and decoded.last_hidden is None
