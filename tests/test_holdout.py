"""Held-out users: `kvrec train --holdout-users F` keeps a share of users out of training, and the replays
(`bench offline`, `bench levels`, `sweep`) then score only them, so accuracy is not measured on the
events the model was fitted to."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from kvrec.compression.bench import unseen_users
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.streams import load_source
from kvrec.loadtest.sweep import SweepConfig, check_inputs
from kvrec.models.checkpoint import load_checkpoint, save_checkpoint
from kvrec.models.data import build_dataset, holdout_users, leave_one_out, load_dataset, stream_split
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.train import TrainConfig, train

from kvrec.cli import main

DATASET = "synth-short:users=40,mean_len=40"


def dataset_of(users: list[str]):
    """Users with 6 events each over 5 items, in the given order."""
    rows = [(u, f"i{(n + t) % 5}", 1000 + t) for n, u in enumerate(users) for t in range(6)]
    user, item, ts = zip(*rows)
    return build_dataset("tiny", np.array(user), np.array(item), np.array(ts, dtype=np.int64))


def ids(ds, users: frozenset[int]) -> set[str]:
    return {ds.user_ids[u] for u in users}


def test_the_held_out_users_follow_the_ids_not_the_file_order():
    names = [f"user{n}" for n in range(50)]
    forward, backward = dataset_of(names), dataset_of(names[::-1])
    assert ids(forward, holdout_users(forward, 0.2)) == ids(backward, holdout_users(backward, 0.2))
    assert len(holdout_users(forward, 0.2)) == 10 and not holdout_users(forward, 0.0)


def test_a_smaller_fraction_holds_out_a_subset_of_a_larger_one():
    ds = dataset_of([f"u{n}" for n in range(200)])
    small, large = holdout_users(ds, 0.1), holdout_users(ds, 0.3)
    assert small < large and len(small) == 20 and len(large) == 60


def test_held_out_users_are_not_trained_or_validated_on():
    ds = load_dataset(DATASET)
    held = holdout_users(ds, 0.25)
    split = leave_one_out(ds, skip=held)
    assert len(split.train) == len(ds.seqs) - len(held)
    assert not held & {case.user_index for case in split.valid + split.test}
    trained_on = {tuple(s.items.tolist()) for s in split.train}
    assert not any(tuple(ds.seqs[u].items[:-2].tolist()) in trained_on for u in held)


def test_training_records_the_holdout_and_its_users(tmp_path):
    ds = load_dataset(DATASET)
    cfg = ModelConfig(dim=16, heads=2, d_k=8, d_v=8, max_len=1000, dropout=0.0)
    model, summary = train(ds, cfg, TrainConfig(epochs=1, batch_size=16, random_negatives=8,
                                                in_batch_negatives=8, holdout=0.25), progress=False)
    assert summary["heldout_users"] == 10 and summary["train"]["holdout"] == 0.25
    assert summary["windows"] == 30  # one window per trained user: the histories fit max_len


def checkpoint_with(tmp_path, holdout: float, name: str):
    ds = load_dataset(DATASET)
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=ds.num_items, dim=16, heads=2, d_k=8, d_v=8, dropout=0.0)).eval()
    save_checkpoint(tmp_path / name, model, ds.item_ids, ds.fingerprint(), info={"train": {"holdout": holdout}})
    return load_checkpoint(tmp_path / name)


def test_a_replay_scores_the_users_every_model_was_kept_from(tmp_path):
    ds = load_dataset(DATASET)
    a, b, everyone = (checkpoint_with(tmp_path, f, n) for f, n in ((0.25, "a"), (0.5, "b"), (0.0, "c")))
    users, line = unseen_users(ds, [a, b])
    assert users == holdout_users(ds, 0.25) and "held out" in line
    users, line = unseen_users(ds, [a, everyone])
    assert users is None and "trained on" in line


def test_bench_offline_replays_only_the_held_out_users(tmp_path):
    ckpt = checkpoint_with(tmp_path, 0.25, "m.ckpt")
    out = tmp_path / "bench"
    assert main(["bench", "offline", "--model", str(ckpt.path), "--dataset", DATASET, "--policies", "full;int8",
                 "--out", str(out), "--events-per-request", "5"]) == 0
    rows = json.loads((out / "results.json").read_text())
    ds = load_dataset(DATASET)
    eligible = stream_split(ds, min_future=6, users=holdout_users(ds, 0.25))
    assert rows[0]["users"] == len(eligible) < 10
    assert "held out of training" in (out / "results.md").read_text()


def test_the_sweep_replays_its_models_held_out_users(tmp_path):
    ckpt = checkpoint_with(tmp_path, 0.25, "m.ckpt")
    cfg = SweepConfig(model=ckpt.path, policies=["full"], out=tmp_path / "sweep",
                      replay=ReplayOptions(dataset=DATASET, replay_users=100))
    source = check_inputs(cfg)
    ds = load_dataset(DATASET)
    assert cfg.replay.holdout == 0.25
    assert {s.user_id for s in source.streams} == ids(ds, holdout_users(ds, 0.25))
    everyone = load_source(DATASET, prefix_fraction=0.5, max_users=100)
    assert len(everyone.streams) == 40


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_an_impossible_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="holdout fraction"):
        holdout_users(load_dataset(DATASET), fraction)


def test_replay_options_carry_the_holdout_to_locust():
    from kvrec.loadtest.options import to_flags

    flags = to_flags(replace(ReplayOptions(), holdout=0.25))
    assert flags[flags.index("--holdout") + 1] == "0.25"
