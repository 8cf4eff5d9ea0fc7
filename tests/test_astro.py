"""ASTRO (models.astro): attention inside sub-sequences, a temperature per sub-sequence, gated fusion.

Beside tests/test_exactness.py, which runs every registered backbone: what makes ASTRO ASTRO (an event
never sees another sub-sequence, each sub-sequence's temperature acts on it alone, the gate weighs the
sub-sequences present and only those), exactness with learned temperatures and gates, target-aware
ranking equal to the training pass, attention MACs that show the partitioning, and its state through
the codec, the policies and the live service."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvrec.compression import PolicyContext, decode_state, encode_state, parse_policy
from kvrec.compression.base import PolicyError
from kvrec.models.astro import BLOCK, PARTITIONS, partition_of
from kvrec.models.checkpoint import save_checkpoint
from kvrec.models.data import build_dataset, leave_one_out
from kvrec.models.evaluate import evaluate
from kvrec.models.recommender import ModelConfig, Targets
from kvrec.models.registry import build_model
from kvrec.models.state import Events
from kvrec.models.train import TrainConfig, train

ITEMS = 50


def astro(ranking_head: bool = False, kind: str = "astro"):
    """A tiny model whose biases, temperatures and gates are random, so that each of them matters."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, num_items=ITEMS, dim=16, heads=2, d_k=8, d_v=8, max_len=50,
                                    dropout=0.0, obs_window=8, ranking_head=ranking_head)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias") or name.endswith("log_temperature"):
                p.normal_(0, 0.5)
    return model


def history(n: int, seed: int = 0, behaviours: tuple[int, ...] = (0, 1, 2, 3, 4)) -> Events:
    """Events with actions drawn from `behaviours` (Taobao's pv 1, cart 2, fav 3, buy 4; 0: none)."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.tensor(behaviours)[torch.randint(0, len(behaviours), (n,), generator=g)]
    return Events.of(torch.randint(0, ITEMS, (n,), generator=g),
                     1_500_000_000 + torch.cumsum(torch.randint(0, 5000, (n,), generator=g), 0), actions)


def keys_of(state, layer: int, p: int) -> torch.Tensor:
    """Layer `layer`'s keys [H, T_p, d_k] of the tokens of sub-sequence p."""
    part = state.layers[layer]
    return part.tokens["k"][:, part.tokens["part"][0, :, p] > 0]


def test_partition_by_behaviour_and_by_blocks_without_actions():
    actions = torch.tensor([1, 2, 3, 4, 5, 0, 0, 0, 0])
    pos = torch.tensor([7, 8, 9, 10, 11, 0, BLOCK - 1, BLOCK, PARTITIONS * BLOCK])
    assert partition_of(actions, pos).tolist() == [0, 1, 2, 3, 0, 0, 0, 1, 0]  # pv, cart, fav, buy own one each


def test_extend_equals_prefill_and_training_with_learned_temperatures():
    """The exactness invariant with every ASTRO parameter away from its initial value: any split and
    chunking, and the padded training pass at every position."""
    model = astro()
    events = history(70, seed=1)
    full, hidden, _ = model.prefill(events)
    for split, chunk in ((0, 1), (13, 5), (40, 64), (69, 1)):
        state, last, _ = model.prefill(events[:split])
        for start in range(split, 70, chunk):
            state, last, _ = model.extend(state, events[start:start + chunk])
        torch.testing.assert_close(last, hidden, atol=1e-5, rtol=0)
        for a, b in zip(state.layers, full.layers):
            for name in ("k", "v", "part"):
                torch.testing.assert_close(a.tokens[name], b.tokens[name], atol=1e-5, rtol=0)
    pad = 3
    padded = lambda t: torch.cat([torch.zeros(pad, dtype=t.dtype), t])[None]
    with torch.no_grad():
        out = model(padded(events.items), padded(events.ts), padded(events.actions),
                    torch.arange(70 + pad)[None] >= pad)[0, pad:]  # [70, D]
    for t in (0, 16, 33, 69):
        torch.testing.assert_close(out[t], model.prefill(events[:t + 1])[1], atol=1e-5, rtol=0)


def test_an_event_attends_only_to_its_own_sub_sequence():
    """Changing one early event changes the top layer's keys of its sub-sequence from then on, and no
    other sub-sequence's; the user vector still changes, because the fusion reads every sub-sequence."""
    model, events = astro(), history(40, seed=2, behaviours=(1, 2, 3, 4))
    changed = Events(events.items.clone(), events.ts, events.actions)
    changed.items[5] = (changed.items[5] + 1) % ITEMS
    q = int(partition_of(events.actions[5:6], torch.tensor([5])))
    before, hidden, _ = model.prefill(events)
    after, other_hidden, _ = model.prefill(changed)
    top = model.cfg.layers - 1
    for p in range(PARTITIONS):
        if p == q:
            assert not torch.allclose(keys_of(before, top, p), keys_of(after, top, p))
        else:
            assert torch.equal(keys_of(before, top, p), keys_of(after, top, p)), p
    assert not torch.allclose(hidden, other_hidden)


def test_each_sub_sequence_has_its_own_temperature():
    model, events = astro(), history(40, seed=3, behaviours=(1, 2, 3, 4))
    before, _, _ = model.prefill(events)
    with torch.no_grad():
        model.blocks[0].log_temperature[2] += 1.0  # sub-sequence 2 (favourites), first layer, all heads
    after, _, _ = model.prefill(events)
    for p in range(PARTITIONS):  # the first layer's output feeds the top layer's keys
        same = torch.equal(keys_of(before, 1, p), keys_of(after, 1, p))
        assert same == (p != 2), p


def test_the_gate_weighs_the_sub_sequences_present_and_ignores_absent_ones():
    model, events = astro(ranking_head=True), history(30, seed=4, behaviours=(1, 2))  # sub-sequences 0 and 1
    state, _, _ = model.prefill(events)
    cands, ts = torch.arange(10), int(events.ts[-1])
    # the user vector (retrieval) and the candidates' scores (ranking), each from its own gate
    for fusion, output in ((model.fusion, lambda: model.prefill(events)[1]),
                           (model.target_fusion, lambda: model.rank(state, cands, ts)[0])):
        before = output()
        with torch.no_grad():
            fusion.part_bias[3] += 5.0  # absent: nothing changes
        assert torch.equal(output(), before)
        with torch.no_grad():
            fusion.part_bias[1] += 5.0  # present: the fused vector moves towards sub-sequence 1
        assert not torch.allclose(output(), before, atol=1e-3)


def test_attention_macs_count_only_the_own_sub_sequence():
    """Without actions, 4 sub-sequences of 16-event blocks: a quarter of HSTU's attention work."""
    model, hstu = astro(), astro(kind="hstu")
    unit = model.cfg.layers * model.cfg.heads * (model.cfg.d_k + model.cfg.d_v)  # MACs per query-key pair
    events = history(1000, seed=5, behaviours=(0,))
    sizes = torch.bincount(partition_of(events.actions, torch.arange(1000)), minlength=PARTITIONS)  # [N_b]
    assert sizes.tolist() == [256, 256, 248, 240]
    state, _, stats = model.prefill(events, chunk=1000)
    # each query against the keys of its own sub-sequence (in one chunk the later ones too, masked but
    # computed, as HSTU counts them)
    assert stats.macs == unit * int((sizes ** 2).sum())
    assert stats.macs / hstu.prefill(events, chunk=1000)[2].macs == pytest.approx(0.25, abs=0.01)
    one = Events.of([3], [2_000_000_000], [0])  # position 1000: block 62, sub-sequence 2
    assert model.extend(state, one)[2].macs == unit * (248 + 1)
    assert hstu.extend(hstu.prefill(events)[0], one)[2].macs == unit * 1001


@pytest.mark.parametrize("cut_set", [(0, 1, 9, 25), (40,)])
def test_cached_ranking_equals_the_training_pass(cut_set):
    """As tests/test_ranking.py for HSTU and SASRec, with cuts where no or few sub-sequences exist yet."""
    model, events = astro(ranking_head=True), history(40, seed=6)
    per_cut = 5
    cands = torch.randint(0, ITEMS, (len(cut_set) * per_cut,), generator=torch.Generator().manual_seed(2))
    seen = torch.tensor(cut_set).repeat_interleave(per_cut)  # [C]
    ts = torch.where(seen > 0, events.ts[(seen - 1).clamp(min=0)], 0)
    pad = 3
    padded = lambda t: torch.cat([torch.zeros(pad, dtype=t.dtype), t])[None]
    with torch.no_grad():
        _, target_hidden = model(padded(events.items), padded(events.ts), padded(events.actions),
                                 torch.arange(40 + pad)[None] >= pad, Targets(cands[None], seen[None], ts[None]))
    want, _ = model.head(target_hidden[0])
    for i, cut in enumerate(cut_set):
        state, _, _ = model.prefill(events[:cut], chunk=7)
        got, engage = model.rank(state, cands[i * per_cut:(i + 1) * per_cut], int(ts[i * per_cut]))
        torch.testing.assert_close(got, want[i * per_cut:(i + 1) * per_cut], atol=1e-5, rtol=1e-5)
        assert ((engage > 0) & (engage < 1)).all()


def test_a_candidate_never_sees_another():
    model, events = astro(ranking_head=True), history(30, seed=7)
    state, _, _ = model.prefill(events)
    cands, ts = torch.arange(20), int(events.ts[-1])
    together, _ = model.rank(state, cands, ts, batch=64)
    alone = torch.cat([model.rank(state, cands[i:i + 1], ts)[0] for i in range(20)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.rank(state, cands, ts, batch=3)[0], together)
    assert not torch.allclose(model.rank(model.prefill(history(30, seed=8))[0], cands, ts)[0], together, atol=1e-4)
    with pytest.raises(ValueError, match="no ranking head"):
        astro().rank(state, cands, ts)


APPLIES = ["full", "fp16", "fp8", "int8", "int4:group=4", "window:budget=8", "h2o:budget=8,recent=4",
           "snapkv:budget=8,window=4", "knorm:budget=8", "merge:budget=8,recent=4", "pool:budget=8,window=4,chunk=4",
           "h2o:budget=8,recent=4+int8"]


@pytest.mark.parametrize("spec", APPLIES)
def test_policies_that_select_merge_or_encode_tensors_apply(spec):
    """Selection keeps each token's membership, merging shares it out, per-tensor storages keep every
    key in its sub-sequence; the model extends and ranks what the blob gives back, request after request."""
    model = astro(ranking_head=True)
    pipeline = parse_policy(spec, PolicyContext(model=model))
    state, _, stats = model.prefill(history(60, seed=9))
    for request in range(3):
        state = pipeline.compress(state, stats)
        decoded = decode_state(encode_state(state, pipeline, "m"), pipeline, "m")
        for kept, back in zip(state.layers, decoded.layers):
            member = kept.tokens["part"][0]  # [T, N_b]
            # shares of one token (to int4's precision, for tokens a previous request stored)
            torch.testing.assert_close(member.sum(1), torch.ones(kept.num_tokens), atol=1e-3, rtol=0)
            assert torch.equal(back.tokens["part"][0] > 0, member > 0)
            if pipeline.token is not None:
                assert kept.num_tokens <= 8
        state, hidden, stats = model.extend(decoded, history(7, seed=10 + request))
        scores, _ = model.rank(state, torch.arange(ITEMS), int(state.layers[0].ts[-1]))
        assert torch.isfinite(hidden).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("spec", ["kivi", "intact", "svd:rank=4", "think", "minicache"])
def test_kv_storages_refuse_the_state_at_parse(spec):
    """They would drop the membership and with it the partitioning."""
    with pytest.raises(PolicyError, match="'partitioned-kv' state also has part"):
        parse_policy(spec, PolicyContext(model=astro(), calibration=[history(20)]))


@pytest.mark.parametrize("spec", ["h2o:bytes=3000", "merge:bytes=3000+int8", "window:bytes=2500+int4:group=4"])
def test_byte_budget_is_never_exceeded(spec):
    model = astro()
    pipeline = parse_policy(spec, PolicyContext(model=model))
    state, _, stats = model.prefill(history(120, seed=11))
    for request in range(3):
        blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
        assert len(blob) <= int(spec.split("bytes=")[1].split("+")[0])
        state, _, stats = model.extend(decode_state(blob, pipeline, "m"), history(5, seed=20 + request))


def test_dense_bytes_count_the_membership():
    state = astro().empty_state()
    assert state.kind == "partitioned-kv"
    assert state.dense_bytes(100) == 100 * 2 * 4 * (2 * (8 + 8) + PARTITIONS)  # per layer K, V and 4 shares


@pytest.mark.asyncio
@pytest.mark.redis
@pytest.mark.parametrize("policy", ["full", "int8"])
async def test_served_end_to_end_on_redis(policy, tmp_path, client_for):
    """Retrieval and ranking requests on a stored ASTRO state: each answer equals what the model gives on
    the state the policy stored."""
    model = astro(ranking_head=True)
    path = tmp_path / "astro.ckpt"
    save_checkpoint(path, model, [str(i) for i in range(ITEMS)], "test")
    events = history(14, seed=12)
    body = lambda sl: [{"item_id": str(int(i)), "ts": int(t), "action": int(a)}
                       for i, t, a in zip(events.items[sl], events.ts[sl], events.actions[sl])]
    cands = [str(i) for i in range(0, ITEMS, 3)]
    async with client_for(model=path, policy=policy) as client:
        r1 = await client.post("/recommend", json={"user_id": "a", "events": body(slice(0, 12)), "k": 5})
        r2 = await client.post("/recommend", json={"user_id": "a", "events": body(slice(12, 14)), "k": 5,
                                                   "candidates": cands})
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    assert r1.json()["state"]["source"] == "miss" and r2.json()["state"]["source"] == "hit"
    assert r2.json()["mode"] == "ranking" and r2.json()["state"]["tokens_kept"] == 14 * 2
    pipeline = parse_policy(policy, PolicyContext(model=model))
    stored = lambda s: decode_state(encode_state(s, pipeline, "m"), pipeline, "m")
    first, hidden, _ = model.prefill(events[:12])
    assert [int(i["item_id"]) for i in r1.json()["items"]] == model.topk(hidden[None], 5)[1][0].tolist()
    second, _, _ = model.extend(stored(first), events[12:])  # ranked as extended, before its own encoding
    scores, _ = model.rank(second, torch.tensor([int(c) for c in cands]), int(events.ts[-1]))
    want = [cands[i] for i in scores.argsort(descending=True)[:5].tolist()]
    assert [i["item_id"] for i in r2.json()["items"]] == want


@pytest.mark.slow
def test_training_learns_a_sequential_pattern_with_behaviours():
    """Each user walks the catalogue in steps of +1, viewing, carting, favouring or buying at random:
    the next item follows from the last one whatever its behaviour, so the fusion must carry it across
    sub-sequences. Retrieval and the joint ranking task both train."""
    rng = np.random.default_rng(0)
    users, items, length = 40, 20, 30
    user = np.repeat([f"u{u}" for u in range(users)], length)
    item = np.concatenate([(rng.integers(items) + np.arange(length)) % items for _ in range(users)])
    dataset = build_dataset("walk", user, item.astype(str), np.tile(1000 + 60 * np.arange(length), users),
                            actions=rng.integers(1, 5, users * length))
    cfg = ModelConfig(kind="astro", dim=16, heads=2, d_k=8, d_v=8, max_len=20, dropout=0.0)
    quick = TrainConfig(epochs=20, batch_size=32, random_negatives=16, in_batch_negatives=16, patience=20, lr=3e-3)
    model, summary = train(dataset, cfg, quick, progress=False)
    split = leave_one_out(dataset)
    result = evaluate(model, split.train, split.test)
    assert result["ndcg@10"] > 0.5 and result["ndcg@10"] > 4 * result["popularity_ndcg@10"], result
    ranking = TrainConfig(**{**quick.__dict__, "epochs": 2, "task": "ranking"})
    ranked, summary = train(dataset, cfg, ranking, progress=False)
    assert ranked.target_fusion is not None and summary["epochs_run"] == 2
