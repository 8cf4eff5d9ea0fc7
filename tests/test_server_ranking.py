"""Ranking mode over HTTP: candidates sent with a model that has a ranking head are target tokens over
the user's stored state; without candidates, or without a head, the service ranks by retrieval and
says so in `mode`."""

from __future__ import annotations

import pytest
import torch
from kvrec.models.checkpoint import load_checkpoint, save_checkpoint
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]


@pytest.fixture(scope="module")
def ranking_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = build_model(ModelConfig(num_items=50, dim=16, heads=2, d_k=8, d_v=8, dropout=0.0,
                                    ranking_head=True)).eval()
    path = tmp_path_factory.mktemp("model") / "tiny-ranking.ckpt"
    save_checkpoint(path, model, [str(i) for i in range(50)], "test")
    return path


async def test_candidates_are_ranked_by_the_head_over_the_stored_state(client_for, ranking_checkpoint):
    first = [{"item_id": str(i), "ts": 1_000 + 60 * i, "action": 1} for i in (4, 8, 15)]
    later = [{"item_id": "23", "ts": 2_000, "action": 2}]
    candidates = [str(i) for i in range(10, 30)]
    async with client_for(model=ranking_checkpoint) as client:
        r = await client.post("/recommend", json={"user_id": "r1", "events": first, "k": 5})
        assert r.json()["mode"] == "retrieval"  # no candidates: the catalogue, by retrieval
        r = await client.post("/recommend", json={"user_id": "r1", "events": later, "candidates": candidates,
                                                  "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["mode"] == "ranking"
    assert body["state"]["source"] == "hit"  # the candidates attended to the stored state, extended
    model = load_checkpoint(ranking_checkpoint).model
    history = Events.of([4, 8, 15, 23], [1_240, 1_480, 1_900, 2_000], [1, 1, 1, 2])
    state, _, _ = model.prefill(history)
    relevance, _ = model.rank(state, torch.arange(10, 30), ts=2_000)
    top, order = relevance.topk(5)
    assert [i["item_id"] for i in body["items"]] == [str(10 + i) for i in order.tolist()]
    assert [i["score"] for i in body["items"]] == pytest.approx(top.tolist(), abs=1e-5)


async def test_a_model_without_a_head_answers_candidates_by_retrieval(client_for):
    async with client_for() as client:  # the tiny HSTU of conftest: no ranking head
        r = await client.post("/recommend", json={"user_id": "r2", "events": [{"item_id": "1", "ts": 5}],
                                                  "candidates": ["2", "3"], "k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "retrieval"
