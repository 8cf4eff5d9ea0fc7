"""`kvrec sweep` and `kvrec demo`: registered by the loadtest package (heavy imports in the handlers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_POLICIES = "full;int8;kivi:bits=2;h2o:budget=256;recompute"


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="replay users under each compression policy and report memory, speed and accuracy",
        description=(
            "For each policy: a fresh Redis namespace, `kvrec serve` with that policy, the replayed users' "
            "history prefixes loaded, Locust headless for --duration replaying the rest of their histories, "
            "then /metrics and Redis INFO memory read. Writes summary.json, summary.csv, report.md, plots "
            "and run.json (configuration, versions, machine) into --out."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="checkpoint from `kvrec train`")
    p.add_argument("--dataset", required=True,
                   help="the dataset the model was trained on: name, path or synth spec "
                        "(e.g. ml-latest-small)")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="policy specs separated by ';' (include `full` for top10_overlap)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--users", type=int, default=4, help="concurrent Locust users (virtual users)")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="Locust users started per second")
    p.add_argument("--duration", default="60s", help="measured run per policy: 90, 90s, 2m")
    p.add_argument("--replay-users", type=int, default=200,
                   help="dataset users warmed up and replayed (the first ones in dataset order)")
    p.add_argument("--prefix-fraction", type=float, default=0.5,
                   help="share of each history loaded before the run; the rest is replayed")
    p.add_argument("--events-per-request", type=int, default=1)
    p.add_argument("--candidates", choices=("catalogue", "sampled"), default="catalogue",
                   help="catalogue top-k, or the true next items plus --negatives sampled ones")
    p.add_argument("--negatives", type=int, default=100)
    p.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    p.add_argument("--redis-url", default=None,
                   help="measure against this Redis (only the sweep's own key prefixes are touched); "
                        "default: a private redis-server on a unix socket, flushed between policies")
    p.add_argument("--server-workers", type=int, default=1, help="`kvrec serve --workers`")
    p.set_defaults(func=_sweep)

    d = sub.add_parser(
        "demo", help="generate data, train a small HSTU and sweep five policies (about 10 minutes, 2 cores)",
        description=(
            "The quick tour: a synthetic long-history dataset, a small HSTU trained on it, and a short "
            "sweep of full, int8, kivi:bits=2, h2o and recompute on a private Redis; prints the table "
            "and writes the report and plots."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    d.add_argument("--duration", default="20s", help="measured run per policy")
    d.add_argument("--train-minutes", type=float, default=2.5, help="cap on training time")
    d.set_defaults(func=_demo)


def _sweep(args: argparse.Namespace) -> int:
    from kvrec.loadtest.sweep import SweepConfig, SweepError, parse_duration, parse_policies, run_sweep

    try:
        cfg = SweepConfig(
            model=args.model, dataset=args.dataset, policies=parse_policies(args.policies), out=args.out,
            users=args.users, spawn_rate=args.spawn_rate, duration_s=parse_duration(args.duration),
            replay_users=args.replay_users, prefix_fraction=args.prefix_fraction,
            events_per_request=args.events_per_request, candidates=args.candidates, negatives=args.negatives,
            think_time=args.think_time, seed=args.seed, redis_url=args.redis_url,
            server_workers=args.server_workers)
        run_sweep(cfg)
    except (SweepError, ValueError) as exc:
        print(f"kvrec sweep: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kvrec.loadtest.demo import run_demo
    from kvrec.loadtest.sweep import SweepError, parse_duration

    try:
        run_demo(args.out, duration_s=parse_duration(args.duration), train_minutes=args.train_minutes)
    except (SweepError, ValueError) as exc:
        print(f"kvrec demo: {exc}", file=sys.stderr)
        return 1
    return 0
