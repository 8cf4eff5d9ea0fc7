"""The state contract holds for a backbone whose state is not per-token K/V.

A test-only recurrent model (decayed linear attention: per layer and head a fixed-size matrix
S = sum_s gamma^(t-s) phi(k_s) v_s^T and its normaliser z) is defined here, registered, and then goes
through everything unchanged: exact incremental extension, the codec, policies refused or applied as
they declare, and the live service on a real Redis. Adding it touched this file only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvrec.compression import decode_state, encode_state, parse_policy
from kvrec.compression.base import PolicyContext, PolicyError
from kvrec.models import registry
from kvrec.models.checkpoint import save_checkpoint
from kvrec.models.recommender import Block, Extension, LayerStats, ModelConfig, SequentialRecommender, Window
from kvrec.models.state import Events, LayerState, State
from torch import Tensor, nn

KIND = "test-recurrent"
ITEMS = 30


def phi(x: Tensor) -> Tensor:
    """Positive feature map of linear attention (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1


class RecurrentBlock(Block):
    """Decayed linear attention: o_t = phi(q_t) S_t / (phi(q_t) . z_t), S_t = gamma S_{t-1} + phi(k_t) v_t^T."""

    state_kind = "recurrent"

    def __init__(self, cfg: ModelConfig, gamma: float = 0.9):
        super().__init__()
        self.cfg, self.gamma = cfg, gamma
        self.norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, cfg.heads * (2 * cfg.d_k + cfg.d_v))
        self.out = nn.Linear(cfg.heads * cfg.d_v, cfg.dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, n, D] -> phi(q), phi(k) [B, H, n, d_k], v [B, H, n, d_v]."""
        cfg, (b, n, _) = self.cfg, x.shape
        q, k, v = self.qkv(self.norm(x)).split([cfg.heads * cfg.d_k] * 2 + [cfg.heads * cfg.d_v], dim=-1)
        heads = lambda t: t.view(b, n, cfg.heads, -1).transpose(1, 2)
        return phi(heads(q)), phi(heads(k)), heads(v)

    def merge(self, x: Tensor, num: Tensor, den: Tensor) -> Tensor:
        """num [B, H, n, d_v], den [B, H, n] -> residual [B, n, D]."""
        b, h, n, d = num.shape
        return x + self.out((num / den[..., None]).transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: Tensor, window: Window) -> Tensor:
        q, k, v = self.project(x)
        dist = (window.pos[:, :, None] - window.pos[:, None, :]).clamp(min=0).float()  # [B, L, L]
        decay = self.gamma ** dist * window.mask  # [B, L, L]
        a = (q @ k.transpose(-1, -2)) * decay[:, None]  # [B, H, L, L]
        return self.merge(x, a @ v, a.sum(-1).clamp(min=1e-6))

    def empty_state(self, device: torch.device) -> LayerState:
        cfg = self.cfg
        return LayerState(fixed={"s": torch.zeros(cfg.heads, cfg.d_k, cfg.d_v, device=device),
                                 "z": torch.zeros(cfg.heads, cfg.d_k, device=device)})

    def extend(self, x: Tensor, part: LayerState, ext: Extension) -> tuple[Tensor, LayerState, LayerStats]:
        cfg, n = self.cfg, x.shape[1]
        q, k, v = (t[0] for t in self.project(x))  # [H, n, d]
        s, z = part.fixed["s"], part.fixed["z"]  # [H, d_k, d_v], [H, d_k]
        steps = torch.arange(n, device=x.device).float()
        old = self.gamma ** (steps + 1)  # [n] decay of the cached state at each new event
        within = self.gamma ** (steps[:, None] - steps[None, :]).clamp(min=0) * torch.ones(n, n).tril()  # [n, n]
        a = (q @ k.transpose(-1, -2)) * within  # [H, n, n]
        num = old[None, :, None] * (q @ s) + a @ v  # [H, n, d_v]
        den = old[None, :] * (q @ z[..., None])[..., 0] + a.sum(-1)  # [H, n]
        last = self.gamma ** (n - 1 - steps)  # [n] decay of each new event at the last one
        s = self.gamma ** n * s + (k * last[None, :, None]).transpose(1, 2) @ v
        z = self.gamma ** n * z + (k * last[None, :, None]).sum(1)
        x = self.merge(x, num[None], den[None].clamp(min=1e-6))
        macs = 2 * cfg.heads * n * cfg.d_k * cfg.d_v
        stats = LayerStats(torch.zeros(cfg.heads, 0), torch.zeros(cfg.heads, 0, 0), macs)
        return x, LayerState(fixed={"s": s, "z": z}), stats


class Recurrent(SequentialRecommender):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [RecurrentBlock(cfg) for _ in range(cfg.layers)])


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The model's registration: one entry in the registry, as a real backbone would add."""
    monkeypatch.setitem(registry.MODELS, KIND, Recurrent)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return registry.build_model(ModelConfig(kind=KIND, num_items=ITEMS, dim=16, heads=2, d_k=8, d_v=8,
                                            dropout=0.0)).eval()


def history(n: int, seed: int = 0) -> Events:
    g = torch.Generator().manual_seed(seed)
    return Events.of(torch.randint(0, ITEMS, (n,), generator=g), ts=torch.arange(n) * 60)


def test_extend_equals_prefill_for_every_split(model):
    events = history(40)
    full, hidden, _ = model.prefill(events)
    assert full.kind == "recurrent" and full.tokens_kept() == 0
    for t in (0, 1, 17, 39, 40):
        state, _, _ = model.prefill(events[:t])
        for start in range(t, 40, 7):  # the rest in chunks of 7
            state, last, _ = model.extend(state, events[start:start + 7])
        if t < 40:
            torch.testing.assert_close(last, hidden, atol=1e-5, rtol=0)
        for a, b in zip(state.layers, full.layers):
            for name in ("s", "z"):
                torch.testing.assert_close(a.fixed[name], b.fixed[name], atol=1e-5, rtol=0)


def test_training_forward_equals_serving_extend(model):
    """One code path per block: the padded training pass gives the hidden that serving gives."""
    events = history(25, seed=1)
    _, hidden, _ = model.prefill(events, chunk=6)
    pad = 3  # left padding must not change anything
    items = torch.cat([torch.zeros(pad, dtype=torch.long), events.items])[None]
    ts = torch.cat([torch.zeros(pad, dtype=torch.long), events.ts])[None]
    valid = torch.arange(25 + pad)[None] >= pad
    with torch.no_grad():
        out = model(items, ts, torch.zeros_like(items), valid)
    torch.testing.assert_close(out[0, -1], hidden, atol=1e-5, rtol=0)


def test_state_size_does_not_grow_with_the_history(model):
    full = parse_policy("full", PolicyContext(model=model))
    short = encode_state(model.prefill(history(5))[0], full, "m")
    long = encode_state(model.prefill(history(500))[0], full, "m")
    assert len(short) == len(long)
    decoded = decode_state(long, full, "m")
    assert decoded.kind == "recurrent" and decoded.events_consumed == 500


@pytest.mark.parametrize("spec", ["h2o:budget=16", "window", "kivi:bits=2", "svd:rank=4", "streaming+int8"])
def test_policies_that_need_tokens_or_kv_are_refused_at_parse(model, spec):
    with pytest.raises(PolicyError) as info:
        parse_policy(spec, PolicyContext(model=model))
    message = str(info.value)
    assert "'recurrent'" in message and "int8" in message and "fp16" in message and "h2o" not in message.split(":")[-1]


@pytest.mark.parametrize("spec,bound", [("fp16", 5e-3), ("int8", 2e-2), ("int4", 0.2)])
def test_per_tensor_storages_encode_the_fixed_state(model, spec, bound):
    pipeline = parse_policy(spec, PolicyContext(model=model))
    state, _, _ = model.prefill(history(60))
    blob = encode_state(state, pipeline, "m")
    full_blob = encode_state(state, parse_policy("full"), "m")
    assert len(blob) < len(full_blob)
    out = decode_state(blob, pipeline, "m")
    for a, b in zip(out.layers, state.layers):
        for name in ("s", "z"):
            err = (a.fixed[name] - b.fixed[name]).abs().max() / b.fixed[name].abs().max()
            assert 0 < err < bound, (name, float(err))


@pytest.mark.asyncio
@pytest.mark.redis
async def test_served_end_to_end_on_redis(model, tmp_path, client_for):
    path = tmp_path / "recurrent.ckpt"
    save_checkpoint(path, model, [str(i) for i in range(ITEMS)], "test")
    first = [{"item_id": str(i % ITEMS), "ts": 100 + i} for i in range(12)]
    second = [{"item_id": "3", "ts": 500}, {"item_id": "4", "ts": 501}]
    async with client_for(model=path, policy="int8") as client:
        r1 = await client.post("/recommend", json={"user_id": "r1", "events": first, "k": 5})
        r2 = await client.post("/recommend", json={"user_id": "r1", "events": second, "k": 5})
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    assert r1.json()["state"]["source"] == "miss" and r2.json()["state"]["source"] == "hit"
    assert r2.json()["state"]["events_seen"] == 14 and r2.json()["state"]["tokens_kept"] == 0
    assert r1.json()["state"]["bytes"] == r2.json()["state"]["bytes"] > 0  # fixed size
    # the cached answer equals a fresh prefill of all 14 events under the same policy's stored state
    int8 = parse_policy("int8", PolicyContext(model=model))
    events = Events.of([int(e["item_id"]) for e in first + second], ts=[e["ts"] for e in first + second])
    state, _, _ = model.prefill(events[:12])
    restored = decode_state(encode_state(state, int8, "m"), int8, "m")
    _, hidden, _ = model.extend(restored, events[12:])
    expected = model.topk(hidden[None], 5)[1][0].tolist()
    assert [int(i["item_id"]) for i in r2.json()["items"]] == expected


def test_dense_bytes_grow_per_event_for_tokens_and_not_for_a_fixed_state(model):
    kv = registry.build_model(ModelConfig(num_items=ITEMS)).empty_state()  # the design card's 2 x 2 x (32 + 32)
    assert kv.dense_bytes(2000) == 2000 * 1024
    fixed = model.empty_state()  # 2 layers x 2 heads x (8 x 8 + 8) fp32
    assert fixed.dense_bytes(10) == fixed.dense_bytes(10_000) == 2 * 2 * (8 * 8 + 8) * 4


def test_a_kv_storage_refuses_a_state_with_more_than_keys_and_values():
    """A K/V storage would silently drop any other tensor (e.g. a compressive memory's matrix)."""
    kv = {"k": torch.zeros(2, 0, 8), "v": torch.zeros(2, 0, 8)}
    hybrid = State("memory", [LayerState(dict(kv), fixed={"s": torch.zeros(2, 8, 8)})])
    plain = State("kv", [LayerState(dict(kv))])
    kivi = parse_policy("kivi").storage
    assert kivi.applies_to(plain) is None
    assert "also has s" in kivi.applies_to(hybrid)
    assert parse_policy("int8").storage.applies_to(hybrid) is None
