"""Palu (`svd`): the latent of the key/value projection, taken before the rotary step (and HSTU's SiLU)
and rebuilt on decode, with bases that are the projection weights' own singular vectors."""

from __future__ import annotations

import pytest
import torch
from kvrec.compression import PolicyContext, PolicyError, decode_state, encode_state, parse_policy
from kvrec.compression.base import Dims
from kvrec.compression.policies.lowrank import projections
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events

H, D, DIM = 2, 8, 16


def model_of(kind: str, layers: int = 2):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, num_items=50, dim=DIM, layers=layers, heads=H, d_k=D, d_v=D,
                                   dropout=0.0)).eval()


def low_rank_(weight: torch.Tensor, rank: int, groups: int = 1) -> None:
    """Replace each of `groups` row blocks of weight [H*d, DIM] by a random rank-`rank` matrix, in place."""
    g = torch.Generator().manual_seed(rank + 10 * groups)
    with torch.no_grad():
        for rows in weight.view(groups, -1, weight.shape[1]):
            factor = torch.randn(rows.shape[0], rank, generator=g)
            rows.copy_(factor @ torch.randn(rank, rows.shape[1], generator=g) / 16)


def projection_weights(model) -> list[torch.Tensor]:
    """The live key and value weight tensors of every layer (views into the model's parameters)."""
    out = []
    for block in model.blocks:
        if hasattr(block, "uvqk"):
            hv = H * D
            out += [block.uvqk.weight[hv:2 * hv], block.uvqk.weight[2 * hv + H * D:]]
        else:
            out += [block.k.weight, block.v.weight]
    return out


def history(n: int) -> Events:
    return Events.of(torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(3)), ts=torch.arange(n) * 60)


def round_trip(model, spec: str, events: int = 300):
    state, _, _ = model.prefill(history(events))
    pipeline = parse_policy(spec, PolicyContext(model=model))
    return state, decode_state(encode_state(state, pipeline, "m"), pipeline, "m")


def test_palu_rebuilds_rotary_keys_of_low_rank_projections_at_every_position():
    """Rotary phases move keys out of the projection's span, differently at each position: a latent
    taken after the rotary step loses them; one taken before it is exact wherever the token sits."""
    model = model_of("sasrec")
    for w in projection_weights(model):
        low_rank_(w, 4)
    state, out = round_trip(model, "svd:rank=4")
    for a, b in zip([*state.k, *state.v], [*out.k, *out.v]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    _, lossy = round_trip(model, "svd:rank=3")
    assert (lossy.k[0] - state.k[0]).norm() > 1e-2 * state.k[0].norm()


def test_palu_latent_is_taken_before_hstus_silu():
    """HSTU caches SiLU(W x + b): with W of rank 4 and projections right of SiLU's minimum (a large
    bias), the rank-4 latent of W x + b rebuilds the cache exactly, which SiLU's output itself, not
    in W's span, would not allow."""
    model = model_of("hstu")
    for w in projection_weights(model):
        low_rank_(w, 4)
    with torch.no_grad():
        for block in model.blocks:
            block.uvqk.bias.fill_(3.0)
    state, out = round_trip(model, "svd:rank=4")
    for a, b in zip([*state.k, *state.v], [*out.k, *out.v]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
def test_palu_error_does_not_grow_with_position(kind):
    """Full-rank weights at half rank: the error is that of the projection's spectrum, the same for
    early and late tokens (fitted after rotary, SASRec's key error grew from 0.39 to 0.61 along 4,000
    positions)."""
    model = model_of(kind, layers=1)
    state, out = round_trip(model, "svd:rank=8", events=600)
    early, late = (slice(0, 200), slice(400, 600))
    err = lambda part: float((out.k[0][:, part] - state.k[0][:, part]).norm() / state.k[0][:, part].norm())
    assert 0.02 < err(early) and abs(err(late) / err(early) - 1) < 0.1


def test_palu_re_encoding_hstu_request_after_request_does_not_accumulate_error():
    """Each request decodes and re-encodes the whole state. SASRec's latent is a projection (a fixed
    point); HSTU's passes SiLU's inverse, whose branch can flip once, after which the error settles."""
    for kind in ("hstu", "sasrec"):
        model = model_of(kind, layers=1)
        state, _, _ = model.prefill(history(200))
        pipeline = parse_policy("svd:rank=8", PolicyContext(model=model))
        decoded, errors = state, []
        for _ in range(30):
            decoded = decode_state(encode_state(decoded, pipeline, "m"), pipeline, "m")
            errors.append(float((decoded.k[0] - state.k[0]).norm() / state.k[0].norm()))
        assert errors[0] > 0.02 and errors[-1] <= errors[1] * 1.001 and errors[1] <= errors[0] * 1.05, (kind, errors)


def test_palu_bases_are_the_weights_singular_vectors_and_follow_them():
    model = model_of("sasrec")
    policy = parse_policy("svd:rank=3", PolicyContext(model=model)).storage  # no calibration, no checkpoint
    w = model.blocks[1].v.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    basis = policy.layers[1]["v"][1][0]  # [H*d, 3]
    torch.testing.assert_close(basis @ basis.T @ w, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=1e-4)
    for weight in projection_weights(model):
        low_rank_(weight, 3)
    state, out = round_trip(model, "svd:rank=3")  # bound again: the new weights' bases
    torch.testing.assert_close(out.v[1], state.v[1], atol=2e-5, rtol=1e-4)


def test_palu_head_groups_decompose_each_group_of_heads_alone():
    """Each head's projection of rank 2: per head (groups = heads) rank 2 is exact; jointly the two
    heads span 4 directions, so a joint rank 2 is not."""
    model = model_of("sasrec")
    for w in projection_weights(model):
        low_rank_(w, 2, groups=H)
    state, per_head = round_trip(model, f"svd:rank=2,groups={H}")
    torch.testing.assert_close(per_head.k[1], state.k[1], atol=2e-5, rtol=1e-4)
    _, joint = round_trip(model, "svd:rank=2")
    assert (joint.k[1] - state.k[1]).norm() > 1e-2 * state.k[1].norm()
    with pytest.raises(PolicyError, match="groups"):
        parse_policy("svd:groups=3", PolicyContext(model=model))


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
def test_palu_kv_bytes_is_what_it_writes(kind):
    model = model_of(kind)
    state, _, _ = model.prefill(history(50))
    policy = parse_policy("svd:rank=5,dtype=fp16", PolicyContext(model=model)).storage
    written = sum(t.numel() * t.element_size() for t in policy.pack(state).values())
    positions = 4 * 50 if kind == "sasrec" else 0  # rotary keys: int32 positions, once for both layers
    assert written == 2 * policy.kv_bytes(50, Dims(H, D, D)) - positions


def test_palu_needs_the_model():
    with pytest.raises(PolicyError, match="model"):
        parse_policy("svd:rank=4")
    assert len(projections(model_of("hstu"))) == 2
