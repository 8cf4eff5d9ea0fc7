"""`kvrec bench rank`: what ranking C candidates against a T-event history costs, three ways.

    cached         the stored state is decoded and the candidates, as target tokens, attend to it in
                   batches (M-FALCON over a per-user cache: Climber's TURBO, recsys-examples' KV cache)
    recompute      the history is encoded from scratch, then the same batched candidates
    per_candidate  each candidate appended to the whole history and run alone: no cache, no batching

Attention work per layer is about C*T*d cached, T*T*d + C*T*d recomputed and C*T*T*d per candidate, so
`cached` over `recompute` is bounded by roughly T/C + 1 and over `per_candidate` by about T. Every mode
scores the same candidates with the same weights; only where the history's keys come from differs.

`per_candidate` at 4,000 events x 1,024 candidates would take minutes a cell on a CPU, so it times a
sample of the candidates (`--per-candidate-sample`, each one a full pass) and reports the mean per
candidate times C; its rows say how many were measured (`measured_candidates`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from kvrec.models.cli import UsageError, int_list, positive_int

MODES = ("cached", "recompute", "per_candidate")


def register(bench_sub) -> None:
    p = bench_sub.add_parser(
        "rank", help="ranking cost: cached state vs recompute vs one candidate at a time",
        description="Time ranking C candidates (target tokens: each sees the history and itself) against "
                    "a T-event history three ways: `cached` (decode the stored state, batched candidates), "
                    "`recompute` (encode the history, then the batched candidates) and `per_candidate` "
                    "(each candidate appended to the history and run alone). Without --model, an untrained "
                    "model of the default size with a ranking head (cost does not depend on training).")
    p.add_argument("--model", default=None, help="checkpoint with a ranking head (default: untrained)")
    p.add_argument("--kind", default="hstu", help="backbone of the untrained model when no --model")
    p.add_argument("--lengths", type=int_list, default="250,1000,4000", help="history lengths, comma-separated")
    p.add_argument("--candidates", type=int_list, default="64,256,1024", help="candidate counts, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--batch", type=positive_int, default=256, help="candidates per pass over the state")
    p.add_argument("--policy", default="full", help="policy of the stored state that `cached` decodes")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed requests per cell (the median counts)")
    p.add_argument("--per-candidate-sample", type=positive_int, default=8,
                   help="candidates timed one by one in `per_candidate` (the mean per candidate x C)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="also write the rows to this JSON file (default: none)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch
    from kvrec.compression.cli import check_policies
    from kvrec.models.checkpoint import load_checkpoint, untrained_checkpoint
    from kvrec.models.cli import default_device

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UsageError(f"unknown --modes {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    device = default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        checkpoint = load_checkpoint(args.model, device=device)
        if checkpoint.model.rank_head is None:
            raise UsageError(f"{args.model} has no ranking head; train one with `kvrec train --task ranking`")
    else:
        checkpoint = untrained_checkpoint(args.kind, ranking_head=True)
        checkpoint.model.to(device)
        print(f"kvrec bench rank: no --model, timing an untrained {args.kind} of the default size",
              file=sys.stderr)
    check_policies([args.policy], checkpoint)
    rows = run(checkpoint, args.lengths, args.candidates, modes, batch=args.batch, policy=args.policy,
               repeats=args.repeats, sample=args.per_candidate_sample)
    cfg = checkpoint.config
    print(f"model {cfg.kind}: {cfg.layers} layers x {cfg.heads} heads x (d_k {cfg.d_k} + d_v {cfg.d_v}); "
          f"device {device}; torch threads {torch.get_num_threads()}; batch {args.batch}; state {args.policy}")
    print(format_table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": cfg.to_dict(), "device": device, "batch": args.batch, "policy": args.policy,
                       "rows": rows}, f, indent=2)
    return 0


def run(checkpoint, lengths: list[int], counts: list[int], modes: list[str], *, batch: int, policy: str,
        repeats: int, sample: int) -> list[dict]:
    """One row per (length, candidates, mode): the median ms of `repeats` requests, candidates per second."""
    import torch
    from kvrec.compression.base import PolicyContext
    from kvrec.compression.spec import parse_policy
    from kvrec.compression.step import ServingStep
    from kvrec.models.state import Events

    model = checkpoint.model
    step = ServingStep(model, parse_policy(policy, PolicyContext(model=model)), checkpoint.fingerprint)
    gen = torch.Generator().manual_seed(0)
    n_items = model.cfg.num_items
    rows = []
    for length in lengths:
        history = Events.of(torch.randint(0, n_items, (length,), generator=gen),
                            1_600_000_000 + 60 * torch.arange(length), torch.randint(1, 6, (length,), generator=gen))
        ts = int(history.ts[-1])
        blob = step.advance(step.start(), history).blob  # what the store holds for this user

        def cached(cands, _blob=blob, _ts=ts):
            return step.rank(step.restore(_blob), cands, _ts, batch)

        def recompute(cands, _history=history, _ts=ts):
            return step.rank(model.prefill(_history, step.chunk)[0], cands, _ts, batch)

        for count in counts:
            cands = torch.randint(0, n_items, (count,), generator=gen)
            for mode in modes:
                if mode == "per_candidate":
                    measured = cands[:min(sample, count)]
                    ms = statistics.mean(timed(recompute, c[None]) for c in measured) * count  # a pass each
                else:
                    fn = cached if mode == "cached" else recompute
                    fn(cands)  # warm-up: allocator, first-call dispatch
                    ms = statistics.median(timed(fn, cands) for _ in range(repeats))
                    measured = cands
                rows.append({"length": length, "candidates": count, "mode": mode, "ms_per_request": ms,
                             "candidates_per_s": count / ms * 1e3, "measured_candidates": len(measured)})
                print(f"  {length:>6} x {count:>5} {mode:<14} {ms:10.2f} ms", file=sys.stderr)
    for row in rows:
        same = {r["mode"]: r["ms_per_request"] for r in rows
                if (r["length"], r["candidates"]) == (row["length"], row["candidates"])}
        row["cached_speedup"] = same[row["mode"]] / same["cached"] if "cached" in same else None
    return rows


def timed(fn, *args) -> float:
    """Wall-clock ms of one call `fn(*args)` (on CUDA, after the device has finished)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    clock = time.perf_counter()
    fn(*args)
    sync()
    return (time.perf_counter() - clock) * 1e3


def format_table(rows: list[dict]) -> str:
    head = f"{'length':>6} {'cands':>6} {'mode':<14} {'ms/request':>11} {'cands/s':>11} {'cached is':>10}"
    lines = ["ms per request (median; per_candidate: mean of the measured candidates x C); "
             "cached is = this mode's time over cached's", head, "-" * len(head)]
    for r in rows:
        speed = f"{r['cached_speedup']:.1f}x" if r["cached_speedup"] else "-"
        note = f"  ({r['measured_candidates']} measured)" if r["measured_candidates"] < r["candidates"] else ""
        lines.append(f"{r['length']:>6} {r['candidates']:>6} {r['mode']:<14} {r['ms_per_request']:>11.2f} "
                     f"{r['candidates_per_s']:>11.0f} {speed:>10}{note}")
    return "\n".join(lines)
