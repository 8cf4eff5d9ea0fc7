"""The one `kvrec` console script: each package registers its own subcommands here.

Subcommand modules are imported only when the CLI is built, and each keeps its heavy imports (torch,
FastAPI, Locust) inside its handler, so `kvrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from kvrec.compression import cli as compression_cli
from kvrec.loadtest import cli as loadtest_cli
from kvrec.models import cli as models_cli
from kvrec.server import serve_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrec",
        description=(
            "Serving simulator for generative recommenders (HSTU, SASRec): per-user compressed KV "
            "attention states in Redis, incremental extension, and load tests that measure bytes per "
            "user, requests per second and NDCG under each compression policy."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models_cli.register(sub)
    bench = sub.add_parser("bench", help="benchmarks: offline policy replay, per-stage serving cost")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    compression_cli.register_bench(bench_sub)
    serve_cli.register(sub, bench_sub)
    loadtest_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
