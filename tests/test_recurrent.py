"""HSTU with decayed linear attention (`--recurrent linear`, models.linear_attention): the recurrent form
is the parallel form, for any chunking; the state is a fixed size; storages and policies behave as the
state kind declares; ranking, training and checkpoints work end to end."""

from __future__ import annotations

import math

import pytest
import torch
from kvrec.compression import decode_state, encode_state, parse_policy
from kvrec.compression.base import PolicyContext, PolicyError
from kvrec.compression.codec import read_header
from kvrec.models.checkpoint import load_checkpoint
from kvrec.models.linear_attention import LinearBlock, LinearHSTU
from kvrec.models.recommender import ModelConfig, Targets
from kvrec.models.registry import build_model
from kvrec.models.state import Events

from kvrec.cli import main as kvrec

ITEMS = 40


def tiny(seed: int = 0, **kw) -> LinearHSTU:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=ITEMS, dim=16, heads=2, d_k=8, d_v=8, max_len=30, dropout=0.0, recurrent="linear",
                      **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():  # decays spread out (RetNet's start at 0.97 and 0.98) so the exponents matter
        for block in model.blocks:
            block.decay.copy_(torch.logit(torch.tensor([0.6, 0.9])))
    return model


def history(n: int, seed: int = 0) -> Events:
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 5000, (n,), generator=g)
    return Events(torch.randint(0, ITEMS, (n,), generator=g), 1_600_000_000 + gaps.cumsum(0),
                  torch.randint(0, 5, (n,), generator=g))


def random_chunks(n: int, gen: torch.Generator) -> list[slice]:
    out, start = [], 0
    while start < n:
        size = int(torch.randint(1, max(2, n // 3), (1,), generator=gen))
        out.append(slice(start, start + size))
        start += size
    return out


def stepwise(model, events: Events) -> torch.Tensor:
    """The hidden after every event, one extend per event: [n, D]."""
    state, hiddens = model.empty_state(), []
    for i in range(len(events)):
        state, hidden, _ = model.extend(state, events[i:i + 1])
        hiddens.append(hidden)
    return torch.stack(hiddens)


def padded(histories: list[Events], width: int, left: bool):
    items = torch.zeros(len(histories), width, dtype=torch.long)
    ts, actions, valid = torch.zeros_like(items), torch.zeros_like(items), torch.zeros_like(items, dtype=torch.bool)
    for row, h in enumerate(histories):
        sl = slice(width - len(h), width) if left else slice(0, len(h))
        items[row, sl], ts[row, sl], actions[row, sl], valid[row, sl] = h.items, h.ts, h.actions, True
    return items, ts, actions, valid


def test_the_registry_builds_the_recurrent_variant():
    model = tiny()
    assert type(model) is LinearHSTU and all(isinstance(b, LinearBlock) for b in model.blocks)
    assert model.state_kind == "recurrent" and model.cfg.variant() == "linear"


def check_random_chunkings_equal_prefill(model) -> None:
    """Any chunking of a history extends to the state and hidden of one prefill (token and fixed tensors)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        events = history(int(torch.randint(1, 90, (1,), generator=gen)), seed=trial)
        full, hidden, _ = model.prefill(events)
        state = model.empty_state()
        for sl in random_chunks(len(events), gen):
            state, last, _ = model.extend(state, events[sl])
        torch.testing.assert_close(last, hidden, atol=1e-5, rtol=0)
        for a, b in zip(state.layers, full.layers):
            assert torch.equal(a.pos, b.pos)
            for name, t in b.tensors().items():
                torch.testing.assert_close(a.tensors()[name], t, atol=1e-5, rtol=1e-5)


def test_random_chunkings_equal_prefill():
    check_random_chunkings_equal_prefill(tiny())


def test_training_forward_equals_serving_at_every_position():
    """The parallel (masked) form and the recurrent form give every event the same hidden, under left
    and right padding."""
    model = tiny()
    histories = [history(n, seed=n) for n in (23, 9, 30)]
    expected = [stepwise(model, h) for h in histories]
    for left in (True, False):
        with torch.no_grad():
            out = model(*padded(histories, 32, left))
        for row, h in enumerate(histories):
            got = out[row, 32 - len(h):] if left else out[row, :len(h)]
            torch.testing.assert_close(got, expected[row], atol=1e-5, rtol=0)


def test_the_state_is_the_decayed_sum_of_outer_products():
    """Against the definition, event by event: S_n = sum_s gamma^(n-1-s) k_s v_s^T (layer 0, whose
    input is the embedding). Training and serving sharing one wrong exponent would pass the tests above."""
    model = tiny()
    events = history(20, seed=3)
    state, _, _ = model.prefill(events)
    block = model.blocks[0]
    with torch.no_grad():
        _, k, v, _ = block.qkv(model.embed(events.items, events.actions)[None], None)  # [1, H, n, d]
        gamma = torch.sigmoid(block.decay)  # [H]
        s = torch.zeros_like(state.layers[0].fixed["s"])
        for t in range(len(events)):
            s = gamma[:, None, None] * s + k[0, :, t, :, None] * v[0, :, t, None, :]
    torch.testing.assert_close(state.layers[0].fixed["s"], s, atol=1e-5, rtol=1e-5)


def test_state_bytes_do_not_depend_on_the_history():
    model = tiny()
    full = parse_policy("full", PolicyContext(model=model))
    short, long_ = (model.prefill(history(n))[0] for n in (100, 2000))
    blobs = [encode_state(s, full, "m") for s in (short, long_)]
    payloads = [len(blob) - read_header(blob)[1] for blob in blobs]
    assert payloads[0] == payloads[1] == 2 * 2 * 8 * 8 * 4 + 16 * 4  # the matrices and the last hidden
    assert abs(len(blobs[0]) - len(blobs[1])) <= 8  # the header's event count has one more digit
    assert short.tokens_kept() == long_.tokens_kept() == 0
    assert short.tensor_bytes() == 2 * 2 * 8 * 8 * 4  # layers x H x d_k x d_v fp32, nothing else
    back = decode_state(blobs[1], full, "m")
    assert back.kind == "recurrent" and back.events_consumed == 2000
    torch.testing.assert_close(back.layers[1].fixed["s"], long_.layers[1].fixed["s"], atol=0, rtol=0)


@pytest.mark.parametrize("spec", ["h2o:budget=16", "window", "streaming+int8", "kivi:bits=2"])
def test_token_and_kv_policies_are_refused_with_a_reason(spec):
    with pytest.raises(PolicyError, match="'recurrent'") as info:
        parse_policy(spec, PolicyContext(model=tiny()))
    assert "int8" in str(info.value)  # the message lists what does apply


@pytest.mark.parametrize("spec,bound", [("fp16", 2e-3), ("int8", 2e-2)])
def test_per_tensor_storages_apply_and_serving_goes_on_from_the_decoded_state(spec, bound):
    model = tiny()
    pipeline = parse_policy(spec, PolicyContext(model=model))
    events = history(80, seed=4)
    state, _, _ = model.prefill(events[:60])
    blob = encode_state(state, pipeline, "m")
    assert len(blob) < len(encode_state(state, parse_policy("full"), "m"))
    restored = decode_state(blob, pipeline, "m")
    for a, b in zip(restored.layers, state.layers):
        err = (a.fixed["s"] - b.fixed["s"]).abs().max() / b.fixed["s"].abs().max()
        assert 0 < err < bound
    _, hidden, _ = model.extend(restored, events[60:])
    _, exact, _ = model.prefill(events)
    cos = torch.nn.functional.cosine_similarity(hidden, exact, dim=0)
    assert cos > 0.99


def test_rank_equals_the_training_pass_with_targets():
    """Each target sees gamma S + its own k v^T: the same as the training pass's M-FALCON mask."""
    model = tiny(ranking_head=True)
    events = history(15, seed=5)
    candidates = torch.tensor([3, 7, 7, 11])
    ts = int(events.ts[-1]) + 60
    state, _, _ = model.prefill(events)
    relevance, _ = model.rank(state, candidates, ts, batch=3)  # batches must not matter either
    targets = Targets(candidates[None], torch.full((1, 4), 15), torch.full((1, 4), ts))
    with torch.no_grad():
        _, target_hidden = model(events.items[None], events.ts[None], events.actions[None],
                                 torch.ones(1, 15, dtype=torch.bool), targets)
    torch.testing.assert_close(relevance, model.head(target_hidden[0])[0], atol=1e-5, rtol=0)
    assert relevance[1] == relevance[2]  # no target sees another


def test_a_training_step_lowers_the_loss():
    """Gradients reach the decay (learned) and the projections: a few steps fit a batch."""
    model = tiny()
    model.train()
    items = torch.randint(0, ITEMS, (4, 12), generator=torch.Generator().manual_seed(0))
    ts = torch.arange(12).expand(4, 12) * 60
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        hidden = model(items[:, :-1], ts[:, :-1], torch.zeros_like(items[:, :-1]), torch.ones(4, 11, dtype=torch.bool))
        logits = model.score(hidden.reshape(-1, 16)) / 0.1
        loss = torch.nn.functional.cross_entropy(logits, items[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(b.decay.grad is not None and b.decay.grad.abs().sum() > 0 for b in model.blocks)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_kvrec_train_end_to_end_and_the_checkpoint_round_trips(tmp_path):
    out = tmp_path / "linear.ckpt"
    assert kvrec(["train", "--model", "hstu", "--recurrent", "linear", "--dataset",
                  "synth-short:users=30,items=60,mean_len=30", "--out", str(out), "--dim", "16", "--head-dim", "8",
                  "--max-len", "20", "--epochs", "2", "--batch-size", "16", "--negatives", "8", "--device", "cpu",
                  "--threads", "1"]) == 0
    ckpt = load_checkpoint(out)
    model = ckpt.model
    assert type(model) is LinearHSTU and model.cfg.recurrent == "linear"
    trained = float(torch.sigmoid(model.blocks[0].decay[0].detach()))
    assert not math.isclose(trained, 1 - 2 ** -5, rel_tol=1e-6)  # the decay learned, from RetNet's start
    events = Events.of(history(25, seed=6).items % model.cfg.num_items)
    state, hidden, _ = model.prefill(events[:10])
    _, hidden, _ = model.extend(state, events[10:])
    torch.testing.assert_close(hidden, model.prefill(events)[1], atol=1e-5, rtol=0)
