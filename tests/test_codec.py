"""The state blob: exact round trip, size accounting, zero-copy views, and specific errors."""

from __future__ import annotations

import struct

import pytest
import torch
from kvrec.compression import (
    BlobError,
    CorruptBlobError,
    ForeignBlobError,
    decode_state,
    encode_state,
    parse_policy,
)
from kvrec.compression.codec import PREFIX, VERSION, read_header, sequence
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="hstu", num_items=50, dim=16, heads=2, d_k=8, d_v=8, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def state(model):
    s, _, _ = model.prefill(Events.of(torch.randint(0, 50, (40,)), ts=torch.arange(40) * 1000))
    return s


FULL = parse_policy("full")


def test_full_round_trip_is_exact_and_zero_copy(state):
    blob = encode_state(state, FULL, "m1")
    out = decode_state(blob, FULL, "m1")
    for name in ("k", "v", "pos", "ts", "weight"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(state, name), getattr(out, name))), name
    assert torch.equal(out.last_hidden, state.last_hidden) and out.events_consumed == 40
    # the fp32 tensors are views of the blob's own bytes
    start = blob.index(out.k[0].numpy().tobytes())
    assert out.k[0].data_ptr() - out.k[1].data_ptr() != 0 and start > 0
    assert not out.k[0].numpy().flags.owndata


def test_blob_size_is_tensor_bytes_plus_a_small_header(state):
    blob = encode_state(state, FULL, "m1")
    header, payload = read_header(blob)
    assert payload < 1024
    # tensors: K/V fp32 and the hidden state; positions 0..39 and times 1000 apart are two numbers each
    # in the header, weights all one: no metadata bytes at all
    assert len(blob) == payload + state.tensor_bytes() + 16 * 4
    assert header["seq"] == {"pos": [0, 1], "ts": [0, 1000]}
    assert header["policy"] == "full" and header["model"] == "m1" and header["events"] == 40


@pytest.mark.parametrize("values,dtype", [
    ([5, 6, 7, 8], None),  # evenly spaced: elided
    ([7], None), ([], None),
    ([0, 60, 120, 121, 300], torch.int16),  # a delta of 179 does not fit int8
    ([10, 3, 4, 100], torch.int8),  # deltas may be negative
    ([0, 2**40, 2**40 + 1], torch.int64),
    ([1_600_000_000, 1_600_000_060, 1_600_000_061], torch.int8),  # times: deltas, not values
])
def test_sequences_are_elided_or_delta_coded_in_the_narrowest_type(values, dtype):
    entry, deltas = sequence(torch.tensor(values, dtype=torch.long))
    assert (deltas is None) == (dtype is None) and (dtype is None or deltas.dtype == dtype)
    assert (entry[1] is None) == (dtype is not None)
    from kvrec.compression.codec import unsequence

    assert unsequence(entry, deltas, len(values)).tolist() == values


def test_evicted_positions_and_irregular_times_round_trip_per_layer(model):
    ts = torch.cumsum(torch.randint(1, 200, (120,)), 0) + 1_600_000_000  # irregular, under 200 s apart
    s, _, stats = model.prefill(Events.of(torch.randint(0, 50, (120,)), ts=ts))
    pipeline = parse_policy("h2o:budget=30,recent=4")
    small = pipeline.compress(s, stats)
    blob = encode_state(small, pipeline, "m1")
    header, _ = read_header(blob)
    # each layer kept its own heavy hitters: its own position and time deltas, decoded back to int64
    tensors = dict(entry.split(":")[::2] for entry in header["tensors"].split())
    assert {"pos.0", "pos.1", "ts.0", "ts.1"} <= set(tensors) and "pos" not in tensors
    out = decode_state(blob, pipeline, "m1")
    for name in ("pos", "ts"):
        assert [t.tolist() for t in getattr(out, name)] == [t.tolist() for t in getattr(small, name)]
        assert all(t.dtype == torch.long for t in getattr(out, name))


def test_older_format_versions_are_foreign_so_their_states_are_rebuilt(state):
    blob = encode_state(state, FULL, "m1")
    magic, version, reserved, length, reserved2, checksum = PREFIX.unpack_from(blob)
    assert version == VERSION == 4  # 4: fp16 scales, sequences, KIVI runs
    old = PREFIX.pack(magic, 3, reserved, length, reserved2, checksum) + blob[PREFIX.size:]
    with pytest.raises(ForeignBlobError, match="version 3"):
        decode_state(old, FULL, "m1")


def test_per_layer_metadata_and_extras_are_kept(state):
    pipeline = parse_policy("h2o:budget=10,recent=2")
    received = [torch.rand(2, 40), torch.rand(2, 40)]
    from kvrec.models.state import AttentionStats

    small = pipeline.compress(state, AttentionStats(received, [r[:, None] for r in received]))
    assert small.pos[0].tolist() != small.pos[1].tolist()  # each layer kept its own heavy hitters
    out = decode_state(encode_state(small, pipeline, "m1"), pipeline, "m1")
    assert [p.tolist() for p in out.pos] == [p.tolist() for p in small.pos]
    assert all(torch.equal(a, b) for a, b in zip(out.extras["acc"], small.extras["acc"]))


def test_merged_weights_survive(state):
    pipeline = parse_policy("pool:budget=10,window=4,chunk=8")
    small = pipeline.compress(state, None)
    out = decode_state(encode_state(small, pipeline, "m1"), pipeline, "m1")
    assert all(torch.equal(a, b) for a, b in zip(out.weight, small.weight))


@pytest.mark.parametrize("damage", [
    lambda b: b[:-1],  # truncated payload
    lambda b: b[:10],  # truncated prefix
    lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:],  # a flipped header bit
    lambda b: b[:-3] + bytes([b[-3] ^ 0x80]) + b[-2:],  # a flipped payload bit
    lambda b: b"garbage that is no blob at all",
    lambda b: b"",
])
def test_corrupt_blobs(state, damage):
    with pytest.raises(CorruptBlobError):
        decode_state(damage(encode_state(state, FULL, "m1")), FULL, "m1")


def test_foreign_blobs(state):
    blob = encode_state(state, FULL, "m1")
    with pytest.raises(ForeignBlobError, match="model"):
        decode_state(blob, FULL, "m2")
    with pytest.raises(ForeignBlobError, match="policy"):
        decode_state(blob, parse_policy("int8"), "m1")
    magic, _, reserved, length, reserved2, checksum = PREFIX.unpack_from(blob)
    other_version = PREFIX.pack(magic, 99, reserved, length, reserved2, checksum) + blob[PREFIX.size:]
    with pytest.raises(ForeignBlobError, match="version"):
        decode_state(other_version, FULL, "m1")
    assert issubclass(CorruptBlobError, BlobError) and issubclass(ForeignBlobError, BlobError)


def test_recompute_has_no_state_to_encode(state):
    with pytest.raises(ValueError):
        encode_state(state, parse_policy("recompute"), "m1")


@pytest.mark.parametrize("spec", ["h2o:budget=100,recent=8+intact:sink=4,pivots=16,bits=4,group=4",
                                  "h2o:budget=100,recent=8+kivi:bits=2,residual=8,group=8"])
def test_header_stays_under_one_kib_for_the_richest_layout(model, spec):
    """Per-layer positions, times and accumulated attention, pivots or KIVI's runs: prefix and header
    together stay under 1 KiB (sizing reserves that much)."""
    ts = torch.cumsum(torch.randint(1, 5000, (300,)), 0)
    s, _, stats = model.prefill(Events.of(torch.randint(0, 50, (300,)), ts=ts))
    pipeline = parse_policy(spec)
    state = pipeline.compress(s, stats)
    for request in range(3):  # KIVI's groups thinned by eviction: more runs
        state, _, stats = model.extend(decode_state(encode_state(state, pipeline, "0123456789abcdef"), pipeline,
                                                    "0123456789abcdef"), Events.of([1, 2, 3], ts=[10**6 + request] * 3))
        state = pipeline.compress(state, stats)
    blob = encode_state(state, pipeline, "0123456789abcdef")
    assert PREFIX.size + struct.unpack_from("<I", blob, 8)[0] < 1024


def same_state(a, b) -> bool:
    """Equal tensor for tensor (values and dtypes), metadata, extras and hidden state."""
    def equal(x, y):
        return (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                             and torch.equal(x, y))
    return (a.kind == b.kind and a.events_consumed == b.events_consumed and equal(a.last_hidden, b.last_hidden)
            and set(a.extras) == set(b.extras)
            and all(equal(x, y) for name in a.extras for x, y in zip(a.extras[name], b.extras[name]))
            and all(set(p.tensors()) == set(q.tensors())
                    and all(equal(p.tensors()[n], q.tensors()[n]) for n in p.tensors())
                    and equal(p.pos, q.pos) and equal(p.ts, q.ts) and equal(p.weight, q.weight)
                    for p, q in zip(a.layers, b.layers)))


@pytest.mark.parametrize("spec", ["full", "fp16", "int8", "int4:group=4", "kivi:bits=2,residual=8,group=8",
                                  "h2o:budget=30,recent=4+kivi:bits=2,residual=8,group=8",
                                  "merge:budget=30,recent=4,threshold=-1+kivi:bits=4,residual=0,group=4",
                                  "pool:budget=30,window=8,chunk=4+int8",
                                  "h2o:budget=30,recent=4+intact:sink=2,pivots=3,bits=4,group=4"])
def test_encode_restored_is_what_decoding_the_blob_gives(model, spec):
    """A server that keeps each state as its blob would restore it (the hot tier) takes it from
    `encode_restored` instead of decoding the blob it just wrote: request after request, carried
    records and all, the two are the same state."""
    from kvrec.compression.codec import encode_restored

    pipeline = parse_policy(spec)
    state, _, stats = model.prefill(Events.of(torch.randint(0, 50, (45,)), ts=torch.arange(45) * 60))
    for request in range(6):
        blob, restored = encode_restored(pipeline.compress(state, stats), pipeline, "m1")
        assert blob == encode_state(pipeline.compress(state, stats), pipeline, "m1")
        assert same_state(restored, decode_state(blob, pipeline, "m1")), request
        state, _, stats = model.extend(restored, Events.of(torch.randint(0, 50, (3,)), ts=[10**4 + request] * 3))


def test_a_header_that_is_json_but_not_an_object_is_corrupt():
    """A blob with a valid checksum whose header is a JSON list: corrupt (a rebuild), not a crash."""
    import xxhash
    from kvrec.compression.codec import MAGIC

    body = b"[1, 2, 3]"
    blob = PREFIX.pack(MAGIC, VERSION, 0, len(body), 0, xxhash.xxh3_64_intdigest(body)) + body
    with pytest.raises(CorruptBlobError, match="JSON list, not an object"):
        read_header(blob)
