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
from kvrec.compression.codec import PREFIX, read_header
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
    # tensors: K/V fp32, pos int32 and ts int64 stored once (identical across layers), hidden; no weights
    tensor_bytes = state.tensor_bytes() + 40 * (4 + 8) + 16 * 4
    assert len(blob) == payload + tensor_bytes
    assert header["policy"] == "full" and header["model"] == "m1" and header["events"] == 40


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


def test_header_stays_under_one_kib_for_the_richest_layout(model):
    s, _, stats = model.prefill(Events.of(torch.randint(0, 50, (300,))))
    pipeline = parse_policy("h2o:budget=100,recent=8+intact:sink=4,pivots=16,bits=4,group=4")
    blob = encode_state(pipeline.compress(s, stats), pipeline, "0123456789abcdef")
    assert struct.unpack_from("<I", blob, 8)[0] < 1024
