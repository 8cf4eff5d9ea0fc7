"""StreamingLLM: after eviction the cache behaves as if its sinks and window sat contiguously, the
positions within the cache, for rotary keys (SASRec) and relative biases (HSTU) alike."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import PolicyContext, PolicyError, parse_policy
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events


def one_layer(kind: str):
    """A single layer, so a token's key depends on its own event and position only, and a fresh
    prefill of the kept events is the reference."""
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, num_items=50, dim=16, layers=1, heads=2, d_k=8, d_v=8,
                                   dropout=0.0)).eval()


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
def test_streaming_cache_equals_its_tokens_laid_out_contiguously(kind):
    model = one_layer(kind)
    g = torch.Generator().manual_seed(1)
    history = Events.of(torch.randint(0, 50, (80,), generator=g), ts=torch.arange(80) * 7)
    pipeline = parse_policy("streaming:sink=3,window=9", PolicyContext(model=model))
    state, _, stats = model.prefill(history[:40])
    state = pipeline.compress(state, stats)
    for start in range(40, 80, 10):  # request after request, the sinks move again each time
        kept = state.pos[0].tolist()
        assert kept == list(range(kept[3] - 3, kept[3] + 9))  # contiguous: sinks right before the window
        new = history[start:start + 10]
        sinks_then_window = torch.tensor(list(range(3)) + list(range(start - 9, start)))  # original indices
        reference, _, _ = model.prefill(Events.cat([history[sinks_then_window], new]))
        state, hidden, stats = model.extend(state, new)
        torch.testing.assert_close(hidden, reference.last_hidden, atol=1e-5, rtol=1e-5)
        state = pipeline.compress(state, stats)
    assert state.ts[0][:3].tolist() == [0, 7, 14]  # times stay the events' own


def test_streaming_needs_the_model_to_move_positions():
    state, _, _ = one_layer("sasrec").prefill(Events.of(torch.arange(20) % 50))
    with pytest.raises(PolicyError, match="PolicyContext"):
        parse_policy("streaming:sink=2,window=4").compress(state, None)
