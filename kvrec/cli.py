"""The one `kvrec` console script: each package registers its own subcommands here.

Subcommand modules are imported only when the CLI is built, and each keeps its heavy imports (torch,
FastAPI, Locust) inside its handler, so `kvrec --help` stays fast.

User errors, one mechanism for every command: a bad flag fails in argparse (`type=` validators in
kvrec.models.cli), a bad input fails in the command with an exception of a user-error type (UsageError,
DataError, CheckpointError, PolicyError, EmbeddedRedisError), and both end here as one line on stderr
that names the problem, with exit status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kvrec.compression import bench_rank
from kvrec.compression import cli as compression_cli
from kvrec.loadtest import cli as loadtest_cli
from kvrec.models import cli as models_cli
from kvrec.server import serve_cli

USAGE_EXIT = 2  # argparse's own status for a usage error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is None or False (the help then says what happens by
    default, e.g. "default: cuda when available") or the help already shows it, so no default is
    printed twice."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every kvrec parser (subparsers inherit the class): defaults in the help, and a usage error as one
    line that points at --help instead of argparse's usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kvrec",
        description=(
            "Serving simulator for generative recommenders (HSTU, SASRec): per-user compressed KV "
            "attention states in Redis, incremental extension, and load tests that measure bytes per "
            "user, requests per second and NDCG under each compression policy."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models_cli.register(sub)
    bench = sub.add_parser("bench", help="benchmarks: offline policy replay, per-stage serving cost, ranking cost",
                           description="Benchmarks: `offline` replays users under each policy without a "
                                       "server; `serve` times the request pipeline stage by stage; `rank` "
                                       "times ranking candidates over a cached state against recomputing it.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    compression_cli.register_bench(bench_sub)
    bench_rank.register(bench_sub)
    serve_cli.register(sub, bench_sub)
    loadtest_cli.register(sub)
    return parser


def user_error_types() -> tuple[type[Exception], ...]:
    """The exception types that mean "the user's input is wrong", imported only when one is raised
    (they live beside torch, which `kvrec --help` must not import)."""
    from kvrec.compression.spec import PolicyError
    from kvrec.models.checkpoint import CheckpointError
    from kvrec.models.data import DataError
    from kvrec.server.embedded_redis import EmbeddedRedisError

    return models_cli.UsageError, DataError, CheckpointError, PolicyError, EmbeddedRedisError


def command_name(args: argparse.Namespace) -> str:
    """`kvrec bench offline`, `kvrec data synth`, `kvrec train`: the prefix of a user-error line."""
    words = [args.command, getattr(args, "bench_command", None), getattr(args, "data_cmd", None)]
    return " ".join(["kvrec", *filter(None, words)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, user_error_types()):
            raise
        print(f"{command_name(args)}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
