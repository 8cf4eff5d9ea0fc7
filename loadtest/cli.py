"""`kvrec sweep` and `kvrec demo`: registered by the loadtest package (heavy imports in the handlers).

The sweep's replay flags are not defined here: they are loadtest.options' `ReplayOptions`, the same
definition the Locust user's flags come from.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kvrec.compression.cli import DEFAULT_POLICIES, parse_policy_list
from kvrec.loadtest.options import ReplayOptions, add_arguments
from kvrec.models.cli import at_least, positive_int


def parse_duration(text: str) -> float:
    """`90`, `90s`, `2m`, `1h` -> seconds (an argparse `type=`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}; use e.g. 60s, 2m or 90")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="replay users under each compression policy and report memory, speed and accuracy",
        description=(
            "For each policy: a fresh Redis namespace, `kvrec serve` with that policy, the replayed users' "
            "history prefixes loaded, Locust headless for --duration replaying the rest of their histories, "
            "then /metrics and Redis INFO memory read. Writes summary.json, summary.csv, report.md, plots "
            "and run.json (configuration, versions, machine) into --out. The model, the dataset and every "
            "policy are checked before anything starts. Load is a closed loop of --users virtual users, or "
            "with --rate an open loop (requests on a schedule, latency from each one's intended send time); "
            "--find-capacity searches each policy's highest rate with p99 under --p99-ms."))
    p.add_argument("--model", required=True, type=Path, help="checkpoint from `kvrec train`")
    p.add_argument("--policies", type=parse_policy_list, default=DEFAULT_POLICIES,
                   help="policy specs separated by ';' (include `full` for top10_overlap)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--users", type=positive_int, default=4,
                   help="concurrent Locust users (virtual users) of the closed loop; an open loop (--rate, "
                        "--find-capacity) runs one scheduling user per Locust process instead")
    p.add_argument("--spawn-rate", type=at_least(0.001, float), default=4.0,
                   help="Locust users started per second")
    p.add_argument("--duration", type=parse_duration, default="60s",
                   help="measured run per policy: 90 (seconds), 90s, 2m (--find-capacity runs steps of "
                        "--step-duration instead)")
    p.add_argument("--redis-url", default=None,
                   help="measure against this Redis (only the sweep's own key prefixes are touched) (default: "
                        "$KVREC_REDIS_URL, then $REDIS_URL, else a private redis-server on a unix socket, "
                        "flushed between policies)")
    p.add_argument("--server-workers", type=positive_int, default=1, help="`kvrec serve --workers`")
    p.add_argument("--hot-tier-bytes", type=at_least(0), default=None,
                   help="`kvrec serve --hot-tier-bytes` of each policy's server (default: the service's, 256 MiB; "
                        "0: off)")
    p.add_argument("--hot-writeback-events", type=positive_int, default=None,
                   help="`kvrec serve --hot-writeback-events` (default: the service's, 8)")
    p.add_argument("--redis-cluster", type=at_least(0), default=0, metavar="N",
                   help="measure against a private local Redis Cluster of N masters (each user's keys on one "
                        "slot; the service gets a redis+cluster:// URL) instead of a single private Redis; "
                        "0: no cluster")
    p.add_argument("--locust-workers", type=at_least(0), default=0, metavar="N",
                   help="run Locust as a master and N worker processes, one core each, for loads one "
                        "process cannot send on time (it then warns 'CPU usage above 90%%' and open-loop "
                        "requests leave late); 0: one Locust process")
    c = p.add_argument_group("capacity search", "--find-capacity: the highest open-loop rate each policy "
                             "sustains with p99 under --p99-ms, no error and nothing unsent")
    c.add_argument("--find-capacity", action="store_true",
                   help="search each policy's capacity (doubling from --min-rate, or from --rate when given, "
                        "then bisecting) and report it as capacity_rps@p99<=Xms")
    c.add_argument("--p99-ms", type=at_least(0.001, float), default=50.0, help="latency target of the search")
    c.add_argument("--min-rate", type=at_least(0.001, float), default=1.0, help="lowest rate tried, req/s")
    c.add_argument("--max-rate", type=at_least(0.001, float), default=1000.0, help="highest rate tried, req/s")
    c.add_argument("--capacity-steps", type=positive_int, default=10, help="most load steps per policy")
    c.add_argument("--step-duration", type=parse_duration, default="10s",
                   help="each step's open-loop run (each after a fresh warm-up)")
    add_arguments(p, sweep=True, required=("dataset",))
    p.set_defaults(func=_sweep)

    d = sub.add_parser(
        "demo", help="generate data, train a small HSTU and sweep five policies (about 10 minutes, 2 cores)",
        description=(
            "The quick tour: a synthetic long-history dataset, a small HSTU trained on it, and a short "
            "sweep of full, int8, kivi:bits=2, h2o and recompute on a private Redis; prints the table "
            "and writes the report and plots."))
    d.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    d.add_argument("--duration", type=parse_duration, default="20s", help="measured run per policy: 20 (seconds), 20s")
    d.add_argument("--train-minutes", type=at_least(0.0, float), default=2.5, help="cap on training time, minutes")
    d.set_defaults(func=_demo)


def _sweep(args: argparse.Namespace) -> int:
    from kvrec.loadtest.sweep import CapacitySearch, SweepConfig, run_sweep
    from kvrec.models.cli import UsageError
    from kvrec.server.settings import resolve_redis_url

    redis_url = resolve_redis_url(args.redis_url)
    if args.redis_cluster and redis_url:
        raise UsageError(f"--redis-cluster starts a private cluster, but a Redis URL is set ({redis_url}, from "
                         "--redis-url, KVREC_REDIS_URL or REDIS_URL); give one or the other")
    if args.min_rate > args.max_rate:
        raise UsageError(f"--min-rate {args.min_rate:g} is above --max-rate {args.max_rate:g}")
    capacity = CapacitySearch(p99_ms=args.p99_ms, min_rate=args.min_rate, max_rate=args.max_rate,
                              max_steps=args.capacity_steps, step_s=args.step_duration) if args.find_capacity else None
    cfg = SweepConfig(model=args.model, policies=args.policies, out=args.out,
                      replay=ReplayOptions.from_namespace(args), users=args.users, spawn_rate=args.spawn_rate,
                      duration_s=args.duration, redis_url=redis_url, server_workers=args.server_workers,
                      hot_tier_bytes=args.hot_tier_bytes, hot_writeback_events=args.hot_writeback_events,
                      capacity=capacity, locust_workers=args.locust_workers, redis_cluster=args.redis_cluster)
    return _report_failure("sweep", run_sweep, cfg)


def _demo(args: argparse.Namespace) -> int:
    from kvrec.loadtest.demo import run_demo

    return _report_failure("demo", run_demo, args.out, duration_s=args.duration, train_minutes=args.train_minutes)


def _report_failure(command: str, run, *args, **kwargs) -> int:
    """A sweep that started but lost a policy (a server that died, a Locust run that failed) is not the
    user's mistake and not a bug of this process: its message, with the log it points at, and status 1."""
    from kvrec.loadtest.sweep import SweepError

    try:
        run(*args, **kwargs)
    except SweepError as exc:
        print(f"kvrec {command}: {exc}", file=sys.stderr)
        return 1
    return 0
