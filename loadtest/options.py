"""The replay's options: registered on Locust's own command line, read back as one typed object.

They go through Locust's parser (`events.init_command_line_parser`) rather than environment variables
of our own, so `locust --help` lists them, the web UI shows them in its start form, and a master hands
them to its workers with every spawn message.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from kvrec.loadtest.streams import Pacing


def _at_least(low: float, kind=int):
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def add_arguments(parser) -> None:
    """Register the replay options on Locust's parser (a configargparse parser)."""
    g = parser.add_argument_group("kvrec replay", "replay real user streams against `kvrec serve`")
    g.add_argument("--dataset", default="synth-long", help=(
        "dataset to replay: a name under the datasets folder (ml-latest-small, lastfm, amazon-beauty), "
        "a file or folder, or a synth spec (synth-long:users=100,mean_len=300); must be the one the "
        "served model was trained on, since item ids are the dataset's own (default %(default)s)"))
    g.add_argument("--prefix-fraction", type=_fraction, default=0.5, help=(
        "share of each user's history loaded by the warm-up; the rest is replayed (default %(default)s)"))
    g.add_argument("--max-users-replayed", type=_at_least(1), default=200, help=(
        "replay at most this many dataset users (the first ones, in dataset order), across all workers "
        "(default %(default)s)"))
    g.add_argument("--events-per-request", type=_at_least(1), default=1, help=(
        "events sent with each POST /recommend (default %(default)s)"))
    g.add_argument("--candidates", choices=("catalogue", "sampled"), default="catalogue", help=(
        "catalogue: top-k over the whole catalogue; sampled: rank the true next items plus --negatives "
        "sampled items (default %(default)s)"))
    g.add_argument("--negatives", type=_at_least(1), default=100, help=(
        "sampled negatives per request with --candidates sampled (default %(default)s)"))
    g.add_argument("--k", type=_at_least(10), default=10, help=(
        "items asked for; at least 10, since hit@10 and ndcg@10 come from the answer (default %(default)s)"))
    g.add_argument("--exclude-seen", choices=("auto", "yes", "no"), default="auto", help=(
        "ask the service to leave out items the user has seen; auto: yes unless the dataset has repeat "
        "consumption, where excluding would hide true next items (default %(default)s)"))
    g.add_argument("--think-time", type=_at_least(0.0, float), default=0.0, help=(
        "fixed pause in seconds between a user's requests, used when --time-scale is 0 "
        "(default %(default)s)"))
    g.add_argument("--time-scale", type=_at_least(0.0, float), default=0.0, help=(
        "> 0: pause for the real gap between events divided by this factor, capped at --max-gap "
        "(e.g. 86400 plays a day in a second) (default %(default)s)"))
    g.add_argument("--max-gap", type=_at_least(0.0, float), default=5.0, help=(
        "longest pause in seconds with --time-scale (default %(default)s)"))
    g.add_argument("--records", default="", help=(
        "write one JSON line per request to this file (distributed workers write PATH-stem.workerN.jsonl "
        "beside it); empty: no records (default)"))
    g.add_argument("--skip-warm-up", action="store_true", help=(
        "do not load the prefixes before the test (`kvrec sweep` warms up itself, outside the timed "
        "run); otherwise the master (or the single process) warms up in test_start and the run time "
        "includes it"))
    g.add_argument("--warm-up-concurrency", type=_at_least(1), default=2, help=(
        "simultaneous warm-up requests (default %(default)s)"))
    g.add_argument("--seed", type=int, default=0, help="seed of the negative sampling (default %(default)s)")
    g.add_argument("--step-users", type=_at_least(1), default=2, help=(
        "step-load shape (-f loadtest/stepload.py): users added per step (default %(default)s)"))
    g.add_argument("--step-seconds", type=_at_least(1.0, float), default=30.0, help=(
        "step-load shape: seconds per step (default %(default)s)"))
    g.add_argument("--steps", type=_at_least(1), default=5, help=(
        "step-load shape: number of steps; the test ends after the last (default %(default)s)"))


@dataclass(frozen=True)
class ReplayOptions:
    """The parsed options, typed. Values are cast again here because the web UI's start form hands
    them over as strings."""

    dataset: str = "synth-long"
    prefix_fraction: float = 0.5
    max_users_replayed: int = 200
    events_per_request: int = 1
    candidates: str = "catalogue"
    negatives: int = 100
    k: int = 10
    exclude_seen: str = "auto"
    think_time: float = 0.0
    time_scale: float = 0.0
    max_gap: float = 5.0
    records: str = ""
    skip_warm_up: bool = False
    warm_up_concurrency: int = 2
    seed: int = 0
    step_users: int = 2
    step_seconds: float = 30.0
    steps: int = 5

    @classmethod
    def from_namespace(cls, ns) -> ReplayOptions:
        values = {}
        for f in fields(cls):
            raw = getattr(ns, f.name, f.default)
            if f.type == "bool":
                truthy = str(raw).lower() in ("1", "true", "yes", "on")
                values[f.name] = raw if isinstance(raw, bool) else truthy
            else:
                values[f.name] = {"int": int, "float": float, "str": str}[f.type](raw)
        return cls(**values)

    @property
    def pacing(self) -> Pacing:
        return Pacing(self.think_time, self.time_scale, self.max_gap)

    @property
    def sampled_negatives(self) -> int | None:
        return self.negatives if self.candidates == "sampled" else None

    def exclude_seen_for(self, repeats: bool) -> bool:
        return {"yes": True, "no": False}.get(self.exclude_seen, not repeats)
