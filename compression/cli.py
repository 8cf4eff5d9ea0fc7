"""`kvrec bench offline`: registered by the compression package; heavy imports stay in the handler."""

from __future__ import annotations


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "offline", help="replay users' streams through the model under each compression policy",
        description="Replay every user's stream (prefix pre-loaded as the state, the rest as requests) "
                    "under each policy, as the server applies it: extend -> compress -> encode -> decode. "
                    "Writes results.json, results.csv, results.md and pareto.png to --out.")
    p.add_argument("--model", required=True, help="model checkpoint (from `kvrec train`)")
    p.add_argument("--dataset", required=True, help="dataset name, path or synth spec (as `kvrec train`)")
    p.add_argument("--policies", required=True,
                   help='";"-separated policy specs, e.g. "full;recompute;h2o:budget=256+int8"; '
                        '"list" prints every policy with its parameters')
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--events-per-request", type=int, default=10)
    p.add_argument("--max-users", type=int, default=None)
    p.add_argument("--max-requests-per-user", type=int, default=None)
    p.add_argument("--negatives", type=int, default=100, help="sampled negatives per request (GAUC, Recall@10)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of each history pre-loaded as the prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=offline)


def offline(args) -> int:
    import sys

    import torch
    from kvrec.compression.bench import run_offline
    from kvrec.compression.report import markdown_table, write_results
    from kvrec.compression.spec import PolicyError, describe_policies, parse_policy
    from kvrec.models.checkpoint import CheckpointError, load_checkpoint
    from kvrec.models.data import load_dataset, stream_split

    if args.policies.strip() == "list":
        print(describe_policies())
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [s.strip() for s in args.policies.split(";") if s.strip()]
    try:
        for spec in specs:
            if not spec.startswith("svd"):
                parse_policy(spec)  # fail fast on a typo, before loading anything
        checkpoint = load_checkpoint(args.model)
        dataset = load_dataset(args.dataset)
    except (PolicyError, CheckpointError, ValueError, OSError) as exc:
        print(f"kvrec bench offline: {exc}", file=sys.stderr)
        return 2
    streams = stream_split(dataset, fraction=args.fraction, min_future=args.events_per_request + 1)
    rows = run_offline(checkpoint, streams, specs, events_per_request=args.events_per_request,
                       max_users=args.max_users, max_requests_per_user=args.max_requests_per_user,
                       negatives=args.negatives, seed=args.seed)
    title = (f"{checkpoint.config.kind} on {args.dataset}: {rows[0]['users']} users, "
             f"{args.events_per_request} events/request")
    out = write_results(rows, args.out, title)
    print(markdown_table(rows))
    print(f"wrote {out}/results.json, results.csv, results.md, pareto.png")
    return 0
