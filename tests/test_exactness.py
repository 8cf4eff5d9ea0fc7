"""The invariant everything rests on: extending a cached prefix state gives exactly the scores of a full
prefill, for both models, any split point and any chunking, and padded batched training agrees too."""

import pytest
import torch
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import MODELS, build_model
from kvrec.models.state import Events

NUM_ITEMS = 60


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind=kind, num_items=NUM_ITEMS, dim=16, heads=2, d_k=8, d_v=8, max_len=50,
                                    dropout=0.0)).eval()
    # untrained biases are zero: randomise them so relative position and time actually matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)
    return model


def random_history(gen: torch.Generator, length: int) -> Events:
    items = torch.randint(0, NUM_ITEMS + 1, (length,), generator=gen)  # NUM_ITEMS itself is the OOV id
    gaps = torch.randint(0, 100_000, (length,), generator=gen)
    gaps[torch.rand(length, generator=gen) < 0.2] = 0  # ties in time
    actions = torch.randint(0, 11, (length,), generator=gen)
    return Events(items, 1_500_000_000 + gaps.cumsum(0), actions)


def extend_in_chunks(model, history: Events, split: int, chunk: int):
    state, hidden, _ = model.prefill(history[:split])
    for start in range(split, len(history), chunk):
        state, hidden, _ = model.extend(state, history[start:start + chunk])
    return state, hidden


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_incremental_equals_prefill(kind):
    model = tiny_model(kind)
    gen = torch.Generator().manual_seed(1)
    candidates = torch.arange(NUM_ITEMS)[None]
    for trial in range(12):
        length = int(torch.randint(1, 160, (1,), generator=gen))
        history = random_history(gen, length)
        full_state, full_hidden, _ = model.prefill(history)
        full_scores = model.score(full_hidden[None], candidates)
        full_top = model.topk(full_hidden[None], 10)[1]
        splits = {0, length, int(torch.randint(0, length + 1, (1,), generator=gen))}
        for split in splits:
            for chunk in (1, 3, 17, 64):
                state, hidden = extend_in_chunks(model, history, split, chunk)
                assert state.events_consumed == length
                scores = model.score(hidden[None], candidates)
                torch.testing.assert_close(scores, full_scores, atol=1e-5, rtol=0)
                assert torch.equal(model.topk(hidden[None], 10)[1], full_top), (trial, split, chunk)
                for layer in range(model.cfg.layers):
                    torch.testing.assert_close(state.k[layer], full_state.k[layer], atol=1e-5, rtol=0)
                    torch.testing.assert_close(state.v[layer], full_state.v[layer], atol=1e-5, rtol=0)
                    assert torch.equal(state.pos[layer], torch.arange(length))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_state_grows_past_training_window(kind):
    """Relative positions: a history four times the training window still extends exactly."""
    model = tiny_model(kind)
    history = random_history(torch.Generator().manual_seed(2), 4 * model.cfg.max_len)
    _, full_hidden, _ = model.prefill(history, chunk=37)
    _, hidden = extend_in_chunks(model, history, 150, 5)
    torch.testing.assert_close(hidden, full_hidden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_batched_forward_matches_prefill_with_padding(kind):
    """Training's padded batch (left and right padding) gives every user the hidden of its own prefill."""
    model = tiny_model(kind)
    gen = torch.Generator().manual_seed(3)
    histories = [random_history(gen, n) for n in (5, 31, 18)]
    width = 40
    for left in (True, False):
        items = torch.zeros(3, width, dtype=torch.long)
        ts, actions = torch.zeros_like(items), torch.zeros_like(items)
        valid = torch.zeros(3, width, dtype=torch.bool)
        for row, h in enumerate(histories):
            sl = slice(width - len(h), width) if left else slice(0, len(h))
            items[row, sl], ts[row, sl], actions[row, sl], valid[row, sl] = h.items, h.ts, h.actions, True
        with torch.no_grad():
            hidden = model(items, ts, actions, valid)
        for row, h in enumerate(histories):
            last = width - 1 if left else len(h) - 1
            torch.testing.assert_close(hidden[row, last], model.prefill(h)[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_extend_reports_attention_of_new_queries(kind):
    model = tiny_model(kind)
    history = random_history(torch.Generator().manual_seed(4), 40)
    state, _, _ = model.prefill(history[:30])
    new_state, _, stats = model.extend(state, history[30:])
    for layer in range(model.cfg.layers):
        assert stats.received[layer].shape == (model.cfg.heads, 40)
        assert stats.window[layer].shape == (model.cfg.heads, 10, 40)
        # the last new query sees every key; the first new query cannot see the nine after it
        assert torch.all(stats.window[layer][:, 0, 31:] == 0)
        assert torch.all(stats.received[layer] >= 0)
        if kind == "sasrec":  # softmax rows sum to one
            torch.testing.assert_close(stats.window[layer].sum(-1), torch.ones(model.cfg.heads, 10))
    assert new_state.events_consumed == 40 and state.events_consumed == 30  # input state untouched
    assert state.k[0].shape[1] == 30


def test_empty_extend_keeps_state_and_hidden():
    model = tiny_model("hstu")
    history = random_history(torch.Generator().manual_seed(5), 12)
    state, hidden, _ = model.prefill(history)
    same, same_hidden, _ = model.extend(state, history[12:])
    assert same.events_consumed == 12
    assert torch.equal(same_hidden, hidden)


def test_topk_excludes_seen_items():
    model = tiny_model("sasrec")
    history = random_history(torch.Generator().manual_seed(6), 20)
    _, hidden, _ = model.prefill(history)
    top = model.topk(hidden[None], 10)[1][0]
    excluded = model.topk(hidden[None], 10, exclude=[top[:5]])[1][0]
    assert not set(top[:5].tolist()) & set(excluded.tolist())
    assert excluded[:5].tolist() == top[5:].tolist()


def test_catalogue_scores_follow_weight_updates():
    """Serving caches the normalised catalogue; loading other weights must not serve stale vectors."""
    model = tiny_model("hstu")
    hidden = torch.randn(1, model.cfg.dim)
    with torch.no_grad():
        before = model.score(hidden)
        other = tiny_model("hstu", seed=1)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model.score(hidden), other.score(hidden))
        assert not torch.allclose(model.score(hidden), before)


def test_position_buckets_saturate_at_the_training_window():
    """Every distance past the training window shares the last bucket, the one training reaches."""
    from kvrec.models.recommender import log_bucket

    d = torch.tensor([0, 1, 15, 16, 40, 100, 200, 201, 5_000, 10**9])
    b = log_bucket(d, 32, max_distance=200)
    assert b[:3].tolist() == [0, 1, 15] and bool((b[1:] >= b[:-1]).all())
    assert b[6:].tolist() == [31] * 4 and b[5] < 31
