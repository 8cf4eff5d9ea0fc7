"""The fast paths of the codec give what the slow ones would: per-row formats (int8, int4) re-emit the
codes a token carries from the blob it was read from instead of quantizing it again, and that must be
the very blob fresh quantization of the whole state writes, request after request, under eviction and
merging too; and the assumption it rests on (a model's `extend` leaves its cached tokens bit for bit)
holds for every model kind."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import decode_state, encode_state, parse_policy
from kvrec.compression.base import READ
from kvrec.compression.codec import encode_restored
from kvrec.compression.policies.precision import PerRow
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events, State


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"kind": "hstu", "num_items": 60, "dim": 16, "heads": 2, "d_k": 8, "d_v": 8,
                                      "dropout": 0.0, **kw})).eval()


def events(n: int, start: int, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    return Events.of(torch.randint(0, 60, (n,), generator=g), ts=(torch.arange(n) + start) * 60)


def without_record(state: State, storage) -> State:
    """The state with the storage's carried record dropped: encoding it quantizes every token afresh."""
    return State(state.kind, state.layers, state.last_hidden, state.events_consumed,
                 {n: x for n, x in state.extras.items() if n not in storage.carries})


@pytest.mark.parametrize("spec", ["int8", "int4", "int4:group=4", "pool:budget=40,window=8,chunk=4+int8",
                                  "h2o:budget=40,recent=4+int4:group=4", "random:budget=40,seed=2+int8",
                                  "merge:budget=40,recent=4,threshold=-1+int4:group=4"])
def test_reused_codes_are_what_fresh_quantization_writes(spec):
    """Request after request (decode, extend, compress, encode), the blob built from carried codes equals
    the blob of the same state quantized from scratch; only new or rewritten tokens are quantized (so
    the test fails if reuse is switched off as well as if it is wrong), and under a merging or evicting
    token stage some kept tokens are rewritten, which must be quantized again."""
    model = tiny()
    pipeline = parse_policy(spec)
    storage = pipeline.storage
    state, _, stats = model.prefill(events(50, 0, 0))
    blob = encode_state(pipeline.compress(state, stats), pipeline, "m")
    reused = rewritten = 0
    for request in range(8):
        state, _, stats = model.extend(decode_state(blob, pipeline, "m"), events(3, 50 + 3 * request, request + 1))
        state = pipeline.compress(state, stats)
        blob = encode_state(state, pipeline, "m")
        assert blob == encode_state(without_record(state, storage), pipeline, "m"), request
        for layer, part in enumerate(state.layers):
            fresh = storage.fresh(state, layer)
            quantized = torch.arange(part.num_tokens)[fresh]
            untouched = (state.extras[READ][layer][0] == part.pos + 1) & (state.extras[READ][layer][1] == part.weight)
            assert torch.equal(quantized, (~untouched).nonzero()[:, 0])  # exactly the new and rewritten ones
            reused += part.num_tokens - len(quantized)
            rewritten += int((quantized < part.num_tokens - 3).sum())  # older than this request's events
    assert reused > 0 and (rewritten > 0) == spec.startswith(("pool", "merge"))


def test_the_blob_is_built_from_the_carried_codes():
    """A carried record that disagrees with the tensors wins for untouched tokens (so the codes are
    indeed re-emitted, not recomputed), while the new token is quantized from its values."""
    pipeline = parse_policy("int8")
    model = tiny()
    state, _, _ = model.prefill(events(20, 0, 0))
    state = decode_state(encode_state(state, pipeline, "m"), pipeline, "m")
    state, _, _ = model.extend(state, events(1, 20, 1))
    record = state.extras["row_q"][0].clone()
    record[:, 0] += 1  # the first token's codes, as if stored otherwise
    state.extras["row_q"] = [record, *state.extras["row_q"][1:]]
    out = decode_state(encode_state(state, pipeline, "m"), pipeline, "m")
    assert torch.equal(out.extras["row_q"][0][:, 0], record[:, 0])
    assert torch.equal(out.extras["row_q"][0][:, -1], decode_state(encode_state(without_record(state, pipeline.storage),
                                                                                pipeline, "m"), pipeline, "m")
                       .extras["row_q"][0][:, -1])


@pytest.mark.parametrize("spec", ["int8", "int4", "int4:group=4", "h2o:budget=30,recent=4+int4:group=4"])
def test_records_are_the_blobs_parts(spec):
    """The carried record of a decoded state holds each token's parts as the blob does (heads and token
    tensors in order), and `encode_restored` hands back the same record and tensors a decode gives."""
    model = tiny(d_v=4)  # d_k 8, d_v 4: rows of different widths share a record
    pipeline = parse_policy(spec)
    state, _, stats = model.prefill(events(45, 0, 0))
    for request in range(4):
        blob, restored = encode_restored(pipeline.compress(state, stats), pipeline, "m")
        decoded = decode_state(blob, pipeline, "m")
        fresh = without_record(pipeline.compress(state, stats), pipeline.storage)
        parts = pipeline.storage.pack(fresh)
        for layer, part in enumerate(decoded.layers):
            for p in pipeline.storage.row_parts:
                rows = [parts[f"{layer}.{n}.{p}"] for n in part.tokens]  # [G, T, n] each
                words = decoded.extras[f"row_{p}"][layer]  # [R, T]
                as_bytes = torch.cat([r.contiguous().view(torch.uint8).transpose(1, 2).reshape(-1, r.shape[1])
                                      for r in rows])  # [bytes of a token, T]
                assert torch.equal(words.T.contiguous().view(torch.uint8).T, as_bytes), (request, layer, p)
        for name in decoded.extras:
            assert all(torch.equal(a, b) for a, b in zip(decoded.extras[name], restored.extras[name])), name
        assert all(torch.equal(a, b) for a, b in zip(decoded.k, restored.k))
        assert all(torch.equal(a, b) for a, b in zip(decoded.v, restored.v))
        state, _, stats = model.extend(restored, events(2, 45 + 2 * request, request))


@pytest.mark.parametrize("kw", [{"kind": "hstu"}, {"kind": "sasrec"}, {"kind": "astro"}, {"kind": "hstu", "memory": 12},
                                {"kind": "hstu", "latent_dim": 8}, {"kind": "hstu", "recurrent": "linear"}])
def test_extend_keeps_cached_tokens_bit_for_bit(kw):
    """What reusing carried codes rests on, for every model kind: a cached token's tensors leave `extend`
    as they entered it (a block that rewrote them would need its tokens marked rewritten)."""
    model = tiny(**kw)
    state, _, _ = model.prefill(events(30, 0, 0))
    for request in range(3):
        new, _, _ = model.extend(state, events(4, 30 + 4 * request, request))
        for old, part in zip(state.layers, new.layers):
            kept = {int(p): i for i, p in enumerate(part.pos.tolist())}
            for j, p in enumerate(old.pos.tolist()):
                if p in kept:
                    for name, x in old.tokens.items():
                        assert torch.equal(part.tokens[name][:, kept[p]], x[:, j]), (kw, name, p)
        state = new


def test_per_row_formats_carry_and_kivi_keeps_its_own():
    assert isinstance(parse_policy("int8").storage, PerRow) and isinstance(parse_policy("int4").storage, PerRow)
    assert not isinstance(parse_policy("kivi").storage, PerRow)
