"""HSTU with learned slots beside an exact window (`--slots S --slot-window W`, models.slots): the
exact-window checks of tests/test_compressive_memory.py, and the slots pinned to their definition."""

from __future__ import annotations

import torch
from kvrec.compression import parse_policy
from kvrec.compression.base import PolicyContext
from kvrec.models.hstu import HSTU
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.slots import SlotBlock, SlotHSTU
from kvrec.models.state import Events
from test_compressive_memory import (
    check_a_training_step_lowers_the_loss,
    check_kvrec_train_and_checkpoint,
    check_random_chunkings_equal_prefill,
    check_rank_equals_the_training_pass_with_targets,
    check_storages,
    check_the_state_is_the_window_and_fixed_tensors,
    check_token_policies_on_the_window,
    check_training_forward_equals_serving_at_every_position,
)
from test_recurrent import history

ITEMS, S, W = 40, 4, 6


def tiny(seed: int = 0, randomise: bool = True, **kw):
    torch.manual_seed(seed)
    cfg = {"num_items": ITEMS, "dim": 16, "heads": 2, "d_k": 8, "d_v": 8, "max_len": 30, "dropout": 0.0,
           "slots": S, "slot_window": W, **kw}
    model = build_model(ModelConfig(**cfg)).eval()
    if randomise:  # untrained biases are zero: randomise them so that they matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_bias"):
                    p.normal_(0, 0.5)
    return model


def test_the_registry_builds_the_slot_variant():
    model = tiny()
    assert type(model) is SlotHSTU and all(isinstance(b, SlotBlock) for b in model.blocks)
    assert model.state_kind == "slots" and model.cfg.variant() == f"slots{S}"


def test_random_chunkings_equal_prefill():
    check_random_chunkings_equal_prefill(tiny())


def test_training_forward_equals_serving_at_every_position():
    check_training_forward_equals_serving_at_every_position(tiny())


def test_the_slots_hold_the_routed_sums_of_the_events_older_than_the_window():
    """Layer 0 (its input is the embedding): slot s holds sum_j r_s(k_j) (k_j, v_j, 1) over the events
    before the window, r = softmax over slots of u_s . k / sqrt(d_k); the soft counts add up to them."""
    model = tiny()
    events = history(30, seed=3)
    state, _, _ = model.prefill(events, chunk=4)
    block = model.blocks[0]
    with torch.no_grad():
        _, k, v, _ = block.qkv(model.embed(events.items, events.actions)[None], None)  # [1, H, n, d]
        k, v = k[0, :, :30 - W], v[0, :, :30 - W]  # [H, e, d]: the evicted events
        route = torch.softmax(k @ block.slot_emb.transpose(1, 2) / 8 ** 0.5, dim=-1)  # [H, e, S]
    part = state.layers[0]
    torch.testing.assert_close(part.fixed["slot_n"], route.sum(1))
    torch.testing.assert_close(part.fixed["slot_k"], route.transpose(1, 2) @ k)
    torch.testing.assert_close(part.fixed["slot_v"], route.transpose(1, 2) @ v)
    torch.testing.assert_close(part.fixed["slot_n"].sum(-1), torch.full((2,), 30.0 - W))


def test_slots_of_identical_events_stand_for_those_events():
    """A slot is the mean of what it was sent with that many events' weight: with one layer, no biases
    and every evicted event the same (so every evicted key and value is one k, v), the slots give
    exactly what full HSTU attention over those events gives, whatever the router does."""
    model = tiny(randomise=False, layers=1)
    plain = HSTU(model.cfg).eval()
    plain.load_state_dict(model.state_dict(), strict=False)  # the slot embeddings and biases aside
    same = torch.full((20,), 5)
    recent = history(W, seed=9).items
    events = Events.of(torch.cat([same, recent]), ts=torch.arange(20 + W) * 60)
    torch.testing.assert_close(model.prefill(events)[1], plain.prefill(events)[1], atol=1e-5, rtol=0)


def test_merged_tokens_keep_their_multiplicity_in_the_slots():
    """Under a merge that drops nothing, every event is counted once: in a window token's weight or in
    the slots' soft counts (a fold that ignored a merged token's weight would lose events)."""
    model = tiny()
    pipeline = parse_policy("merge:budget=3,recent=1,threshold=-1", PolicyContext(model=model))
    events, state, merged_out = history(40, seed=10), model.empty_state(), 0
    for start in range(0, 40, 3):
        leaving = [part.weight[part.pos < start + 3 - W] for part in state.layers]  # folded by this extend
        merged_out += sum(int((w > 1).sum()) for w in leaving)
        state, _, stats = model.extend(state, events[start:start + 3])
        state = pipeline.compress(state, stats)
    assert merged_out > 0  # merged tokens did reach the slots
    for part in state.layers:
        torch.testing.assert_close(part.fixed["slot_n"].sum(-1) + part.weight.sum(), torch.full((2,), 40.0))


def test_the_state_is_the_window_and_fixed_tensors():
    check_the_state_is_the_window_and_fixed_tensors(tiny(), W)


def test_storages():
    check_storages(tiny())


def test_token_policies_on_the_window():
    check_token_policies_on_the_window(tiny(), W)


def test_rank_equals_the_training_pass_with_targets():
    check_rank_equals_the_training_pass_with_targets(tiny)


def test_a_training_step_lowers_the_loss():
    check_a_training_step_lowers_the_loss(tiny(), "slot_emb")


def test_kvrec_train_end_to_end_and_the_checkpoint_round_trips(tmp_path):
    check_kvrec_train_and_checkpoint(tmp_path, ["--slots", "3", "--slot-window", "4"], SlotHSTU)
