"""`kvrec serve` and `kvrec bench serve`: registered by the server package.

`serve` checks the model, the policy and the port before anything starts, so that a missing checkpoint,
a bad spec or a busy port is one clear line and exit code 2 (a user error, see kvrec.cli) rather than a
traceback from every worker. With no `--redis-url`, `KVREC_REDIS_URL` or `REDIS_URL` it runs a private
redis-server for the lifetime of the command (the embedded default) and stops it on exit, Ctrl-C or
SIGTERM included.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys

from kvrec.compression.cli import DEFAULT_POLICIES, parse_policy_list
from kvrec.models.cli import UsageError, at_least, int_list, positive_int

REDIS_URL_HELP = ("redis://, rediss:// or unix:// URL, or redis+cluster://host:port for a Redis Cluster (default: "
                  "$KVREC_REDIS_URL, then $REDIS_URL, else an embedded redis-server)")
SERVE_EPILOG = """\
failing fast: each Redis call waits at most --redis-timeout seconds and is retried --redis-retries
times, so a stalled Redis costs a request at most (retries + 1) x timeout before a 503 that says what
was written. Writes are idempotent per Idempotency-Key header (or an id the service makes and returns).

hot tier: each worker holds up to --hot-tier-bytes of decoded states (on the model's device) and checks
its copy against Redis with the load it makes anyway; a current copy skips the blob's load and decode.
States are written back every --hot-writeback-events events, on eviction and at shutdown; the event log
is always written first, so losing a worker costs a re-extension of a few events, never an event.

durability: with --redis-wait-replicas N an append is acknowledged only once N replicas have it (WAIT
on the append's connection), so a failover to one of them loses no acknowledged event; Redis itself
needs appendonly yes (appendfsync everysec or always) for a restart of the same node.

authentication: set KVREC_API_TOKEN to require `Authorization: Bearer <token>` on the endpoints that
write or delete (POST /recommend, PUT /users/{id}/history, DELETE /users/{id}, POST /metrics/reset);
off by default. Read endpoints (/metrics, /healthz, /readyz, /docs) stay open. The token is read from
the environment only, never from a flag, so that it does not show in the process list.

other settings (environment): KVREC_MAX_BODY_BYTES (413 above it, default 4 MiB), KVREC_MAX_LOG_EVENTS,
KVREC_STATE_TTL_S, KVREC_IDEMPOTENCY_TTL_S, KVREC_METRICS_FLUSH_S, KVREC_REDIS_WATCH_S; see
server/settings.py for all of them."""


def register(sub, bench_sub) -> None:
    p = sub.add_parser(
        "serve", help="run the ranking service (FastAPI + uvicorn, states in Redis)",
        description="Run the ranking service. Every flag may also come from the environment (KVREC_MODEL, "
                    "KVREC_POLICY, KVREC_REDIS_URL or REDIS_URL, KVREC_KEY_PREFIX, ...; see "
                    "server/settings.py). Without a Redis URL, a private redis-server is started and "
                    "stopped with the service.",
        epilog=SERVE_EPILOG)
    # the CLI's formatter (defaults shown), keeping the epilog's paragraphs as written
    p.formatter_class = type("ServeHelp", (argparse.RawDescriptionHelpFormatter, p.formatter_class), {})
    p.add_argument("--model", default=os.environ.get("KVREC_MODEL"), required="KVREC_MODEL" not in os.environ,
                   help="checkpoint written by `kvrec train` (default: $KVREC_MODEL)")
    p.add_argument("--policy", default=os.environ.get("KVREC_POLICY", "full"),
                   help="compression policy spec, e.g. full, int8, h2o:budget=256+kivi:bits=2 (env KVREC_POLICY)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=at_least(0), default=8000, help="TCP port to listen on")
    p.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    p.add_argument("--redis-cluster", action="store_true",
                   help="the Redis URL names a node of a Redis Cluster (as a redis+cluster:// URL does)")
    p.add_argument("--redis-timeout", type=at_least(0.001, float), default=None,
                   help="seconds one Redis call may take before it fails (default: $KVREC_REDIS_TIMEOUT_S, else 1)")
    p.add_argument("--redis-retries", type=at_least(0), default=None,
                   help="retries of a Redis call that timed out or lost its connection (default: "
                        "$KVREC_REDIS_RETRIES, else 1)")
    p.add_argument("--redis-wait-replicas", type=at_least(0), default=None,
                   help="acknowledge an append only once this many replicas have it (WAIT), so that a failover "
                        "loses no acknowledged event (default: $KVREC_REDIS_WAIT_REPLICAS, else 0: the primary's "
                        "answer)")
    p.add_argument("--redis-wait-timeout-ms", type=at_least(1), default=None,
                   help="how long an append waits for those replicas before a 503 that says its events were "
                        "written (default: $KVREC_REDIS_WAIT_TIMEOUT_MS, else 100)")
    p.add_argument("--hot-tier-bytes", type=at_least(0), default=None,
                   help="per worker, bytes of decoded states held in memory on the model's device in front of "
                        "Redis; 0: off (default: $KVREC_HOT_TIER_BYTES, else 268435456, 256 MiB)")
    p.add_argument("--hot-writeback-events", type=positive_int, default=None,
                   help="write a held state back to Redis once it has this many events more than the stored "
                        "one (and on eviction and shutdown) (default: $KVREC_HOT_WRITEBACK_EVENTS, else 8)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes")
    p.add_argument("--key-prefix", default=None,
                   help="prefix of every Redis key (default: $KVREC_KEY_PREFIX, else kvrec)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=serve)

    b = bench_sub.add_parser(
        "serve", help="time the request pipeline per stage, per history length and policy",
        description="Times the serving pipeline in process against a real Redis (not over HTTP, so every "
                    "stage shows): per history length and policy, ms per stage, requests/s, the speed-up over "
                    "`recompute`, the codec's share of service time, and blob bytes against the raw fp32 state.")
    b.add_argument("--model", default=None,
                   help="checkpoint (default: an untrained model of the default size, 10,000 items)")
    b.add_argument("--lengths", type=int_list, default="250,1000,4000",
                   help="history lengths in events, comma-separated")
    b.add_argument("--policies", type=parse_policy_list, default=DEFAULT_POLICIES, help="';'-separated specs")
    b.add_argument("--requests", type=positive_int, default=30, help="timed requests per cell, at most")
    b.add_argument("--seconds", type=at_least(0.0, float), default=10.0,
                   help="time budget per cell, in seconds; at least 3 requests are timed")
    b.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    b.add_argument("--hot-tier-bytes", type=at_least(0), default=None,
                   help="the hot tier's bytes, as `kvrec serve --hot-tier-bytes`; 0: every request loads and "
                        "decodes the stored blob (default: the service's, 256 MiB)")
    b.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (1, as in a serving worker)")
    b.add_argument("--json", dest="json_out", default=None,
                   help="also write the results to this JSON file (default: none)")
    b.set_defaults(func=bench_serve)


def serve(args: argparse.Namespace) -> int:
    check_model_and_policy(args.model, args.policy)
    check_port_free(args.host, args.port)

    import uvicorn
    from kvrec.server.embedded_redis import EmbeddedRedis
    from kvrec.server.settings import resolve_redis_url

    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so `finally` runs
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    redis_url = resolve_redis_url(args.redis_url)
    if args.redis_cluster and redis_url is None:
        raise UsageError("--redis-cluster needs a cluster to talk to: pass --redis-url redis://host:port of one of "
                         "its nodes")
    embedded = None
    try:
        if redis_url is None:
            embedded = EmbeddedRedis().start()
            redis_url = embedded.url
            print(f"kvrec serve: embedded redis-server at {redis_url} (stopped on exit; states are not kept)",
                  file=sys.stderr)
        env = {"KVREC_MODEL": os.path.abspath(args.model), "KVREC_POLICY": args.policy,
               "KVREC_REDIS_URL": redis_url}
        optional = {"KVREC_KEY_PREFIX": args.key_prefix, "KVREC_REDIS_TIMEOUT_S": args.redis_timeout,
                    "KVREC_REDIS_RETRIES": args.redis_retries, "KVREC_REDIS_CLUSTER": args.redis_cluster or None,
                    "KVREC_REDIS_WAIT_REPLICAS": args.redis_wait_replicas,
                    "KVREC_REDIS_WAIT_TIMEOUT_MS": args.redis_wait_timeout_ms,
                    "KVREC_HOT_TIER_BYTES": args.hot_tier_bytes,
                    "KVREC_HOT_WRITEBACK_EVENTS": args.hot_writeback_events}
        env.update({name: str(value) for name, value in optional.items() if value is not None})
        os.environ.update(env)  # the workers build their Settings from the environment
        check_settings()
        # a worker answers uvicorn's health ping from a thread, which can wait for the GIL for seconds
        # while torch imports or a long history is recomputed; uvicorn's 5 s default kills such workers
        uvicorn.run("kvrec.server.app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level, timeout_worker_healthcheck=60)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def check_model_and_policy(model: str, policy: str) -> None:
    """The checkpoint must load and the spec must parse for its model; CheckpointError or PolicyError
    (user errors) otherwise."""
    from kvrec.compression.cli import check_policies
    from kvrec.models.checkpoint import load_checkpoint

    check_policies([policy], load_checkpoint(model))


def check_settings() -> None:
    """The workers' Settings, from the environment as they will read it: a bad value (or a combination,
    such as a WAIT longer than the socket timeout) is one UsageError now, not a traceback per worker."""
    from kvrec.server.settings import Settings
    from pydantic import ValidationError

    try:
        Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"bad service settings: {problems}") from None


def check_port_free(host: str, port: int) -> None:
    """Bind and release the port, so that a busy one is a UsageError now rather than uvicorn's log line
    and exit after the Redis and the workers have started."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is in use; stop what listens there or pass "
                                 "another --port") from None
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def bench_serve(args: argparse.Namespace) -> int:
    from kvrec.server.bench_serve import main

    return main(args)
