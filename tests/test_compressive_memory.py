"""HSTU with an Infini-attention memory beside an exact window (`--memory W`, models.compressive_memory).

The `check_*` functions hold for any exact-window variant (tests/test_slots.py runs them on the slots):
chunked extension equals prefill and the training forward, the state keeps exactly the last W events
plus fixed tensors, storages and token policies behave as declared, ranking, training and checkpoints
work. The rest pins the memory itself to the paper's definition.
"""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import decode_state, encode_state, parse_policy
from kvrec.compression.base import PolicyContext, PolicyError
from kvrec.compression.codec import read_header
from kvrec.models.checkpoint import load_checkpoint
from kvrec.models.compressive_memory import CompressiveMemoryHSTU, MemoryBlock, sigma
from kvrec.models.recommender import ModelConfig, Targets
from kvrec.models.registry import build_model
from kvrec.models.state import Events
from test_recurrent import check_random_chunkings_equal_prefill, history, padded, stepwise

from kvrec.cli import main as kvrec

ITEMS, W = 40, 6


def tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = {"num_items": ITEMS, "dim": 16, "heads": 2, "d_k": 8, "d_v": 8, "max_len": 30, "dropout": 0.0,
           "memory": W, **kw}
    model = build_model(ModelConfig(**cfg)).eval()
    with torch.no_grad():  # untrained biases and gates are zero: randomise them so that they matter
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "beta")):
                p.normal_(0, 0.5)
    return model


# ---------------------------------------------------------------------------- any exact-window variant


def check_training_forward_equals_serving_at_every_position(model) -> None:
    histories = [history(n, seed=n) for n in (23, 9, 30)]
    expected = [stepwise(model, h) for h in histories]
    for left in (True, False):
        with torch.no_grad():
            out = model(*padded(histories, 32, left))
        for row, h in enumerate(histories):
            got = out[row, 32 - len(h):] if left else out[row, :len(h)]
            torch.testing.assert_close(got, expected[row], atol=1e-5, rtol=0)


def check_the_state_is_the_window_and_fixed_tensors(model, window: int) -> None:
    full = parse_policy("full", PolicyContext(model=model))
    states = [model.prefill(history(n), chunk=256)[0] for n in (100, 2000)]
    for state, n in zip(states, (100, 2000)):
        for part in state.layers:
            assert torch.equal(part.pos, torch.arange(n - window, n))  # the last W events, exactly
    blobs = [encode_state(s, full, "m") for s in states]
    assert len(blobs[0]) - read_header(blobs[0])[1] == len(blobs[1]) - read_header(blobs[1])[1]
    fixed = sum(t.numel() for part in states[0].layers for t in part.fixed.values())
    assert states[1].tensor_bytes() == 4 * (model.cfg.layers * window * 2 * (8 + 8) + fixed)
    back = decode_state(blobs[1], full, "m")
    assert back.kind == model.state_kind and back.events_consumed == 2000


def check_storages(model) -> None:
    """Per-tensor storages encode the window and the summary; K/V storages refuse (they would drop the
    summary); serving goes on from a decoded int8 state close to the exact one."""
    with pytest.raises(PolicyError, match="also has"):
        parse_policy("kivi:bits=2", PolicyContext(model=model))
    int8 = parse_policy("int8", PolicyContext(model=model))
    events = history(80, seed=4)
    state, _, _ = model.prefill(events[:60])
    blob = encode_state(state, int8, "m")
    assert len(blob) < 0.5 * len(encode_state(state, parse_policy("full"), "m"))
    restored = decode_state(blob, int8, "m")
    for a, b in zip(restored.layers, state.layers):
        for name, t in b.fixed.items():
            err = (a.fixed[name] - t).abs().max() / t.abs().max()
            assert 0 < err < 2e-2, name
    _, hidden, _ = model.extend(restored, events[60:])
    assert torch.nn.functional.cosine_similarity(hidden, model.prefill(events)[1], dim=0) > 0.99


def check_token_policies_on_the_window(model, window: int) -> None:
    """A token policy shrinks the exact window; the summary still takes what leaves it. The extras a
    policy carries (h2o's accumulated attention) stay aligned with the sliding window, and a policy
    whose budget holds the whole window changes nothing."""
    events = history(70, seed=7)
    exact = model.prefill(events)[1]
    for spec in ("h2o:budget=3", "merge:budget=3,threshold=-1", "window:budget=64"):
        pipeline = parse_policy(spec, PolicyContext(model=model))
        state, summaries = model.empty_state(), []
        for start in range(0, 70, 5):
            before = state
            state, hidden, stats = model.extend(state, events[start:start + 5])
            for name, per_layer in before.extras.items():  # carried per position as the window slides
                for old, new, part_old, part_new in zip(per_layer, state.extras[name], before.layers, state.layers):
                    was = dict(zip(part_old.pos.tolist(), old.unbind(-1)))
                    for pos, value in zip(part_new.pos.tolist(), new.unbind(-1)):
                        assert torch.equal(value, was.get(pos, torch.zeros_like(value))), (name, pos)
            state = decode_state(encode_state(pipeline.compress(state, stats), pipeline, "m"), pipeline, "m")
            for layer, part in enumerate(state.layers):
                assert part.num_tokens <= min(3 if "budget=3" in spec else window, window)
                assert bool((part.pos >= state.events_consumed - window).all())
                for per_layer in state.extras.values():
                    assert per_layer[layer].shape[-1] == part.num_tokens
            summaries.append(sum(t.abs().sum() for t in state.layers[0].fixed.values()))
        assert summaries[-1] > summaries[len(summaries) // 2] > 0  # evicted tokens still reach the summary
        if spec.startswith("window"):
            torch.testing.assert_close(hidden, exact, atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(hidden, exact, atol=1e-3)


def check_rank_equals_the_training_pass_with_targets(build) -> None:
    model = build(ranking_head=True)
    events = history(25, seed=5)
    candidates = torch.tensor([3, 7, 7, 11])
    ts = int(events.ts[-1]) + 60
    state, _, _ = model.prefill(events, chunk=7)
    relevance, _ = model.rank(state, candidates, ts, batch=3)
    targets = Targets(candidates[None], torch.full((1, 4), 25), torch.full((1, 4), ts))
    with torch.no_grad():
        _, target_hidden = model(events.items[None], events.ts[None], events.actions[None],
                                 torch.ones(1, 25, dtype=torch.bool), targets)
    torch.testing.assert_close(relevance, model.head(target_hidden[0])[0], atol=1e-5, rtol=0)
    assert relevance[1] == relevance[2]  # no target sees another


def check_a_training_step_lowers_the_loss(model, learned: str) -> None:
    model.train()
    items = torch.randint(0, ITEMS, (4, 24), generator=torch.Generator().manual_seed(0))
    ts = torch.arange(24).expand(4, 24) * 60
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        hidden = model(items[:, :-1], ts[:, :-1], torch.zeros_like(items[:, :-1]), torch.ones(4, 23, dtype=torch.bool))
        loss = torch.nn.functional.cross_entropy(model.score(hidden.reshape(-1, 16)) / 0.1, items[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(getattr(b, learned).grad.abs().sum() > 0 for b in model.blocks)  # trained end to end
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def check_kvrec_train_and_checkpoint(tmp_path, flags: list[str], cls) -> None:
    out = tmp_path / "model.ckpt"
    assert kvrec(["train", "--model", "hstu", *flags, "--dataset", "synth-short:users=30,items=60,mean_len=30",
                  "--out", str(out), "--dim", "16", "--head-dim", "8", "--max-len", "20", "--epochs", "2",
                  "--batch-size", "16", "--negatives", "8", "--device", "cpu", "--threads", "1"]) == 0
    model = load_checkpoint(out).model
    assert type(model) is cls
    events = Events.of(history(40, seed=6).items % model.cfg.num_items)
    state, _, _ = model.prefill(events[:13])
    _, hidden, _ = model.extend(state, events[13:])
    torch.testing.assert_close(hidden, model.prefill(events)[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- the compressive memory


def test_the_registry_builds_the_memory_variant():
    model = tiny()
    assert type(model) is CompressiveMemoryHSTU and all(isinstance(b, MemoryBlock) for b in model.blocks)
    assert model.state_kind == "memory" and model.cfg.variant() == f"memory{W}"


def test_random_chunkings_equal_prefill():
    check_random_chunkings_equal_prefill(tiny())


def test_training_forward_equals_serving_at_every_position():
    check_training_forward_equals_serving_at_every_position(tiny())


def test_the_memory_holds_exactly_the_events_older_than_the_window():
    """Against the paper's linear update: M = sum sigma(k_s) v_s^T, z = sum sigma(k_s) over the events
    before the window (layer 0, whose input is the embedding)."""
    model = tiny()
    events = history(30, seed=3)
    state, _, _ = model.prefill(events, chunk=4)
    with torch.no_grad():
        _, k, v, _ = model.blocks[0].qkv(model.embed(events.items, events.actions)[None], None)  # [1, H, n, d]
    old = slice(0, 30 - W)
    part = state.layers[0]
    torch.testing.assert_close(part.fixed["mem"], sigma(k[0, :, old]).transpose(1, 2) @ v[0, :, old])
    torch.testing.assert_close(part.fixed["norm"], sigma(k[0, :, old]).sum(1))
    torch.testing.assert_close(part.tokens["k"], k[0, :, 30 - W:])


def test_an_open_gate_retrieves_the_mean_value_of_exactly_the_older_events():
    """One layer, gate open (sigmoid(30) = 1): the last event at position p reads only the memory of the
    events before p - W. When those are one repeated event, retrieval sigma(q) M / sigma(q) z is that
    event's value exactly: not normalised by z it would be 20 times it, and an event of the window also
    folded in (or the window's oldest left out) would pull it away."""
    model = tiny(layers=1)
    block = model.blocks[0]
    with torch.no_grad():
        block.beta.fill_(30.0)
    recent = history(W + 1, seed=9)
    events = Events.of(torch.cat([torch.full((20,), 5), recent.items]), ts=torch.arange(21 + W) * 60)
    with torch.no_grad():
        x = model.embed(events.items, events.actions)[None]  # [1, n, D]
        _, _, v, u = block.qkv(x, None)
        expected = model.final_norm(block.output(x[:, -1:], v[:, :, :1], u[:, -1:]))[0, 0]
    torch.testing.assert_close(model.prefill(events, chunk=5)[1], expected, atol=1e-5, rtol=0)


def test_a_merged_token_enters_the_memory_as_often_as_it_counts():
    """A token policy's merged token (weight 3) folds in as three copies of itself would."""
    block = tiny().blocks[0]
    summary = block.empty_summary(torch.device("cpu"))
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)  # [H, e, d]
    merged = block.fold(summary, k, v, torch.tensor([3.0, 1.0]))
    copies = block.fold(summary, k[:, [0, 0, 0, 1]], v[:, [0, 0, 0, 1]], torch.ones(4))
    for name in merged:
        torch.testing.assert_close(merged[name], copies[name])


def test_the_gate_chooses_between_memory_and_window():
    """Closed gate: an event further back than layers x (W + 1) cannot reach the last hidden (each layer
    sees W back); open, it reaches it through the memory."""
    events = history(40, seed=8)
    changed = Events(events.items.clone(), events.ts, events.actions)
    changed.items[0] = (changed.items[0] + 1) % ITEMS
    for beta, reaches in ((-30.0, False), (0.0, True)):
        model = tiny()
        with torch.no_grad():
            for block in model.blocks:
                block.beta.fill_(beta)
        a, b = model.prefill(events)[1], model.prefill(changed)[1]
        assert (not torch.allclose(a, b, atol=1e-4)) == reaches, beta


def test_the_state_is_the_window_and_fixed_tensors():
    check_the_state_is_the_window_and_fixed_tensors(tiny(), W)


def test_storages():
    check_storages(tiny())


def test_token_policies_on_the_window():
    check_token_policies_on_the_window(tiny(), W)


def test_rank_equals_the_training_pass_with_targets():
    check_rank_equals_the_training_pass_with_targets(tiny)


def test_a_training_step_lowers_the_loss():
    check_a_training_step_lowers_the_loss(tiny(), "beta")


def test_kvrec_train_end_to_end_and_the_checkpoint_round_trips(tmp_path):
    check_kvrec_train_and_checkpoint(tmp_path, ["--memory", "4"], CompressiveMemoryHSTU)
