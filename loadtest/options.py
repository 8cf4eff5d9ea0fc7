"""The replay's options, defined once: `ReplayOptions` is the table from which both the Locust user's
flags and `kvrec sweep`'s flags are made, and the typed object both read back.

The Locust flags go through Locust's parser (`events.init_command_line_parser`) rather than environment
variables of our own, so the web UI shows them in its start form and a master hands them to its workers
with every spawn message. `kvrec sweep` registers the same fields (those marked `sweep`) on its own
parser and hands them to each Locust run with `to_flags`, so a name, a default or a check cannot drift
between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kvrec.loadtest.streams import Pacing
from kvrec.models.cli import at_least, between, fraction, non_negative_float, positive_int


def option(default, help: str, *, parse=None, choices=None, sweep: bool = True):
    """A ReplayOptions field: its default, help text, argparse `type=` (`parse`, default the field's own
    type) and `choices`; `sweep=False` keeps it off `kvrec sweep`, which sets it itself or has no use
    for it."""
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices, "sweep": sweep})


@dataclass(frozen=True)
class ReplayOptions:
    """The parsed options, typed. Values are cast again in `from_namespace` because the web UI's start
    form hands them over as strings."""

    dataset: str = option("synth-long", (
        "dataset to replay: a name under the datasets folder (ml-latest-small, lastfm, amazon-beauty), "
        "a file or folder, or a synth spec (synth-long:users=100,mean_len=300); must be the one the "
        "served model was trained on, since item ids are the dataset's own"))
    prefix_fraction: float = option(0.5, (
        "share of each user's history loaded by the warm-up, 0..1; the rest is replayed"), parse=fraction)
    replay_users: int = option(200, (
        "replay at most this many dataset users (the first ones, in dataset order), across all workers"),
        parse=positive_int)
    holdout: float = option(0.0, (
        "replay only the users a model trained with `kvrec train --holdout-users F` never saw: give F "
        "(`kvrec sweep` takes its model's when not given); 0: the first --replay-users users"),
        parse=between(0.0, 0.99))
    events_per_request: int = option(1, "events sent with each POST /recommend", parse=positive_int)
    candidates: str = option("catalogue", (
        "catalogue: top-k over the whole catalogue; sampled: rank the true next items plus --negatives "
        "sampled items"), choices=("catalogue", "sampled"))
    negatives: int = option(100, "sampled negatives per request with --candidates sampled", parse=positive_int)
    k: int = option(10, "items asked for; at least 10, since hit@10 and ndcg@10 come from the answer",
                    parse=at_least(10))
    exclude_seen: str = option("auto", (
        "ask the service to leave out items the user has seen; auto: yes unless the dataset has repeat "
        "consumption, where excluding would hide true next items"), choices=("auto", "yes", "no"))
    think_time: float = option(0.0, (
        "fixed pause in seconds between a user's requests, used when --time-scale is 0"),
        parse=non_negative_float)
    time_scale: float = option(0.0, (
        "> 0: pause for the real gap between events divided by this factor, capped at --max-gap "
        "(e.g. 86400 plays a day in a second)"), parse=non_negative_float)
    max_gap: float = option(5.0, "longest pause in seconds with --time-scale", parse=non_negative_float)
    rate: float = option(0.0, (
        "> 0: open loop (-f loadtest/openloop.py, or `kvrec sweep --rate`): send this many requests per "
        "second in total on a fixed schedule, whatever the answers do, and measure each latency from the "
        "request's intended send time; 0: closed loop, each virtual user waits for its answer "
        "(--think-time, --time-scale)"), parse=non_negative_float)
    arrivals: str = option("constant", (
        "open-loop schedule: constant (evenly spaced) or poisson (exponential gaps, seeded by --seed)"),
        choices=("constant", "poisson"))
    max_in_flight: int = option(256, (
        "open loop: most requests in flight at once per Locust process (its connection pool); a request "
        "due while all are busy, or while every replayed user has one in flight, waits and is charged "
        "for it"), parse=positive_int)
    warm_up_concurrency: int = option(2, "simultaneous warm-up requests", parse=positive_int)
    seed: int = option(0, "seed of the negative sampling and of poisson arrivals")
    records: str = option("", (
        "write one JSON line per request to this file (distributed workers write PATH-stem.workerN.jsonl "
        "beside it); empty: no records"), sweep=False)
    skip_warm_up: bool = option(False, (
        "do not load the prefixes before the test (`kvrec sweep` warms up itself, outside the timed "
        "run); otherwise the master (or the single process) warms up in test_start and the run time "
        "includes it"), sweep=False)
    step_users: int = option(2, "step-load shape (-f loadtest/stepload.py): users added per step",
                             parse=positive_int, sweep=False)
    step_seconds: float = option(30.0, "step-load shape: seconds per step", parse=at_least(1.0, float),
                                 sweep=False)
    steps: int = option(5, "step-load shape: number of steps; the test ends after the last",
                        parse=positive_int, sweep=False)

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


def replay_fields(*, sweep: bool = False) -> list:
    """The fields that become flags: all of them for Locust, those marked `sweep` for `kvrec sweep`."""
    return [f for f in fields(ReplayOptions) if f.metadata["sweep"] or not sweep]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser, *, sweep: bool = False, required: tuple[str, ...] = ()) -> None:
    """Register the replay options on `parser`: Locust's (a configargparse parser) or, with `sweep`,
    `kvrec sweep`'s. Fields named in `required` have no default there (the sweep's dataset must be the
    model's, so it is asked for)."""
    g = parser.add_argument_group("kvrec replay", "replay real user streams against `kvrec serve`")
    for f in replay_fields(sweep=sweep):
        meta = f.metadata
        help_text = meta["help"] + ("" if f.name in required else " (default: %(default)s)")
        if f.type == "bool":
            g.add_argument(flag(f.name), action="store_true", help=help_text)
            continue
        g.add_argument(flag(f.name), type=meta["parse"] or {"int": int, "float": float, "str": str}[f.type],
                       choices=meta["choices"], help=help_text,
                       **({"required": True} if f.name in required else {"default": f.default}))


def to_flags(opts: ReplayOptions, *, sweep: bool = True) -> list[str]:
    """The command-line flags that make Locust parse back `opts` (the sweep's fields by default)."""
    out: list[str] = []
    for f in replay_fields(sweep=sweep):
        value = getattr(opts, f.name)
        if f.type == "bool":
            out += [flag(f.name)] if value else []
        else:
            out += [flag(f.name), str(value)]
    return out
