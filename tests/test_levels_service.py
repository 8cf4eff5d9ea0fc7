"""Every trained level of memory reduction goes through the live service unchanged: a checkpoint of each
variant is served on a real Redis with a post-hoc policy stacked on it, and the second request's answer
is the one the serving step computes from the stored, extended state. The stored bytes show the level:
a fixed-size state stays the same size, a K/V state grows with the history."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import parse_policy
from kvrec.compression.base import PolicyContext
from kvrec.compression.step import ServingStep
from kvrec.models import registry
from kvrec.models.checkpoint import save_checkpoint
from kvrec.models.recommender import ModelConfig
from kvrec.models.state import Events

ITEMS = 30

# (ModelConfig overrides, policy stacked on it, whether the state is fixed-size)
VARIANTS = {
    "hstu-mqa": (dict(kind="hstu", heads=4, d_k=8, d_v=8, kv_heads=1), "h2o:budget=8,recent=4+int8", False),
    "sasrec-gqa": (dict(kind="sasrec", heads=4, d_k=8, d_v=8, kv_heads=2), "kivi:bits=2,residual=4", False),
    "sasrec-mla": (dict(kind="sasrec", heads=4, d_k=8, d_v=8, latent_dim=12, rope_dim=4), "window:budget=8+int8",
                   False),
    "hstu-mla": (dict(kind="hstu", heads=4, d_k=8, d_v=8, latent_dim=12), "int4", False),
    "hstu-linear": (dict(kind="hstu", heads=2, d_k=8, d_v=8, recurrent="linear"), "int8", True),
    "hstu-memory": (dict(kind="hstu", heads=2, d_k=8, d_v=8, memory=6), "int8", True),
    "hstu-slots": (dict(kind="hstu", heads=2, d_k=8, d_v=8, slots=3, slot_window=6), "fp16", True),
}


def events_json(start: int, n: int) -> list[dict]:
    return [{"item_id": str((7 * i) % ITEMS), "ts": 100 + 60 * i} for i in range(start, start + n)]


def as_events(batch: list[dict]) -> Events:
    return Events.of([int(e["item_id"]) for e in batch], ts=[e["ts"] for e in batch])


@pytest.mark.asyncio
@pytest.mark.redis
@pytest.mark.parametrize("name", sorted(VARIANTS))
async def test_each_level_is_served_with_a_policy_on_top(name, tmp_path, client_for):
    overrides, spec, fixed_size = VARIANTS[name]
    torch.manual_seed(0)
    model = registry.build_model(ModelConfig(num_items=ITEMS, dim=16, dropout=0.0, **overrides)).eval()
    path = tmp_path / f"{name}.ckpt"
    checkpoint = save_checkpoint(path, model, [str(i) for i in range(ITEMS)], "test")
    first, second, third = events_json(0, 20), events_json(20, 3), events_json(23, 30)
    async with client_for(model=path, policy=spec) as client:
        answers = [await client.post("/recommend", json={"user_id": name, "events": batch, "k": 5})
                   for batch in (first, second, third)]
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    states = [a.json()["state"] for a in answers]
    assert [s["source"] for s in states] == ["miss", "hit", "hit"] and states[2]["events_seen"] == 53

    # the second answer is the serving step's over the stored state, extended
    step = ServingStep(model, parse_policy(spec, PolicyContext(model=model, checkpoint_path=path)),
                       checkpoint.fingerprint)
    stored = step.restore(step.advance(step.start(), as_events(first)).blob)
    hidden = step.advance(stored, as_events(second)).hidden
    expected = step.scores(hidden).topk(5).indices.tolist()
    assert [int(i["item_id"]) for i in answers[1].json()["items"]] == expected

    grew = states[2]["bytes"] > states[0]["bytes"]
    assert grew != fixed_size or "budget" in spec, (name, [s["bytes"] for s in states])
