"""The head level of memory reduction, trained into the model, for HSTU and SASRec.

Grouped-query attention (`kv_heads` = N < heads: N K/V heads, each read by a group of heads / N query
heads; N = 1 is multi-query attention) and multi-head latent attention (`latent_dim`: one latent per
token, every head's K and V up-projected from it; SASRec adds DeepSeek-V2's decoupled rotary key). Each
keeps the serving invariants (extend == prefill == training, cached ranking == the training pass),
has its defining property (a group reads one K/V head; a latent state holds only latents, and the
K/V made from them are the model's), shrinks the stored state by the expected factor, reports attention
statistics on its state's head axis, and works with every post-hoc policy that applies to it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kvrec.compression import PolicyContext, all_policies, decode_state, encode_state, parse_policy
from kvrec.compression.base import PolicyError
from kvrec.compression.step import ServingStep
from kvrec.models.checkpoint import load_checkpoint
from kvrec.models.recommender import ModelConfig, Targets
from kvrec.models.registry import build_model
from kvrec.models.state import Events
from test_compression_matrix import BUDGET, SPECS  # every registered policy, at a budget below the history

from kvrec.cli import main as kvrec

ITEMS = 50
HEADS, D = 4, 8  # 4 heads of d_k = d_v = 8: a token of the base model holds 4 x 16 numbers per layer
VARIANTS = {"gqa": {"kv_heads": 2}, "mqa": {"kv_heads": 1}, "mla": {"latent_dim": 12, "rope_dim": 4}}
KINDS = ["hstu", "sasrec"]


def config(kind: str, ranking_head: bool = False, **variant) -> ModelConfig:
    return ModelConfig(kind=kind, num_items=ITEMS, dim=16, heads=HEADS, d_k=D, d_v=D, max_len=50, dropout=0.0,
                       obs_window=8, ranking_head=ranking_head, **variant)


def tiny(kind: str, variant: str | None = None, ranking_head: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config(kind, ranking_head, **VARIANTS.get(variant, {}))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # untrained relative biases are zero: make position and time matter
    return model


def history(n: int, seed: int = 1, regular: bool = False) -> Events:
    """n events; `regular` times (one a minute) store as a sequence, so a blob's metadata stays tiny."""
    gen = torch.Generator().manual_seed(seed)
    ts = torch.arange(n) * 60 if regular else 1_500_000_000 + torch.randint(0, 5000, (n,), generator=gen).cumsum(0)
    return Events.of(torch.randint(0, ITEMS + 1, (n,), generator=gen), ts, torch.randint(0, 10, (n,), generator=gen))


def padded_forward(model, events: Events, pad: int = 3, targets: Targets | None = None):
    """The training pass over one left-padded window."""
    padded = lambda t: torch.cat([torch.zeros(pad, dtype=t.dtype), t])[None]
    valid = padded(torch.ones(len(events), dtype=torch.bool))
    with torch.no_grad():
        out = model(padded(events.items), padded(events.ts), padded(events.actions), valid, targets)
    return out if targets is None else out[1]


def state_heads(variant: str) -> int:
    """The head axis of a variant's token tensors (and of its attention statistics)."""
    return VARIANTS[variant].get("kv_heads", 1)


# ----------------------------------------------------------------------------- serving invariants


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_extend_in_chunks_equals_prefill_equals_training(kind, variant):
    model = tiny(kind, variant)
    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        length = int(torch.randint(20, 80, (1,), generator=gen))
        events = history(length, seed=trial)
        full, full_hidden, _ = model.prefill(events)
        # training: the hidden vector after every event, against extending one event at a time
        trained = padded_forward(model, events)[0, 3:]  # [L, D]
        state, step_hidden = model.prefill(events[:0])[0], []
        for t in range(length):
            state, hidden, _ = model.extend(state, events[t:t + 1])
            step_hidden.append(hidden)
        torch.testing.assert_close(torch.stack(step_hidden), trained, atol=1e-5, rtol=0)
        for split in (0, int(torch.randint(1, length, (1,), generator=gen)), length):
            for chunk in (1, 5, 32):
                state, hidden, _ = model.prefill(events[:split], chunk=7)
                for start in range(split, length, chunk):
                    state, hidden, _ = model.extend(state, events[start:start + chunk])
                torch.testing.assert_close(hidden, full_hidden, atol=1e-5, rtol=0)
                for mine, theirs in zip(state.layers, full.layers):
                    assert mine.tokens.keys() == theirs.tokens.keys()
                    for name in mine.tokens:
                        torch.testing.assert_close(mine.tokens[name], theirs.tokens[name], atol=1e-5, rtol=0)
                    assert torch.equal(mine.pos, torch.arange(length))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_cached_ranking_equals_the_training_pass(kind, variant):
    model, events = tiny(kind, variant, ranking_head=True), history(40)
    cuts, per_cut = [9, 25, 40], 5
    cands = torch.randint(0, ITEMS, (len(cuts) * per_cut,), generator=torch.Generator().manual_seed(2))
    seen = torch.tensor(cuts).repeat_interleave(per_cut)  # [C]
    target_hidden = padded_forward(model, events, targets=Targets(cands[None], seen[None], events.ts[seen - 1][None]))
    want, _ = model.head(target_hidden[0])  # [C]
    for i, cut in enumerate(cuts):
        state, _, _ = model.prefill(events[:cut], chunk=7)
        mine = cands[i * per_cut:(i + 1) * per_cut]
        got, _ = model.rank(state, mine, int(events.ts[cut - 1]), batch=3)
        torch.testing.assert_close(got, want[i * per_cut:(i + 1) * per_cut], atol=1e-5, rtol=1e-5)
        alone = torch.cat([model.rank(state, mine[j:j + 1], int(events.ts[cut - 1]))[0] for j in range(per_cut)])
        torch.testing.assert_close(alone, got, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- defining properties


def base_with_shared_kv(gqa):
    """The base model (a K/V head per query head) whose query head h has K/V head h // g of `gqa`'s
    weights (g = heads / kv_heads), everything else the same: GQA is exactly that model."""
    cfg = gqa.cfg
    g = cfg.heads // cfg.kv_heads
    per_head = lambda d: ((torch.arange(cfg.heads) // g)[:, None] * d + torch.arange(d)).flatten()  # [H d] rows
    if cfg.kind == "sasrec":
        rows = {"k": per_head(cfg.d_k), "v": per_head(cfg.d_v)}
    else:  # uvqk rows: U [H d_v], V [N d_v], Q [H d_k], K [N d_k]
        u, v, q = cfg.heads * cfg.d_v, cfg.kv_heads * cfg.d_v, cfg.heads * cfg.d_k
        rows = {"uvqk": torch.cat([torch.arange(u), u + per_head(cfg.d_v), u + v + torch.arange(q),
                                   u + v + q + per_head(cfg.d_k)])}
    weights = {key: t[rows[key.split(".")[-2]]] if key.split(".")[-2] in rows else t
               for key, t in gqa.state_dict().items()}
    base = build_model(dataclasses.replace(cfg, kv_heads=0)).eval()
    base.load_state_dict(weights)
    return base


@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_gqa_is_the_base_model_with_kv_shared_in_groups(kind, kv_heads):
    """kv_heads = heads takes the base model's weights as they are (same parameters, same numbers);
    fewer K/V heads equal the base model whose heads of a group have identical K/V projections."""
    torch.manual_seed(0)
    gqa = build_model(config(kind, kv_heads=kv_heads)).eval()
    base = base_with_shared_kv(gqa)
    if kv_heads == HEADS:
        assert gqa.state_dict().keys() == base.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(gqa.state_dict().values(), base.state_dict().values()))
    events = history(30)
    torch.testing.assert_close(padded_forward(gqa, events), padded_forward(base, events), atol=1e-5, rtol=0)
    mine, hidden, stats = gqa.prefill(events[:20])
    theirs, base_hidden, base_stats = base.prefill(events[:20])
    torch.testing.assert_close(hidden, base_hidden, atol=1e-5, rtol=0)
    g = HEADS // kv_heads
    for layer in range(gqa.cfg.layers):
        # the base model's heads of a group cache the GQA head's keys, and its statistics sum over them
        torch.testing.assert_close(theirs.k[layer][::g], mine.k[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(base_stats.received[layer].view(kv_heads, g, -1).sum(1), stats.received[layer])
        torch.testing.assert_close(base_stats.window[layer].view(kv_heads, g, *stats.window[layer].shape[1:]).sum(1),
                                   stats.window[layer])


@pytest.mark.parametrize("kind", KINDS)
def test_a_group_of_query_heads_reads_exactly_its_kv_head(kind):
    """Perturbing one cached K/V head changes the attention output of exactly its group's query heads."""
    model = tiny(kind, "gqa")
    g = HEADS // model.cfg.kv_heads
    state, _, _ = model.prefill(history(30))
    block, new = model.blocks[0], history(30)[25:]
    outputs = []
    original = block.output
    block.output = lambda x, attn, ctx: outputs.append(attn[0]) or original(x, attn, ctx)  # attn [H, n, d_v]
    try:
        model.extend(state, new)
        for name in ("k", "v"):
            for head in range(model.cfg.kv_heads):
                bumped = state.clone()
                bumped.layers[0].tokens[name][head] += torch.randn_like(bumped.layers[0].tokens[name][head])
                model.extend(bumped, new)
                changed = (outputs[-1] - outputs[0]).abs().amax(dim=(1, 2)) > 1e-4  # [H], layer 0 of this call
                assert changed.tolist() == [h // g == head for h in range(HEADS)], (name, head)
    finally:
        del block.output


@pytest.mark.parametrize("kind", KINDS)
def test_a_latent_state_holds_only_latents_and_they_make_the_models_kv(kind):
    model, events = tiny(kind, "mla"), history(30)
    cfg = model.cfg
    state, _, _ = model.prefill(events, chunk=11)
    want = {"c": (1, 30, cfg.latent_dim)} | ({"kr": (1, 30, cfg.rope_dim)} if kind == "sasrec" else {})
    assert state.kind == "latent"
    for part in state.layers:
        assert {name: tuple(t.shape) for name, t in part.tensors().items()} == want
    assert state.tensor_bytes() == 4 * cfg.layers * 30 * sum(shape[2] for shape in want.values())
    # the keys and values up-projected from the state are those the training pass computes
    block = model.blocks[0]
    x = model.embed(events.items, events.actions)[None]  # layer 0's input
    with torch.no_grad():
        _, k, v, _ = block.qkv(x, torch.arange(30)[None])  # [1, H, T, d]
        cached_k, cached_v = block.keys_values({name: t[None] for name, t in state.layers[0].tokens.items()})
    assert k.shape == (1, HEADS, 30, D + (cfg.rope_dim if kind == "sasrec" else 0)) and v.shape == (1, HEADS, 30, D)
    torch.testing.assert_close(cached_k, k, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached_v, v, atol=1e-6, rtol=0)


def test_hstu_mla_is_hstu_with_its_kv_projection_factored():
    """HSTU's K and V are SiLU(W x); under MLA W = W_U W_DKV through the latent, so the base model with
    that W (and no K/V bias) gives the same numbers."""
    torch.manual_seed(0)
    mla = build_model(config("hstu", latent_dim=12)).eval()
    base = build_model(config("hstu")).eval()
    weights = {key: t for key, t in mla.state_dict().items() if ".latent." not in key and ".uvqk." not in key}
    hv, hk = HEADS * D, HEADS * D
    for i, block in enumerate(mla.blocks):
        u, q = block.uvqk.weight.split([hv, hk])
        ub, qb = block.uvqk.bias.split([hv, hk])
        factored = block.latent.up.weight @ block.latent.down.weight  # [H (d_k + d_v), D]: K rows, then V
        k, v = factored.split([hk, hv])
        weights[f"blocks.{i}.uvqk.weight"] = torch.cat([u, v, q, k])
        weights[f"blocks.{i}.uvqk.bias"] = torch.cat([ub, torch.zeros(hv), qb, torch.zeros(hk)])
    base.load_state_dict(weights)
    events = history(25)
    torch.testing.assert_close(padded_forward(mla, events), padded_forward(base, events), atol=1e-5, rtol=0)
    _, _, stats = mla.prefill(events)
    _, _, base_stats = base.prefill(events)
    for layer in range(mla.cfg.layers):  # a latent's statistics: the sum over every query head
        torch.testing.assert_close(stats.received[layer], base_stats.received[layer].sum(0, keepdim=True))
        torch.testing.assert_close(stats.window[layer], base_stats.window[layer].sum(0, keepdim=True))


def test_sasrec_latent_positions_enter_through_the_rotary_key_alone():
    """The latent carries no position (so it can be up-projected anywhere): relative positions come from
    the rotary query and key parts, so a history at other absolute positions gives the same hidden,
    while reordering it does not."""
    model, events = tiny("sasrec", "mla"), history(20)
    _, hidden, _ = model.prefill(events)
    later = dataclasses.replace(model.empty_state(), events_consumed=1000)  # the same events at 1000..1019
    torch.testing.assert_close(model.extend(later, events)[1], hidden, atol=1e-5, rtol=0)
    order = torch.cat([torch.randperm(19, generator=torch.Generator().manual_seed(0)), torch.tensor([19])])
    shuffled = Events(events.items[order], events.ts, events.actions[order])  # same last event, others moved
    assert not torch.allclose(model.prefill(shuffled)[1], hidden, atol=1e-3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_macs_count_attention_and_the_up_projection(kind, variant):
    """GQA reads fewer K/V heads but does the multiply-adds of every query head; MLA also up-projects
    every cached latent at each extension."""
    model = tiny(kind, variant)
    cfg = model.cfg
    state, _, _ = model.prefill(history(30)[:22])
    macs = model.extend(state, history(30)[22:])[2].macs  # 8 new queries against 30 keys, per layer
    d_q = D + (cfg.rope_dim if kind == "sasrec" and cfg.latent_dim else 0)
    per_layer = HEADS * 8 * 30 * (d_q + D) + 30 * cfg.latent_dim * HEADS * 2 * D
    assert macs == cfg.layers * per_layer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_attention_statistics_follow_the_states_head_axis(kind, variant):
    model = tiny(kind, variant)
    heads = state_heads(variant)
    state, _, _ = model.prefill(history(30)[:20])
    new_state, _, stats = model.extend(state, history(30)[20:])
    empty_call = model.extend(new_state, history(30)[30:])[2]
    for layer in range(model.cfg.layers):
        assert next(iter(new_state.layers[layer].tokens.values())).shape[0] == heads
        assert stats.received[layer].shape == (heads, 30) and stats.window[layer].shape == (heads, 8, 30)
        assert empty_call.received[layer].shape == (heads, 30)
        assert torch.all(stats.window[layer][:, 0, 23:] == 0)  # causal: the first of the last 8 sees 22 keys
        if kind == "sasrec":  # each query head's softmax row sums to one; a state head sums its readers
            torch.testing.assert_close(stats.window[layer].sum(-1), torch.full((heads, 8), HEADS / heads))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_blob_shrinks_by_the_head_level_factor(kind, variant):
    """Stored bytes after 200 events: tensor bytes smaller by exactly heads / kv_heads (GQA) or
    heads (d_k + d_v) / (latent_dim [+ rope_dim]) (MLA); each blob is its tensors plus a header < 1 KiB."""
    full = parse_policy("full")
    cfg = VARIANTS[variant]
    rope = cfg.get("rope_dim", 0) if kind == "sasrec" else 0
    factor = HEADS / cfg["kv_heads"] if "kv_heads" in cfg else HEADS * 2 * D / (cfg["latent_dim"] + rope)
    events = history(200, regular=True)
    blobs, tensors = [], []
    for model in (tiny(kind), tiny(kind, variant)):
        state = model.prefill(events)[0]
        blobs.append(len(encode_state(state, full, "m")))
        tensors.append(state.tensor_bytes())
        assert tensors[-1] < blobs[-1] < tensors[-1] + 1024
    assert tensors[0] == 4 * 2 * 200 * HEADS * 2 * D
    assert tensors[0] / tensors[1] == pytest.approx(factor)
    assert blobs[0] / factor < blobs[1] < blobs[0] / factor + 1024


# ----------------------------------------------------------------------------- post-hoc policies

# what a latent state refuses: policies that read or encode per-token keys and values
NEEDS_KV = {"kivi", "intact", "svd", "think", "minicache", "knorm", "merge"}
# Known gaps outside the models (see the report of issue 10): each must run, and does not yet


def test_policy_list_covers_every_registered_policy():
    assert set(SPECS) == set(all_policies())


@pytest.fixture(scope="module")
def models():
    return {(kind, variant): tiny(kind, variant) for kind in KINDS for variant in ("gqa", "mla")}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("variant", ["gqa", "mla"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_policy_runs_on_or_is_refused_by_a_head_level_state(kind, variant, name, models, request):
    model = models[kind, variant]
    context = PolicyContext(model=model, calibration=[history(40, seed) for seed in range(2)])
    if variant == "mla" and name in NEEDS_KV:
        with pytest.raises(PolicyError, match=rf"{name} needs per-token 'k' tensors, and a 'latent' state has c"):
            parse_policy(SPECS[name], context)
        return
    pipeline = parse_policy(SPECS[name], context)
    if not pipeline.keeps_state:
        return
    state, _, stats = model.prefill(history(60))
    for request_no in range(3):
        state = pipeline.compress(state, stats)
        if pipeline.token is not None:
            assert state.tokens_kept() <= BUDGET * state.num_layers  # pyramid spreads it unevenly
        decoded = decode_state(encode_state(state, pipeline, "m"), pipeline, "m")
        assert decoded.kind == state.kind and decoded.token_names() == state.token_names()
        state, hidden, stats = model.extend(decoded, history(7, seed=10 + request_no))
        assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("kind", KINDS)
def test_h2o_and_int8_stack_on_a_gqa_model_through_the_codec(kind):
    """Heavy hitters ranked by attention accumulated on the K/V heads, then int8 storage, request by
    request through the blob: the accumulated attention lines up with the state and is not all zeros."""
    model = tiny(kind, "gqa")
    step = ServingStep(model, parse_policy("h2o:budget=32+int8", PolicyContext(model=model)), "m")
    state, events = step.start(), history(100, regular=True)
    for start in range(0, 100, 20):
        out = step.advance(state, events[start:start + 20])
        state = step.restore(out.blob, start + 20)
        assert state is not None and state.kind == "kv"
        for layer, part in enumerate(state.layers):
            assert part.num_tokens == min(start + 20, 32)
            assert part.tokens["k"].shape == (2, part.num_tokens, D)
            assert state.extras["acc"][layer].shape == (2, part.num_tokens)
    assert all(bool((acc > 0).any()) for acc in state.extras["acc"])
    assert state.layers[0].pos.max() == 99  # the newest event is kept, 68 of 100 evicted


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_cli_trains_a_latent_sasrec_and_its_checkpoint_round_trips(tmp_path):
    ckpt = tmp_path / "mla.ckpt"
    assert kvrec(["train", "--model", "sasrec", "--dataset", "synth-short:users=12,mean_len=20", "--out", str(ckpt),
                  "--dim", "16", "--heads", "2", "--head-dim", "8", "--latent-dim", "8", "--rope-dim", "4",
                  "--max-len", "20", "--epochs", "2", "--batch-size", "8", "--negatives", "8", "--threads", "1",
                  "--device", "cpu", "--max-minutes", "1"]) == 0
    loaded = load_checkpoint(ckpt)
    assert loaded.config.latent_dim == 8 and loaded.config.variant() == "mla8"
    model = loaded.model.eval()
    again = load_checkpoint(ckpt).model.eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
    events = history(15)
    state, hidden, _ = model.prefill(events)
    assert state.kind == "latent" and state.token_names() == {"c", "kr"}
    assert state.layers[0].tokens["c"].shape == (1, 15, 8)
    torch.testing.assert_close(padded_forward(model, events)[0, -1], hidden, atol=1e-5, rtol=0)
