"""`kvrec data`, `kvrec train` and `kvrec eval-model`: registered by the models package.

Also the pieces every package's commands share, here because models is the bottom of the import graph:
`UsageError`, which a command raises for a mistake in its input (kvrec.cli prints it as one line and
exits 2, where anything else is a bug and keeps its traceback), and argparse `type=` validators that
turn a bad number into such a line before anything runs.
"""

from __future__ import annotations

import argparse
import json
import sys


class UsageError(Exception):
    """A mistake in what the user gave a command (a file, a name, a number, a port); the message names
    the problem and what to do. Data, checkpoint and policy errors are user errors too, by their own
    types (DataError, CheckpointError, PolicyError): kvrec.cli.main treats all of them alike."""


def at_least(low: float, kind: type = int):
    """An argparse `type=` that parses `kind` and refuses values below `low` (`--users 0`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)
non_negative_float = at_least(0.0, float)


def between(low: float, high: float):
    """An argparse `type=` for a number in [low, high] (a dropout, a share of sessions)."""
    def parse(text: str) -> float:
        value = at_least(low, float)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value
    return parse


def int_list(text: str) -> list[int]:
    """`250,1000,4000` -> [250, 1000, 4000], each a positive integer (an argparse `type=`)."""
    parts = [x for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("no numbers given; use e.g. 250,1000,4000")
    return [positive_int(x.strip()) for x in parts]


def fraction(text: str) -> float:
    """An argparse `type=` for a share strictly between 0 and 1 (a prefix fraction, a dropout)."""
    value = at_least(0.0, float)(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value

# named base shapes (`kvrec train --preset`): with 2 heads a head-level reduction can never exceed 2x
PRESETS = {"small": {"heads": 2, "head_dim": 32}, "wide": {"heads": 8, "head_dim": 16}}

# per-model learning rates: HSTU's pointwise attention (no softmax to bound it) trains well at twice
# SASRec's rate; at 1e-3 it stopped at 1.9x popularity NDCG@10 on ml-latest-small, at 2e-3 2.2x
DEFAULT_LR = {"hstu": 2e-3, "sasrec": 1e-3, "astro": 1e-3}

# models.registry.MODELS' names, spelled out so that `kvrec --help` needs no torch (a test keeps them equal)
MODEL_KINDS = ("hstu", "sasrec", "astro")

TRAIN_HELP = """Train HSTU, SASRec or ASTRO on a dataset's leave-one-out split (sampled softmax, AdamW, early stopping
on validation NDCG@10) and write one safetensors checkpoint holding weights, config, the item-id map and
the dataset fingerprint. `--task ranking` adds a target-aware ranking head trained jointly (candidates as
target tokens at sampled cut points: listwise softmax over the true next item and sampled negatives, plus
the engagement label where the data has one) and selects on validation ranking NDCG@10 among
--eval-candidates sampled items. DATASET is a file or folder (MovieLens ratings.csv/.dat/u.data, Taobao
UserBehavior, `uid i1 i2 ...` lines, `uid iid` pairs, a CSV/TSV whose header names user/item/time/rating/action
columns; an ambiguous file is refused: say which with --format/--columns), a name under ../shared/datasets
(ml-latest-small, lastfm, amazon-beauty, taobao-userbehavior-sample), or a synthetic spec (synth-long,
synth-short, synth-long:users=1000,mean_len=1000)."""


def register(sub) -> None:
    from kvrec.models import data_cli  # here: data_cli imports this module's validators

    data_cli.register(sub)
    p = sub.add_parser("train", help="train a model and write a checkpoint", description=TRAIN_HELP)
    p.add_argument("--model", choices=MODEL_KINDS, default="hstu", help="backbone")
    p.add_argument("--dataset", required=True, help="path, dataset name or synth spec")
    p.add_argument("--out", required=True, help="checkpoint path (.ckpt, safetensors)")
    p.add_argument("--min-len", type=positive_int, default=3, help="drop users with fewer events")
    data_cli.add_layout_arguments(p)
    p.add_argument("--max-len", type=positive_int, default=200, help="training window, in events")
    p.add_argument("--dim", type=positive_int, default=64, help="embedding width")
    p.add_argument("--layers", type=positive_int, default=2, help="attention blocks")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="named base shape: small = 2 heads x 32 dims (the design card's model); wide = 8 heads "
                   "x 16 dims, where head-level reductions can reach 8x; --heads/--head-dim override it")
    p.add_argument("--heads", type=positive_int, default=None, help="attention heads per block (default: the preset's)")
    p.add_argument("--head-dim", type=positive_int, default=None, help="d_k = d_v, per head (default: the preset's)")
    p.add_argument("--dropout", type=between(0.0, 1.0), default=0.2, help="dropout probability")
    p.add_argument("--epochs", type=positive_int, default=200,
                   help="upper bound; early stopping usually ends sooner")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per batch, at most")
    p.add_argument("--pair-budget", type=positive_int, default=32_000_000,
                   help="cap on batch x window x window attention entries: long windows train in smaller batches")
    p.add_argument("--lr", type=at_least(0.0, float), default=None,
                   help="AdamW learning rate (default: per model, " +
                   ", ".join(f"{kind} {lr:g}" for kind, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--negatives", type=positive_int, default=256,
                   help="random negatives per batch (plus as many in-batch)")
    p.add_argument("--temperature", type=at_least(1e-6, float), default=0.05, help="softmax temperature")
    p.add_argument("--patience", type=positive_int, default=10,
                   help="validations without a better NDCG@10 before stopping (validation NDCG on a few hundred "
                   "users is noisy: at 5, HSTU stopped at epoch 22 on ml-latest-small, 1.8x popularity; at 10, "
                   "epoch 44+, 2.2x)")
    p.add_argument("--max-minutes", type=at_least(0.0, float), default=None,
                   help="stop after this many minutes of training (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--holdout-users", type=between(0.0, 0.99), default=0.0, metavar="FRACTION",
                   help="keep this share of users (chosen by a hash of the user id) out of training altogether; "
                   "`kvrec bench offline|levels` then replay only them, so accuracy is measured on users the "
                   "model never saw rather than on its own training events (default: 0, train on every user)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    g = p.add_argument_group("trained memory levels (one at a time; post-hoc policies stack on any)")
    g.add_argument("--kv-heads", type=positive_int, default=None,
                   help="grouped-query attention: K/V heads, dividing --heads (1: multi-query attention; "
                   "default: one per head)")
    g.add_argument("--latent-dim", type=positive_int, default=None,
                   help="multi-head latent attention: cache one latent of this width per token, K and V "
                   "up-projected from it (smaller than heads x 2 x head-dim; default: off)")
    g.add_argument("--rope-dim", type=positive_int, default=16,
                   help="width of MLA's decoupled rotary key (sasrec)")
    g.add_argument("--recurrent", choices=["linear"], default=None,
                   help="decayed linear attention (hstu): a fixed-size state per layer and head (default: off)")
    g.add_argument("--memory", type=positive_int, default=None, metavar="W",
                   help="compressive memory (hstu): the last W events exact, older ones folded into a linear "
                   "memory (Infini-attention; default: off)")
    g.add_argument("--slots", type=positive_int, default=None, metavar="S",
                   help="trained sequence compression (hstu): events older than --slot-window folded into S "
                   "learned slots (default: off)")
    g.add_argument("--slot-window", type=positive_int, default=64, help="events kept exact beside --slots")
    g = p.add_argument_group("ranking task")
    g.add_argument("--task", choices=["retrieval", "ranking"], default="retrieval",
                   help="retrieval: next-item scoring of the catalogue; ranking: also a target-aware ranking head, "
                   "trained jointly")
    g.add_argument("--rank-cuts", type=positive_int, default=8, help="cut points per training window (ranking)")
    g.add_argument("--rank-negatives", type=positive_int, default=15,
                   help="sampled negatives beside the true item at each cut (ranking)")
    g.add_argument("--rank-sampling", choices=["uniform", "popularity"], default="uniform",
                   help="how the ranking negatives are drawn from the catalogue")
    g.add_argument("--rank-weight", type=non_negative_float, default=1.0,
                   help="weight of the listwise ranking loss beside the retrieval loss (weight 1)")
    g.add_argument("--engage-weight", type=non_negative_float, default=1.0,
                   help="weight of the engagement loss, where the data has engagement labels")
    g.add_argument("--eval-candidates", type=at_least(2), default=100,
                   help="sampled candidates (the true item included) per validation user (ranking)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-model", help="full-ranking HR/NDCG@10/50 on the leave-one-out test split, and "
                       "ranking among sampled candidates",
                       description="Rank each user's true last item against the whole catalogue, given the "
                       "history before it; the popularity baseline is reported beside the model. Then rank it "
                       "among --candidates sampled items by the ranking head (a model trained with --task "
                       "ranking) and by retrieval on the same candidates, with the engagement head's AUC and "
                       "GAUC where the data has engagement labels.")
    p.add_argument("--model", required=True, help="checkpoint from `kvrec train`")
    p.add_argument("--dataset", required=True, help="the dataset the model was trained on")
    p.add_argument("--min-len", type=positive_int, default=3, help="drop users with fewer events")
    data_cli.add_layout_arguments(p)
    p.add_argument("--history", type=positive_int, default=None,
                   help="use only each user's last N events (default: the whole history)")
    p.add_argument("--compare-history", type=positive_int, default=None, metavar="N",
                   help="also score with only the last N events and report the per-user paired NDCG@10 "
                   "difference against --history, with its standard error (default: no comparison)")
    p.add_argument("--exclude-seen", choices=["auto", "yes", "no"], default="auto",
                   help="leave already-seen items out of the ranking; auto: only if no user repeats an item")
    p.add_argument("--candidates", type=non_negative_int, default=100,
                   help="also rank the true item among this many sampled candidates (itself included, negatives "
                   "uniform over items not in the history) by the ranking head, when the model has one, and by "
                   "retrieval; 0 skips it")
    p.add_argument("--gauc-events", type=positive_int, default=20,
                   help="engagement GAUC over each user's last N events, scored from their prefixes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled candidates")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file (default: none)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_eval)


def default_device(requested: str | None) -> str:
    """`--device`, checked here so that a misspelt or absent device is a usage error, not torch's traceback."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(requested).type
    except RuntimeError:
        raise UsageError(f"unknown --device {requested!r}; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested} but torch sees no CUDA device; use --device cpu")
    return requested


def cmd_train(args) -> int:
    import torch
    from kvrec.models.checkpoint import save_checkpoint
    from kvrec.models.data import load_dataset
    from kvrec.models.recommender import ModelConfig
    from kvrec.models.train import TrainConfig, train

    device = default_device(args.device)  # checked before the data is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    heads, head_dim = args.heads or preset["heads"], args.head_dim or preset["head_dim"]
    try:
        model_cfg = ModelConfig(kind=args.model, dim=args.dim, layers=args.layers, heads=heads, d_k=head_dim,
                                d_v=head_dim, max_len=args.max_len, dropout=args.dropout,
                                kv_heads=args.kv_heads or 0, latent_dim=args.latent_dim or 0,
                                rope_dim=args.rope_dim, recurrent=args.recurrent or "", memory=args.memory or 0,
                                slots=args.slots or 0, slot_window=args.slot_window)
    except ValueError as e:  # an impossible combination, refused before the data is loaded
        raise UsageError(str(e)) from None
    dataset = load_dataset(args.dataset, min_len=args.min_len, format=args.format, columns=args.columns)
    print(f"dataset {dataset.name}: {dataset.stats()}", file=sys.stderr)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr or DEFAULT_LR[args.model],
                            random_negatives=args.negatives, in_batch_negatives=args.negatives,
                            temperature=args.temperature, patience=args.patience, max_minutes=args.max_minutes,
                            pair_budget=args.pair_budget, seed=args.seed, task=args.task, rank_cuts=args.rank_cuts,
                            rank_negatives=args.rank_negatives, rank_sampling=args.rank_sampling,
                            rank_weight=args.rank_weight, engage_weight=args.engage_weight,
                            eval_candidates=args.eval_candidates, holdout=args.holdout_users)
    if args.task == "ranking" and not dataset.engagement_actions:
        print(f"{dataset.name} has no engagement label: the ranking head learns relevance only", file=sys.stderr)
    model, summary = train(dataset, model_cfg, train_cfg, device=device)
    summary["dataset"] = dataset.name
    ckpt = save_checkpoint(args.out, model.cpu(), dataset.item_ids, dataset.fingerprint(), summary)
    print(f"wrote {ckpt.path} (model {ckpt.fingerprint}, task {summary['task']}): best valid NDCG@10 "
          f"{summary['valid_ndcg@10']:.4f} at epoch {summary['best_epoch']}, {summary['minutes']} min")
    if "valid_ranking" in summary:
        print(ranking_line("valid", summary["valid_ranking"]))
    return 0


def _metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def ranking_line(what: str, r: dict) -> str:
    """One line of sampled-candidate ranking metrics (models.evaluate.evaluate_ranking's keys)."""
    line = f"{what} among {r['candidates']} candidates:"
    if "rank_ndcg@10" in r:
        line += f" ranking head NDCG@10 {r['rank_ndcg@10']:.4f} HR@10 {r['rank_hr@10']:.4f};"
    line += f" retrieval NDCG@10 {r['rank_retrieval_ndcg@10']:.4f} HR@10 {r['rank_retrieval_hr@10']:.4f}"
    if "rank_minus_retrieval_ndcg@10" in r:
        line += (f" (head - retrieval {r['rank_minus_retrieval_ndcg@10']:+.4f} ± "
                 f"{r['rank_minus_retrieval_se']:.4f} paired s.e.)")
    if "rank_popularity_ndcg@10" in r:
        line += f"; popularity NDCG@10 {r['rank_popularity_ndcg@10']:.4f} HR@10 {r['rank_popularity_hr@10']:.4f}"
    if "engage_auc" in r:
        line += (f"; engagement AUC {_metric(r['engage_auc'])} (positive rate {r['engage_positive_rate']:.3f}), "
                 f"GAUC {_metric(r.get('engage_gauc'))} over {r.get('engage_gauc_users', 0)} users")
    return line


def cmd_eval(args) -> int:
    from kvrec.models.checkpoint import load_checkpoint
    from kvrec.models.data import leave_one_out, load_dataset
    from kvrec.models.evaluate import evaluate, evaluate_ranking, popularity_scores

    ckpt = load_checkpoint(args.model, device=default_device(args.device))
    dataset = load_dataset(args.dataset, min_len=args.min_len, format=args.format, columns=args.columns)
    if dataset.item_ids != ckpt.item_ids:
        raise UsageError(f"the item ids of {dataset.name} differ from the model's; evaluate on the dataset "
                         f"{args.model} was trained on")
    if dataset.fingerprint() != ckpt.dataset_fingerprint:
        print(f"warning: {args.model} was trained on another dataset (fingerprint {ckpt.dataset_fingerprint}, "
              f"this one {dataset.fingerprint()})", file=sys.stderr)
    split = leave_one_out(dataset)
    exclude = {"auto": None, "yes": True, "no": False}[args.exclude_seen]
    result = evaluate(ckpt.model, split.train, split.test, exclude_seen=exclude, history=args.history,
                      compare_history=args.compare_history)
    engaged = dataset.engagement_actions or frozenset(ckpt.info.get("engagement_actions", ()))
    if args.candidates:
        result["ranking"] = evaluate_ranking(ckpt.model, dataset.seqs, split.test, candidates=args.candidates,
                                             engaged=engaged, gauc_events=args.gauc_events, history=args.history,
                                             seed=args.seed, popularity=popularity_scores(split.train,
                                                                                          dataset.num_items))
    result.update(model=str(args.model), dataset=dataset.name, task=ckpt.info.get("task", "retrieval"))
    print(f"{dataset.name}: {result['users']} users, seen items {'excluded' if result['exclude_seen'] else 'kept'}, "
          f"history {result['history']}")
    print(f"{'':12}{'HR@10':>8}{'NDCG@10':>9}{'HR@50':>8}{'NDCG@50':>9}")
    print(f"{ckpt.config.kind:12}{result['hr@10']:8.4f}{result['ndcg@10']:9.4f}{result['hr@50']:8.4f}"
          f"{result['ndcg@50']:9.4f}")
    print(f"{'popularity':12}{result['popularity_hr@10']:8.4f}{result['popularity_ndcg@10']:9.4f}"
          f"{result['popularity_hr@50']:8.4f}{result['popularity_ndcg@50']:9.4f}")
    if args.compare_history:
        gap = result["compare_history"]
        print(f"NDCG@10 with the last {gap['history']} events {gap['ndcg@10_recent']:.4f} against "
              f"{gap['ndcg@10_whole']:.4f} with history {result['history']}: {gap['difference']:+.4f} "
              f"± {gap['difference_se']:.4f} (paired standard error, {gap['users']} users), "
              f"{gap['relative']:+.1%}")
    if "ranking" in result:
        print(ranking_line("test", result["ranking"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
