"""`kvrec bench serve`: what one request costs, stage by stage, per history length and policy.

It drives the service's own `RankingPipeline` in process against a real Redis (`--redis-url`, else
`KVREC_REDIS_URL` or `REDIS_URL`, else an embedded redis-server), so every stage the service runs is
timed (append, load, decode, extend, compress, encode, store, score) without HTTP in the way. Each cell
warms a few users to the history length with `PUT /users/{id}/history`'s code path, then times requests
that each add one new event and ask for a top-10 over the whole catalogue, the steady state of a live
service (with the hot tier, as the service runs by default, those requests find their user held;
`--hot-tier-bytes 0` times them through Redis's blob instead). The table shows the mean and the p99
(kvrec.models.metrics.percentile, as /metrics and the sweep report compute it), the speed-up over
`recompute` at the same length, the codec's (decode + encode) share of service time, and the stored
blob against the raw fp32 state of the whole history (`State.dense_bytes`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid

import torch
from kvrec.models.checkpoint import UNTRAINED_ITEMS, Checkpoint, load_checkpoint, untrained_checkpoint
from kvrec.models.metrics import percentile
from kvrec.server.embedded_redis import EmbeddedRedis
from kvrec.server.engine import Engine
from kvrec.server.metrics import STAGES
from kvrec.server.pipeline import RankingPipeline
from kvrec.server.schemas import Event, RecommendRequest
from kvrec.server.settings import Settings, resolve_redis_url
from kvrec.server.store import RedisStore

USERS_PER_CELL = 3


def main(args: argparse.Namespace) -> int:
    """`kvrec bench serve`; `args.lengths` and `args.policies` arrive parsed (serve_cli's `type=`s)."""
    from kvrec.compression.cli import check_policies

    checkpoint = load_checkpoint(args.model) if args.model else untrained_checkpoint()
    check_policies(args.policies, checkpoint)
    if not args.model:
        print(f"kvrec bench serve: no --model, timing an untrained model of the default size "
              f"({UNTRAINED_ITEMS} items; cost does not depend on training)", file=sys.stderr)
    torch.set_num_threads(args.threads)

    embedded = None
    redis_url = resolve_redis_url(args.redis_url)
    try:
        if redis_url is None:
            embedded = EmbeddedRedis().start()
            redis_url = embedded.url
        rows = asyncio.run(run(checkpoint, args.lengths, args.policies, redis_url, args.requests, args.seconds,
                               args.hot_tier_bytes))
    finally:
        if embedded is not None:
            embedded.stop()
    cfg = checkpoint.config
    hot = rows[0]["hot_tier_bytes"] if rows else 0
    print(f"model {cfg.kind}: {cfg.layers} layers x {cfg.heads} heads x (d_k {cfg.d_k} + d_v {cfg.d_v}), "
          f"{cfg.num_items} items; torch threads {torch.get_num_threads()}; Redis {redis_url}; hot tier "
          + (f"{hot} bytes" if hot else "off"))
    print(format_table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": cfg.to_dict(), "redis_url": redis_url, "rows": rows}, f, indent=2)
    return 0


async def run(checkpoint: Checkpoint, lengths: list[int], policies: list[str], redis_url: str,
              requests: int, seconds: float, hot_tier_bytes: int | None = None) -> list[dict]:
    prefix = f"kvrec-bench-{uuid.uuid4().hex[:8]}"
    hot = {} if hot_tier_bytes is None else {"hot_tier_bytes": hot_tier_bytes}
    settings = Settings(redis_url=redis_url, key_prefix=prefix, max_log_events=max(lengths) + requests + 10,
                        max_history_events=max(lengths), state_ttl_s=3600, **hot)
    store = RedisStore.connect(settings)
    rows = []
    try:
        for length in lengths:
            for spec in policies:
                engine = Engine(checkpoint, spec, settings.prefill_chunk)
                pipeline = RankingPipeline(store, engine, settings)
                rows.append({**await time_cell(pipeline, length, requests, seconds),
                             "hot_tier_bytes": settings.hot_tier_bytes if pipeline.tier is not None else 0})
                print(f"  {length:>6} {engine.spec:<34} {rows[-1]['ms']['total']:9.2f} ms", file=sys.stderr)
    finally:
        await store.close()
    for row in rows:
        base = next((r for r in rows if r["length"] == row["length"] and r["policy"] == "recompute"), None)
        row["speedup_vs_recompute"] = base["ms"]["total"] / row["ms"]["total"] if base else None
    return rows


async def time_cell(pipeline: RankingPipeline, length: int, requests: int, seconds: float) -> dict:
    rng = random.Random(length)
    items = pipeline.engine.item_ids
    users = [f"bench-{length}-{u}" for u in range(USERS_PER_CELL)]
    timings: list[dict[str, float]] = []
    last = None
    try:
        for user in users:
            history = [Event(item_id=rng.choice(items), ts=1_600_000_000 + 60 * t, action=rng.randrange(6))
                       for t in range(length)]
            await pipeline.put_history(user, history)
        deadline = time.monotonic() + seconds
        for i in range(requests + 1):  # the first request warms caches and is not counted
            event = Event(item_id=rng.choice(items), ts=1_600_000_000 + 60 * (length + i), action=1)
            last = await pipeline.recommend(RecommendRequest(user_id=users[i % len(users)], events=[event], k=10))
            if i:
                timings.append(last.timing_ms)
            if i >= 3 and time.monotonic() > deadline:
                break
    finally:  # the cell's users go, so that the benchmark leaves nothing in the Redis it was given
        for user in users:
            await pipeline.forget(user)
    ms = {stage: sum(t.get(stage, 0.0) for t in timings) / len(timings) for stage in (*STAGES, "total")}
    raw = pipeline.engine.dense_bytes(last.computed.events_seen)
    return {
        "length": length, "policy": pipeline.engine.spec, "requests": len(timings), "ms": ms,
        "p99_ms": percentile([t["total"] for t in timings], 99),
        "requests_per_s": 1e3 / ms["total"],
        "codec_share": (ms["decode"] + ms["encode"]) / ms["total"],
        "blob_bytes": last.state_bytes, "raw_bytes": raw, "tokens_kept": last.computed.tokens_kept,
    }


def format_table(rows: list[dict]) -> str:
    head = (f"{'length':>6} {'policy':<34} {'total':>8} {'p99':>8} " + " ".join(f"{s:>8}" for s in STAGES)
            + f" {'req/s':>7} {'vs recomp':>9} {'codec':>6} {'blob KiB':>9} {'raw KiB':>8} {'x smaller':>9}")
    lines = ["ms per request by stage (mean; p99 of the total); vs recomp = speed-up over `recompute` at the "
             "same length; codec = (decode + encode) / total", head, "-" * len(head)]
    for r in rows:
        ms = r["ms"]
        speedup = f"{r['speedup_vs_recompute']:.1f}x" if r["speedup_vs_recompute"] else "-"
        smaller = f"{r['raw_bytes'] / r['blob_bytes']:.1f}x" if r["blob_bytes"] else "-"
        lines.append(
            f"{r['length']:>6} {r['policy']:<34} {ms['total']:>8.2f} {r['p99_ms']:>8.2f} "
            + " ".join(f"{ms[s]:>8.2f}" for s in STAGES)
            + f" {r['requests_per_s']:>7.1f} {speedup:>9} {r['codec_share']:>6.1%} {r['blob_bytes'] / 1024:>9.1f}"
            f" {r['raw_bytes'] / 1024:>8.1f} {smaller:>9}")
    return "\n".join(lines)
