"""Paired differences with a bootstrap over users: exact where there is no noise, and an interval that
covers the truth about 95% of the time when users, not requests, are the unit of variation."""

from __future__ import annotations

import numpy as np
import pytest
from kvrec.models.uncertainty import paired_difference


def test_identical_runs_differ_by_nothing_with_a_zero_width_interval():
    ref = [0.2, 0.5, 0.0, 1.0]
    d = paired_difference(ref, list(ref), ["a", "a", "b", "c"])
    assert d.relative == 0.0 and d.ci95 == (0.0, 0.0) and d.absolute == 0.0
    assert (d.requests, d.users) == (4, 3)


def test_a_uniform_ten_percent_loss_is_measured_exactly():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.1, 1.0, 300)
    users = rng.integers(0, 40, 300)
    d = paired_difference(list(ref), list(0.9 * ref), list(users))
    assert d.relative == pytest.approx(-0.1)
    assert d.ci95[0] == pytest.approx(-0.1) and d.ci95[1] == pytest.approx(-0.1)


def test_the_interval_covers_the_truth_when_users_vary():
    """Each user has an effect of its own shared by all of its requests, with mean zero: a bootstrap over
    requests would be far too narrow (coverage near 30% here); over users it covers about 95%."""
    rng = np.random.default_rng(7)
    covered = 0
    trials = 200
    for _ in range(trials):
        users = np.repeat(np.arange(30), 20)  # 30 users x 20 requests
        ref = rng.uniform(0.2, 0.8, users.size)
        effect = rng.normal(0, 0.1, 30)[users]  # the user's own shift
        d = paired_difference(list(ref), list(ref + effect), list(users), resamples=500,
                              seed=int(rng.integers(1 << 30)))
        truth = 0.0  # E[effect] = 0
        covered += d.ci95[0] <= truth <= d.ci95[1]
    assert 0.88 <= covered / trials <= 0.99


def test_nothing_to_compare_and_mismatched_lists():
    assert paired_difference([], [], []) is None
    assert paired_difference([0.0, 0.0], [0.1, 0.2], ["a", "b"]) is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([0.1], [0.1, 0.2], ["a"])
