"""`kvrec data ...`: fetch MovieLens, write a synthetic dataset, print dataset statistics.

Handlers import numpy/torch lazily so that `kvrec --help` stays fast. Their user errors (DataError)
become one line and exit status 2 in kvrec.cli.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvrec.models.cli import at_least, between, positive_int

# models.data.LAYOUTS' names, spelled out so that `kvrec --help` needs no numpy (a test keeps them equal)
LAYOUT_NAMES = ("movielens-csv", "movielens-dat", "movielens-100k", "taobao", "lines", "pairs", "csv")


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
    p.add_argument("--dest", default="data", help="folder to unpack into")
    p.add_argument("--url", help="download from this URL instead of GroupLens, file:// works (default: GroupLens)")
    p.add_argument("--md5", help="expected md5 of the zip (default: the one GroupLens publishes)")
    p.add_argument("--sha256", help="expected sha256 of the zip (default: not checked)")
    p.set_defaults(func=_fetch)

    p = cmds.add_parser(
        "synth",
        help="write a synthetic dataset as events.csv",
        description="Generate the synthetic dataset of models.synth and write OUT/events.csv "
        "(user_id,item_id,timestamp,action) and OUT/synth.json (its parameters).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--users", type=positive_int, default=500, help="number of users")
    p.add_argument("--items", type=positive_int, default=1500, help="catalogue size, in items")
    p.add_argument("--mean-len", type=at_least(1.0, float), default=400, help="mean history length, in events")
    p.add_argument("--max-len", type=positive_int, default=10_000, help="longest history, in events")
    p.add_argument("--long-range", type=between(0.0, 1.0), default=0.8,
                   help="share of sessions that replay far-history content, 0..1")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_synth)

    p = cmds.add_parser(
        "stats",
        help="print size and sequence-length statistics",
        description="Load a dataset (file, folder, name under the datasets root, or synth spec such as "
        "synth-long:users=100) and print its statistics.",
    )
    p.add_argument("source", help="path, dataset name (ml-latest-small, lastfm, amazon-beauty, "
                   "taobao-userbehavior-sample) or synth spec")
    p.add_argument("--min-len", type=positive_int, default=1, help="drop users with fewer events")
    add_layout_arguments(p)
    p.set_defaults(func=_stats)


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """`--format` and `--columns`, for every command that reads a dataset file: they say how to read a
    file whose layout the loader cannot tell (it refuses rather than guesses); see models.data."""
    p.add_argument("--format", choices=LAYOUT_NAMES, default=None,
                   help="the file's layout (default: recognised from the file; an ambiguous one is refused)")
    p.add_argument("--columns", default=None, metavar="COLUMNS",
                   help="the file's columns instead: roles in order for a table without a header, e.g. "
                   "user,item,rating,time or user,item,-,action,time (- skips a column), or role=NAME pairs "
                   "naming a header's columns, e.g. user=visitor,item=product; roles: user, item, time, "
                   "rating (stars, 0.5..5), action (an id or pv/cart/fav/buy) (default: those of the --format)")


def _fetch(args: argparse.Namespace) -> int:
    from kvrec.models.fetch import fetch_movielens

    name = args.name.removeprefix("movielens-")
    name = name if name.startswith("ml-") else f"ml-{name}"
    path = fetch_movielens(name, args.dest, url=args.url, md5=args.md5, sha256=args.sha256)
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

    ds = load_dataset(args.source, min_len=args.min_len, format=args.format, columns=args.columns)
    rows = {"dataset": ds.name, "layout": ds.layout, **ds.stats(), "has_time": ds.has_time,
            "has_action": ds.has_action}
    if ds.has_action:
        rows.update(_action_rows(ds))
    rows["fingerprint"] = ds.fingerprint()
    for key, value in rows.items():
        print(f"{key:<12} {_show(value)}")
    return 0


def _action_rows(ds) -> dict[str, str]:
    """Events per action id, and the share that counts as engagement (the label a ranking head learns)."""
    import numpy as np

    counts = np.bincount(np.concatenate([s.actions.numpy() for s in ds.seqs]))
    ids = np.flatnonzero(counts)
    shown = ", ".join(f"{i}: {counts[i]:,}" for i in ids[:12]) + (f", {len(ids) - 12} more" if len(ids) > 12 else "")
    if not ds.engagement_actions:
        return {"actions": shown, "engagement": "not defined for this layout"}
    engaged = int(sum(counts[i] for i in ds.engagement_actions if i < len(counts)))
    which = ", ".join(map(str, sorted(ds.engagement_actions)))
    return {"actions": shown, "engagement": f"actions {which}: {engaged:,} events ({engaged / counts.sum():.1%})"}


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
