"""Target-aware ranking (M-FALCON): candidates as target tokens over a cached state.

The defining properties: a candidate sees the whole cached history and itself, never another
candidate, so (1) ranking over a cached state equals the training pass that puts the candidates in the
window under M-FALCON's mask, at any cut point, and (2) a candidate's score does not depend on which
other candidates share its batch or on the batch size."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression.spec import parse_policy
from kvrec.compression.step import ServingStep
from kvrec.models.recommender import ModelConfig, Targets
from kvrec.models.registry import build_model
from kvrec.models.state import Events


def ranking_model(kind: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, num_items=50, dim=16, heads=2, d_k=8, d_v=8, dropout=0.0,
                                    ranking_head=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # position and time matter, as in a trained model
    return model


def history(n: int, seed: int = 1) -> Events:
    gen = torch.Generator().manual_seed(seed)
    return Events.of(torch.randint(0, 50, (n,), generator=gen),
                     torch.cumsum(torch.randint(0, 5000, (n,), generator=gen), 0),
                     torch.randint(0, 10, (n,), generator=gen))


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_cached_ranking_equals_the_training_pass_at_every_cut(kind):
    model, events = ranking_model(kind), history(40)
    cuts, per_cut = [9, 25, 40], 5
    cands = torch.randint(0, 50, (len(cuts) * per_cut,), generator=torch.Generator().manual_seed(2))
    seen = torch.tensor(cuts).repeat_interleave(per_cut)  # [C]: three cut points in one pass
    ts = events.ts[seen - 1]  # each target at the time of the last event it sees
    pad = 3  # left padding must not matter
    padded = lambda t: torch.cat([torch.zeros(pad, dtype=t.dtype), t])[None]
    valid = padded(torch.ones(len(events), dtype=torch.bool))
    with torch.no_grad():
        _, target_hidden = model(padded(events.items), padded(events.ts), padded(events.actions), valid,
                                 Targets(cands[None], seen[None], ts[None]))
    want, _ = model.head(target_hidden[0])  # [C]
    for i, cut in enumerate(cuts):
        state, _, _ = model.prefill(events[:cut], chunk=7)
        got, _ = model.rank(state, cands[i * per_cut:(i + 1) * per_cut], int(events.ts[cut - 1]))
        torch.testing.assert_close(got, want[i * per_cut:(i + 1) * per_cut], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_a_candidate_never_sees_another(kind):
    model, events = ranking_model(kind), history(30)
    state, _, _ = model.prefill(events)
    cands = torch.arange(20)
    together, engage = model.rank(state, cands, int(events.ts[-1]), batch=64)
    alone = torch.cat([model.rank(state, cands[i:i + 1], int(events.ts[-1]))[0] for i in range(20)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.rank(state, cands, int(events.ts[-1]), batch=3)[0], together)
    assert ((engage > 0) & (engage < 1)).all()
    # and the history matters: the same candidates over another history score differently
    other, _, _ = model.prefill(history(30, seed=9))
    assert not torch.allclose(model.rank(other, cands, int(events.ts[-1]))[0], together, atol=1e-4)


@pytest.mark.parametrize("spec", ["int8", "h2o:budget=20,recent=8"])
def test_candidates_rank_against_a_compressed_state(spec):
    """A policy's loss shows in the ranking: the candidates attend to what it kept."""
    model, events = ranking_model("hstu"), history(40)
    state, _, _ = model.prefill(events)
    step = ServingStep(model, parse_policy(spec), "test")
    squeezed = step.restore(step.advance(step.start(), events).blob)  # what the next request would rank on
    cands = torch.arange(50)
    exact, _ = model.rank(state, cands, int(events.ts[-1]))
    lossy, _ = model.rank(squeezed, cands, int(events.ts[-1]))
    assert squeezed.tokens_kept() <= state.tokens_kept()
    assert not torch.equal(exact, lossy)
    assert torch.corrcoef(torch.stack([exact, lossy]))[0, 1] > 0.5


def test_a_model_without_a_ranking_head_says_so():
    model = build_model(ModelConfig(num_items=50, dim=16, heads=2, d_k=8, d_v=8))
    state, _, _ = model.prefill(history(5))
    with pytest.raises(ValueError, match="no ranking head"):
        model.rank(state, torch.arange(3), 0)
