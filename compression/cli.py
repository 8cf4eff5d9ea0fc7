"""`kvrec bench offline` and `kvrec bench levels`: registered by the compression package; heavy imports stay
in the handlers.

Also the policy-list pieces every command that takes several policies shares (`bench offline`, `bench
serve`, `sweep`): the default list, its parser and the check of each spec against the served model.
"""

from __future__ import annotations

import sys

from kvrec.models.cli import UsageError, at_least, fraction, int_list, positive_int
from kvrec.models.data_cli import add_layout_arguments

DEFAULT_POLICIES = "full;int8;kivi:bits=2;h2o:budget=256;recompute"


def parse_policy_list(text: str) -> list[str]:
    """`full;int8;kivi:bits=2` -> the specs, in order. `;` separates because specs use `,` and `+`.

    Only the list is checked here (empty, a spec twice); each spec is checked by `check_policies`,
    which needs the model. Usable as an argparse `type=`."""
    specs = [s.strip() for s in text.split(";") if s.strip()]
    if not specs:
        raise UsageError("no policies given; use e.g. --policies 'full;int8;recompute'")
    if len(set(specs)) != len(specs):
        raise UsageError(f"a policy is listed twice in {text!r}; list each once")
    return specs


def check_policies(specs: list[str], checkpoint=None) -> None:
    """Raise PolicyError for the first spec that does not parse, before anything is started.

    With the checkpoint, each spec is bound to its model as the server binds it (so a policy that does
    not apply to the model, or `svd` without saved bases, is refused). Without one, only the grammar and
    the parameters are checked, stage by stage: what can be known before a model is loaded."""
    from kvrec.compression.base import PolicyContext
    from kvrec.compression.spec import parse_policy, parse_stage

    for spec in specs:
        if checkpoint is None:
            for stage in spec.split("+"):
                parse_stage(stage)
        else:
            parse_policy(spec, context=PolicyContext(model=checkpoint.model, checkpoint_path=checkpoint.path))


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser(
        "offline", help="replay users' streams through the model under each compression policy",
        description="Replay every user's stream (prefix pre-loaded as the state, the rest as requests) "
                    "under each policy, as the server applies it: extend -> compress -> encode -> decode. "
                    "Writes results.json, results.csv, results.md and pareto.png to --out. "
                    "`--policies list` prints every policy with its parameters and needs nothing else.")
    p.add_argument("--model", help="model checkpoint from `kvrec train` (required)")
    p.add_argument("--dataset", help="dataset name, path or synth spec, as `kvrec train` (required)")
    add_layout_arguments(p)
    p.add_argument("--policies", required=True,
                   help='";"-separated policy specs, e.g. "full;recompute;h2o:budget=256+int8"; '
                        '"list" prints every policy with its parameters')
    p.add_argument("--out", help="output folder (required)")
    add_replay_arguments(p)
    p.add_argument("--candidates", type=at_least(0), default=100,
                   help="with a ranking head: rank the next item among this many sampled candidates over the "
                        "state each policy left (0: no ranking)")
    p.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=offline)
    register_levels(bench_sub)


def offline(args) -> int:
    import torch
    from kvrec.compression.bench import run_offline
    from kvrec.compression.report import markdown_table, write_results
    from kvrec.compression.spec import describe_policies
    from kvrec.models.checkpoint import load_checkpoint
    from kvrec.models.data import load_dataset

    if args.policies.strip() == "list":
        print(describe_policies())
        return 0
    missing = [flag for flag in ("model", "dataset", "out") if getattr(args, flag) is None]
    if missing:
        raise UsageError(f"{', '.join('--' + m for m in missing)} required (only `--policies list` needs none)")
    specs = parse_policy_list(args.policies)
    check_policies(specs)  # a typo fails here, before the model and the data are loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.model)
    dataset = load_dataset(args.dataset, format=args.format, columns=args.columns)
    streams, replayed = replay_split(args, dataset, [checkpoint])
    if not streams:
        raise UsageError(f"{dataset.name}: no user has {args.events_per_request + 1} events after the prefix; "
                         "lower --events-per-request or --fraction")
    rows = run_offline(checkpoint, streams, specs, events_per_request=args.events_per_request,
                       max_users=args.max_users, max_requests_per_user=args.max_requests_per_user,
                       negatives=args.negatives, seed=args.seed, rank_candidates=args.candidates)
    title = (f"{checkpoint.config.kind} on {args.dataset}: {rows[0]['users']} users ({replayed}), "
             f"{args.events_per_request} events/request")
    out = write_results(rows, args.out, title)
    print(markdown_table(rows))
    print(f"wrote {out}/results.json, results.csv, results.md, pareto.png")
    return 0


DEFAULT_LEVEL_POLICIES = "full;int8;kivi:bits=2;h2o:budget=256+int8"


def model_list(text: str) -> list[str]:
    """`base.ckpt,gqa.ckpt` -> the paths, in order (an argparse `type=`); the first is the base."""
    import argparse

    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths:
        raise argparse.ArgumentTypeError("no checkpoints given; use e.g. base.ckpt,gqa2.ckpt")
    return paths


def add_replay_arguments(p) -> None:
    """The replay flags `bench offline` and `bench levels` share: which users' requests, and how many."""
    p.add_argument("--events-per-request", type=positive_int, default=10, help="events sent per request")
    p.add_argument("--max-users", type=positive_int, default=None, help="replay at most this many users "
                   "(default: all)")
    p.add_argument("--max-requests-per-user", type=positive_int, default=None,
                   help="replay at most this many requests per user (default: the whole future)")
    p.add_argument("--negatives", type=positive_int, default=100,
                   help="sampled negatives per request (GAUC, Recall@10)")
    p.add_argument("--fraction", type=fraction, default=0.5,
                   help="share of each history pre-loaded as the prefix, 0..1")


def replay_split(args, dataset, checkpoints: list) -> tuple[list, str]:
    """The users a replay scores, cut by the replay flags (`add_replay_arguments`): only those every
    checkpoint was kept from in training, when they were (said on stderr); and how the titles name them."""
    from kvrec.compression.bench import unseen_users
    from kvrec.models.data import stream_split

    users, which = unseen_users(dataset, checkpoints)
    print(which, file=sys.stderr)
    streams = stream_split(dataset, fraction=args.fraction, min_future=args.events_per_request + 1, users=users)
    return streams, "held out of training" if users is not None else "trained on"


def register_levels(bench_sub) -> None:
    p = bench_sub.add_parser(
        "levels", help="MALLOC's levels in one table: trained variants and post-hoc policies on the same requests",
        description="Replay the same users' requests through every model of --models (the base first, then "
                    "trained variants: grouped-query, latent, recurrent, memory, slots) under `full` and each "
                    "post-hoc policy that applies to it, and compare every row's NDCG@10 with the base model's "
                    "`full`, request by request (relative difference, bootstrap s.e. and 95% interval over "
                    "users). Sizes: the mean stored state of the replay, and the blob after --lengths events "
                    "of one fixed stream served in --growth-request requests. Writes results.json, results.csv, "
                    "results.md and pareto.png to --out and prints the table.")
    p.add_argument("--models", type=model_list, required=True,
                   help="comma-separated checkpoints trained on one dataset; the first is the base every row is "
                        "compared with")
    p.add_argument("--dataset", required=True, help="the dataset the models were trained on (name, path or synth "
                   "spec, as `kvrec train`)")
    add_layout_arguments(p)
    p.add_argument("--policies", default=DEFAULT_LEVEL_POLICIES,
                   help='";"-separated post-hoc policy specs applied to each model where they apply (`full` always '
                        "runs)")
    p.add_argument("--out", required=True, help="output folder")
    add_replay_arguments(p)
    p.add_argument("--lengths", type=int_list, default="1000,10000",
                   help="event counts at which the state size is measured, comma-separated")
    p.add_argument("--growth-request", type=positive_int, default=100,
                   help="events per request while growing a state to --lengths (the policy runs after each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=levels)


def levels(args) -> int:
    import torch
    from kvrec.compression.bench_levels import INTERVAL, check_same_dataset, labels_of, run_levels
    from kvrec.compression.report import levels_table, write_levels
    from kvrec.models.checkpoint import load_checkpoint
    from kvrec.models.data import load_dataset

    specs = parse_policy_list(args.policies)
    check_policies(specs)  # a typo fails here, before the models and the data are loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = [load_checkpoint(path) for path in args.models]
    labels = labels_of(args.models)
    check_same_dataset(checkpoints, labels)
    dataset = load_dataset(args.dataset, format=args.format, columns=args.columns)
    if dataset.item_ids != checkpoints[0].item_ids:
        raise UsageError(f"the item ids of {dataset.name} differ from the models'; give the dataset "
                         f"{args.models[0]} was trained on")
    streams, replayed = replay_split(args, dataset, checkpoints)
    rows = run_levels(checkpoints, streams, specs, labels=labels, events_per_request=args.events_per_request,
                      max_users=args.max_users, max_requests_per_user=args.max_requests_per_user,
                      negatives=args.negatives, seed=args.seed, lengths=args.lengths,
                      growth_request=args.growth_request)
    done = next(r for r in rows if not r.get("skipped"))
    title = (f"MALLOC levels against {labels[0]} `full` on {args.dataset}\n{done['users']} users ({replayed}), "
             f"{done['requests']} requests of {args.events_per_request} events")
    lengths = ", ".join(f"{n:,}" for n in sorted(set(args.lengths)))
    notes = (f"NDCG@10 vs base: paired per request against {labels[0]} `full`; {INTERVAL}. Sizes at {lengths} "
             f"events: one fixed stream (the longest replayed user's history, cycled) served in requests of "
             f"{args.growth_request} events, the policy applied after each, then encoded. Ratios are against "
             f"{labels[0]} `full`. target: the replay-mean ratio is >= 8 (32) and the interval's lower bound "
             ">= -1% (-5%).")
    out = write_levels(rows, args.out, title, notes)
    print(levels_table(rows))
    print(f"wrote {out}/results.json, results.csv, results.md, pareto.png")
    return 0
