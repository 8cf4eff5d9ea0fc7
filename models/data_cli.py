"""`kvrec data ...`: fetch MovieLens, write a synthetic dataset, print dataset statistics.

Handlers import numpy/torch lazily so that `kvrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` command and its subcommands to the top-level `sub` parsers."""
    data = sub.add_parser("data", help="fetch, generate and inspect datasets", description=__doc__)
    cmds = data.add_subparsers(dest="data_cmd", required=True, metavar="{fetch,synth,stats}")

    p = cmds.add_parser(
        "fetch",
        help="download and verify a MovieLens release",
        description="Download a MovieLens zip from GroupLens, check its md5 and unpack it into DEST/<name>.",
    )
    p.add_argument("name", help="movielens-NAME, NAME: ml-latest-small, ml-1m, ml-10m, ml-20m or ml-25m")
    p.add_argument("--dest", default="data", help="folder to unpack into (default: ./data)")
    p.add_argument("--url", help="download from this URL instead of GroupLens (file:// works)")
    p.add_argument("--md5", help="expected md5 of the zip (overrides the known one)")
    p.add_argument("--sha256", help="expected sha256 of the zip")
    p.set_defaults(func=_fetch)

    p = cmds.add_parser(
        "synth",
        help="write a synthetic dataset as events.csv",
        description="Generate the synthetic dataset of models.synth and write OUT/events.csv "
        "(user_id,item_id,timestamp,action) and OUT/synth.json (its parameters).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--users", type=int, default=500, help="number of users (default: 500)")
    p.add_argument("--items", type=int, default=1500, help="catalogue size (default: 1500)")
    p.add_argument("--mean-len", type=float, default=400, help="mean history length (default: 400)")
    p.add_argument("--max-len", type=int, default=10_000, help="longest history (default: 10000)")
    p.add_argument(
        "--long-range", type=float, default=0.8,
        help="share of sessions that replay far-history content, 0..1 (default: 0.8)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_synth)

    p = cmds.add_parser(
        "stats",
        help="print size and sequence-length statistics",
        description="Load a dataset (file, folder, name under the datasets root, or synth spec such as "
        "synth-long:users=100) and print its statistics.",
    )
    p.add_argument("source", help="path, dataset name (ml-latest-small, lastfm, amazon-beauty) or synth spec")
    p.add_argument("--min-len", type=int, default=1, help="drop users with fewer events (default: 1)")
    p.set_defaults(func=_stats)


def _fetch(args: argparse.Namespace) -> int:
    from kvrec.models.fetch import fetch_movielens

    name = args.name.removeprefix("movielens-")
    name = name if name.startswith("ml-") else f"ml-{name}"
    try:
        path = fetch_movielens(name, args.dest, url=args.url, md5=args.md5, sha256=args.sha256)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{name} is in {path}; try `kvrec data stats {path}`")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from kvrec.models.data import save_events_csv
    from kvrec.models.synth import generate

    params = dict(
        users=args.users, items=args.items, mean_len=args.mean_len, max_len=args.max_len,
        long_range=args.long_range, seed=args.seed,
    )
    ds = generate(**params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_events_csv(ds, out / "events.csv")
    (out / "synth.json").write_text(json.dumps({**params, "fingerprint": ds.fingerprint()}, indent=2))
    print(f"wrote {ds.num_events:,} events of {len(ds.seqs):,} users to {out / 'events.csv'}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from kvrec.models.data import load_dataset

    try:
        ds = load_dataset(args.source, min_len=args.min_len)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = {"dataset": ds.name, **ds.stats(), "has_time": ds.has_time, "has_action": ds.has_action,
            "fingerprint": ds.fingerprint()}
    for key, value in rows.items():
        print(f"{key:<12} {_show(value)}")
    return 0


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
