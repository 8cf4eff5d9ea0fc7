"""One definition of each option: the replay flags of `kvrec sweep` and of the Locust user, the policy
list, the Redis URL and the percentile."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
from kvrec.compression.cli import DEFAULT_POLICIES, check_policies, parse_policy_list
from kvrec.loadtest.cli import parse_duration
from kvrec.loadtest.options import ReplayOptions, add_arguments, replay_fields, to_flags
from kvrec.models.checkpoint import load_checkpoint
from kvrec.models.cli import UsageError
from kvrec.models.metrics import percentile
from kvrec.server.settings import Settings, resolve_redis_url

from kvrec.cli import build_parser


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[0]: action for action in parser._actions if action.option_strings}


def sweep_parser() -> argparse.ArgumentParser:
    top = build_parser()
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["sweep"]


def locust_parser():
    import configargparse  # Locust's parser class

    parser = configargparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_sweep_and_locust_replay_flags_come_from_one_definition():
    sweep, locust = flags_of(sweep_parser()), flags_of(locust_parser())
    shared = [f"--{f.name.replace('_', '-')}" for f in replay_fields(sweep=True)]
    assert "--replay-users" in shared and "--prefix-fraction" in shared and "--negatives" in shared
    assert "--max-users-replayed" not in sweep and "--max-users-replayed" not in locust
    for name in shared:
        s, loc = sweep[name], locust[name]
        assert (s.type, s.choices, s.help) == (loc.type, loc.choices, loc.help) or name == "--dataset", name
        assert s.default == loc.default or name == "--dataset", name
    # the one difference: the sweep asks for the dataset (it must be the model's), Locust defaults it
    assert sweep["--dataset"].required and locust["--dataset"].default == ReplayOptions().dataset
    # what only Locust needs (the sweep sets it itself) is not a sweep flag
    assert {"--records", "--skip-warm-up", "--steps"} <= set(locust) - set(sweep)


def test_the_sweep_hands_its_replay_options_to_locust_unchanged():
    args = sweep_parser().parse_args(["--model", "m.ckpt", "--out", "o", "--dataset", "synth-short",
                                      "--replay-users", "7", "--prefix-fraction", "0.9", "--candidates",
                                      "sampled", "--negatives", "20", "--think-time", "0.5", "--seed", "3"])
    opts = ReplayOptions.from_namespace(args)
    assert (opts.replay_users, opts.prefix_fraction, opts.sampled_negatives) == (7, 0.9, 20)
    assert ReplayOptions.from_namespace(locust_parser().parse_args(to_flags(opts))) == opts


def test_policy_list_has_one_parser_and_one_default(tiny_checkpoint):
    assert parse_policy_list("full; h2o:budget=256+kivi:bits=2 ;recompute;") == [
        "full", "h2o:budget=256+kivi:bits=2", "recompute"]
    with pytest.raises(UsageError, match="twice"):
        parse_policy_list("full;full")
    with pytest.raises(UsageError, match="no policies"):
        parse_policy_list(";")
    check_policies(parse_policy_list(DEFAULT_POLICIES), load_checkpoint(tiny_checkpoint))
    defaults = {a.dest: a.default for p in (sweep_parser(),) for a in p._actions}
    assert defaults["policies"] == DEFAULT_POLICIES


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("2m") == 120 and parse_duration("1.5s") == 1.5
    for bad in ("soon", "0", "-3s"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_redis_url_resolution_is_the_same_everywhere(monkeypatch):
    monkeypatch.delenv("KVREC_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert resolve_redis_url(None) is None  # the commands then start an embedded redis-server
    monkeypatch.setenv("REDIS_URL", "redis://conventional:6379/0")
    assert resolve_redis_url(None) == "redis://conventional:6379/0"
    monkeypatch.setenv("KVREC_REDIS_URL", "redis://ours:6379/0")
    assert resolve_redis_url(None) == "redis://ours:6379/0" == Settings().redis_url
    assert resolve_redis_url("unix:///tmp/flag.sock") == "unix:///tmp/flag.sock"


def test_percentile_is_numpys_linear_interpolation():
    rng = random.Random(0)
    for n in (1, 2, 5, 101):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert percentile([3, 1, 2], 50) == 2 and percentile([1, 2], 99) == pytest.approx(1.99)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
