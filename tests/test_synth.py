"""The synthetic generator: determinism, shape of the data, and the long-range knob without a model."""

from __future__ import annotations

import numpy as np
import pytest
from kvrec.models import synth
from kvrec.models.data import load_dataset

SMALL = dict(users=120, items=1000, mean_len=300)


def test_deterministic_by_seed():
    a, b = synth.generate(**SMALL, seed=1), synth.generate(**SMALL, seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert synth.generate(**SMALL, seed=2).fingerprint() != a.fingerprint()


def test_structure_lengths_time_and_popularity():
    ds = synth.generate(users=300, items=1500, mean_len=200, max_len=2000, seed=0)
    lens = np.array([len(s) for s in ds.seqs])
    assert 150 < lens.mean() < 250 and lens.max() <= 2000 and lens.min() >= 5
    assert np.median(lens) < lens.mean()  # heavy right tail
    assert ds.has_time and not ds.has_action
    gaps = np.concatenate([np.diff(s.ts.numpy()) for s in ds.seqs])
    assert (gaps > 0).all() and (gaps > 3600).mean() > 0.05 and (gaps < 1800).mean() > 0.5  # sessions
    counts = np.bincount(np.concatenate([s.items.numpy() for s in ds.seqs]))
    top = np.sort(counts)[::-1]
    assert top[: len(top) // 10].sum() > 0.3 * top.sum()  # the top 10% of items draw > 30% of events


def test_long_range_knob_moves_the_far_history_share():
    """With long_range high many next items were seen only beyond the last 50 events; with 0 only the
    ordinary sessions' Zipf re-draws of old items remain."""
    far = synth.long_range_share(synth.generate(**SMALL, long_range=0.9))
    mid = synth.long_range_share(synth.generate(**SMALL, long_range=0.5))
    near = synth.long_range_share(synth.generate(**SMALL, long_range=0.0))
    assert near < mid < far and far > near + 0.15


def test_favourites_return_from_the_far_history():
    """Far-history re-consumptions are mostly a few favourites per user, first seen long before and
    uniform over the catalogue rather than popular."""
    ds = synth.generate(**SMALL, long_range=0.9, favourites=20)
    distances, top_share, far_items = [], [], []
    for s in ds.seqs:
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        counts: dict[int, int] = {}
        for pos, item in enumerate(s.items.tolist()):
            if item in last and pos - last[item] > 50:
                distances.append(pos - first[item])
                counts[item] = counts.get(item, 0) + 1
            first.setdefault(item, pos)
            last[item] = pos
        if sum(counts.values()) >= 20:
            top_share.append(sum(sorted(counts.values())[-20:]) / sum(counts.values()))
        far_items.extend(counts)
    assert np.median(distances) > 100
    assert np.mean(top_share) > 0.8  # 20 favourites make most of a user's far re-consumptions
    assert len(set(far_items)) > 0.5 * 1000  # spread over the catalogue, not the popular head


def test_presets_and_spec_overrides():
    assert set(synth.PRESETS) == {"synth-long", "synth-short"}
    ds = load_dataset("synth-long:users=30,mean_len=60,long_range=0.5")
    assert ds.name == "synth-long" and len(ds.seqs) == 30
    with pytest.raises(ValueError, match="bad synth override"):
        synth.from_spec("synth-long:colour=red")
    with pytest.raises(ValueError, match="unknown synth preset"):
        synth.from_spec("synth-medium")
