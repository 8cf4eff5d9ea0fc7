"""MiniCache merges adjacent layers from mid-depth on, token by token where their K and V agree, and
says how many tokens it merged."""

from __future__ import annotations

import torch
from kvrec.compression import decode_state, encode_state, parse_policy
from kvrec.models.state import LayerState, State

H, D, T = 2, 8, 12
SIMILAR = [1, 4, 7]  # tokens whose K and V agree in layers 3 and 4


def deep_state(layers: int = 6) -> State:
    """Random K/V in every layer, except in a 6-layer state: layer 1 is a copy of layer 0 (so pairing from layer 0 would
    merge everything there), and layer 4 is layer 3 rescaled at SIMILAR (and at token 10 for the keys
    only, whose values point elsewhere)."""
    g = torch.Generator().manual_seed(0)
    parts = [LayerState({"k": torch.randn(H, T, D, generator=g), "v": torch.randn(H, T, D, generator=g)},
                        torch.arange(T), torch.arange(T), torch.ones(T)) for _ in range(layers)]
    state = State("kv", parts, events_consumed=T)
    if layers < 6:
        return state
    for name in ("k", "v"):
        x = getattr(state, name)
        x[1] = x[0].clone()
        x[4] = x[4].clone()
        x[4][:, SIMILAR] = x[3][:, SIMILAR] * torch.tensor([0.5, 2.0, 3.0])[None, :, None]
    state.k[4][:, 10] = state.k[3][:, 10]
    return state


def test_minicache_merges_only_similar_tokens_of_the_deeper_pairs_and_counts_them():
    state = deep_state()
    pipeline = parse_policy("minicache:threshold=0.99")
    parts = pipeline.storage.pack(state)
    assert parts["3.mi"].tolist() == parts["4.mi"].tolist() == SIMILAR  # pair (3, 4): mid-depth of 6
    assert not any(name.endswith(".mi") for name in parts if name[0] in "0125")
    assert parts["0.k"].shape == parts["1.k"].shape == parts["5.k"].shape == (H, T, D)
    assert parts["3.k"].shape == (H, T - len(SIMILAR), D)
    assert (pipeline.storage.merged_tokens, pipeline.storage.paired_tokens) == (len(SIMILAR), T)
    blob = encode_state(state, pipeline, "m")
    assert (pipeline.storage.merged_tokens, pipeline.storage.paired_tokens) == (2 * len(SIMILAR), 2 * T)  # summed
    out = decode_state(blob, pipeline, "m")
    for a, b in zip([*state.k, *state.v], [*out.k, *out.v]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(blob) < len(encode_state(state, parse_policy("full"), "m"))


def test_minicache_pairs_from_a_given_layer():
    parts = parse_policy("minicache:threshold=0.99,start=0").storage.pack(deep_state())
    assert parts["0.mi"].tolist() == list(range(T))  # pairs (0, 1), (2, 3), (4, 5): 3 and 4 are apart
    assert parts["2.mi"].tolist() == parts["4.mi"].tolist() == []


def test_minicache_on_a_shallow_model_merges_nothing_and_says_so():
    state = deep_state(layers=2)
    pipeline = parse_policy("minicache")
    out = decode_state(encode_state(state, pipeline, "m"), pipeline, "m")
    assert pipeline.storage.merged_tokens == pipeline.storage.paired_tokens == 0
    assert all(torch.equal(a, b) for a, b in zip([*state.k, *state.v], [*out.k, *out.v]))


def test_a_report_row_says_how_much_minicache_merged():
    from kvrec.compression.bench import storage_note

    deep, shallow = parse_policy("minicache:threshold=0.99"), parse_policy("minicache")
    deep.storage.pack(deep_state())
    shallow.storage.pack(deep_state(layers=2))
    assert storage_note(deep) == f"merged {len(SIMILAR)} of {T} paired tokens"
    assert storage_note(shallow).startswith("merged nothing of 0 paired tokens")
    assert storage_note(parse_policy("int8")) == ""
