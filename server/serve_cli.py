"""`kvrec serve` and `kvrec bench serve`: registered by the server package.

`serve` checks the model and the policy before anything starts, so that a missing checkpoint or a bad
spec is one clear line and exit code 2 rather than a traceback from every worker. With no `--redis-url`
and no `REDIS_URL` it runs a private redis-server for the lifetime of the command (the embedded
default) and stops it on exit, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

DEFAULT_POLICIES = "full;int8;kivi:bits=2;h2o:budget=256;recompute"


def register(sub, bench_sub) -> None:
    p = sub.add_parser(
        "serve", help="run the ranking service (FastAPI + uvicorn, states in Redis)",
        description="Run the ranking service. Every flag may also come from the environment (KVREC_MODEL, "
                    "KVREC_POLICY, REDIS_URL, KVREC_KEY_PREFIX, ...; see server/settings.py). Without "
                    "--redis-url or REDIS_URL, a private redis-server is started and stopped with the service.")
    p.add_argument("--model", default=os.environ.get("KVREC_MODEL"), required="KVREC_MODEL" not in os.environ,
                   help="checkpoint written by `kvrec train` (env KVREC_MODEL)")
    p.add_argument("--policy", default=os.environ.get("KVREC_POLICY", "full"),
                   help="compression policy spec, e.g. full, int8, h2o:budget=256+kivi:bits=2 (default: full)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--redis-url", default=None,
                   help="redis://, rediss:// or unix:// URL (env REDIS_URL); default: an embedded redis-server")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--key-prefix", default=None, help="prefix of every Redis key (env KVREC_KEY_PREFIX)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)

    b = bench_sub.add_parser(
        "serve", help="time the request pipeline per stage, per history length and policy",
        description="Times the serving pipeline in process against a real Redis (not over HTTP, so every "
                    "stage shows): per history length and policy, ms per stage, requests/s, the speed-up over "
                    "`recompute`, the codec's share of service time, and blob bytes against raw fp32 K/V.")
    b.add_argument("--model", default=None,
                   help="checkpoint; default: an untrained model of the default size (10,000 items)")
    b.add_argument("--lengths", default="250,1000,4000", help="history lengths (default: 250,1000,4000)")
    b.add_argument("--policies", default=DEFAULT_POLICIES, help=f"';'-separated specs (default: {DEFAULT_POLICIES})")
    b.add_argument("--requests", type=int, default=30, help="timed requests per cell, at most (default: 30)")
    b.add_argument("--seconds", type=float, default=10.0,
                   help="time budget per cell; at least 3 requests are timed (default: 10)")
    b.add_argument("--redis-url", default=None, help="default: REDIS_URL, else an embedded redis-server")
    b.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: 1, as in a serving worker)")
    b.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    b.set_defaults(func=bench_serve)


def serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("kvrec serve: --workers must be at least 1", file=sys.stderr)
        return 2
    error = check_model_and_policy(args.model, args.policy)
    if error:
        print(f"kvrec serve: {error}", file=sys.stderr)
        return 2

    import uvicorn
    from kvrec.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError

    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so `finally` runs
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or os.environ.get("KVREC_REDIS_URL")
    embedded = None
    try:
        if redis_url is None:
            try:
                embedded = EmbeddedRedis().start()
            except EmbeddedRedisError as exc:
                print(f"kvrec serve: {exc}", file=sys.stderr)
                return 2
            redis_url = embedded.url
            print(f"kvrec serve: embedded redis-server at {redis_url} (stopped on exit; states are not kept)",
                  file=sys.stderr)
        env = {"KVREC_MODEL": os.path.abspath(args.model), "KVREC_POLICY": args.policy,
               "KVREC_REDIS_URL": redis_url}
        if args.key_prefix:
            env["KVREC_KEY_PREFIX"] = args.key_prefix
        os.environ.update(env)  # the workers build their Settings from the environment
        # a worker answers uvicorn's health ping from a thread, which can wait for the GIL for seconds
        # while torch imports or a long history is recomputed; uvicorn's 5 s default kills such workers
        uvicorn.run("kvrec.server.app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level, timeout_worker_healthcheck=60)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def check_model_and_policy(model: str, policy: str) -> str | None:
    """The operator's error, or None: the checkpoint must load and the spec must parse for it."""
    from kvrec.compression.spec import PolicyContext, PolicyError, parse_policy
    from kvrec.models.checkpoint import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(model)
        parse_policy(policy, context=PolicyContext(model=checkpoint.model, checkpoint_path=checkpoint.path))
    except (CheckpointError, PolicyError) as exc:
        return str(exc)
    return None


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def bench_serve(args: argparse.Namespace) -> int:
    from kvrec.server.bench_serve import main

    return main(args)
