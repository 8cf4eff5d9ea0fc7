"""Offline replay: every user's stream through the model, with a policy applied exactly as the server will.

Per user: the prefix is prefilled, compressed, encoded and decoded as the pre-loaded state. Then each
request of `events_per_request` events goes extend -> compress -> encode -> decode (`recompute` instead
prefills the whole history so far, timed the same way). Scoring uses the last hidden state of the
extended state, as the server answers a request after folding its events in: it predicts the NEXT
request's first event (HR@10, NDCG@10 over the whole catalogue) and ranks the next request's items
against sampled negatives (GAUC, Recall@10). Every policy is compared with `full` on the same requests
(top-10 overlap, mean absolute score error), which is why `full` always runs first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from kvrec.compression.base import PolicyContext
from kvrec.compression.codec import decode_state, encode_state
from kvrec.compression.pipeline import Pipeline
from kvrec.compression.spec import parse_policy
from kvrec.models.metrics import rank_of_targets
from kvrec.models.state import Events, State
from torch import Tensor

REFERENCE = "full"


@dataclass
class Request:
    """One scored request of one user: the events it brings and what it must predict."""

    events: Events
    target: int  # the next request's first item
    positives: Tensor  # [P] the next request's distinct items
    negatives: Tensor  # [C] sampled items that are not positives
    exclude: Tensor  # items seen so far (excluded from the catalogue ranking when the data never repeats)


@dataclass
class Tally:
    """Per-request measurements of one policy, summarized into one results row."""

    ranks: list[int] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    auc_weight: list[int] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    overlap: list[float] = field(default_factory=list)
    score_err: list[float] = field(default_factory=list)
    final_bytes: list[int] = field(default_factory=list)  # per user: the blob left in the store
    macs: list[int] = field(default_factory=list)
    ms: dict[str, list[float]] = field(default_factory=lambda: {"extend": [], "compress": [], "codec": []})


def user_requests(prefix: Events, future: Events, events_per_request: int, max_requests: int | None,
                  num_items: int, negatives: int, exclude_seen: bool, gen: torch.Generator) -> list[Request]:
    n = (len(future) - 1) // events_per_request  # every scored request needs a next event
    if max_requests is not None:
        n = min(n, max_requests)
    out = []
    for r in range(n):
        end = (r + 1) * events_per_request
        nxt = future[end:end + events_per_request]
        positives = torch.unique(nxt.items[nxt.items < num_items])
        mask = torch.ones(num_items, dtype=torch.bool)
        mask[positives] = False
        pool = mask.nonzero()[:, 0]
        neg = pool[torch.randint(len(pool), (negatives,), generator=gen)]
        seen = torch.cat([prefix.items, future.items[:end]]) if exclude_seen else torch.zeros(0, dtype=torch.long)
        out.append(Request(future[end - events_per_request:end], int(nxt.items[0]), positives, neg,
                           seen[seen != int(nxt.items[0])]))
    return out


def attention_macs(keys_per_layer: list[int], queries: int, heads: int, d_k: int, d_v: int) -> int:
    """Multiply-accumulates of attention for `queries` new tokens against the given keys per layer:
    q.k for every (query, key) pair and the weighted sum of values, counted from shapes (masked pairs
    included, as a dense kernel computes them)."""
    return sum(heads * queries * t * (d_k + d_v) for t in keys_per_layer)


def prefill_macs(length: int, layers: int, heads: int, d_k: int, d_v: int, chunk: int = 1024) -> int:
    """Attention MACs of `model.prefill` over `length` events in chunks: chunk c attends to all keys so far."""
    return sum(attention_macs([min(start + chunk, length)] * layers, min(chunk, length - start), heads, d_k, d_v)
               for start in range(0, length, chunk))


def replay_user(model, fingerprint: str, pipeline: Pipeline, prefix: Events, requests: list[Request],
                tally: Tally, reference: list[Tensor] | None) -> list[Tensor]:
    """Replay one user's requests under `pipeline`; returns the catalogue scores [N] of each request."""
    cfg = model.cfg
    scores_out = []
    history = prefix
    state: State | None = None
    blob = b""
    if pipeline.keeps_state:
        state, _, stats = model.prefill(prefix)
        blob = encode_state(pipeline.compress(state, stats), pipeline, fingerprint)
        state = decode_state(blob, pipeline, fingerprint)
    for i, req in enumerate(requests):
        t0 = time.perf_counter()
        if pipeline.keeps_state:
            state, hidden, stats = model.extend(state, req.events)
            keys = [state.tokens(layer) for layer in range(state.num_layers)]
            t1 = time.perf_counter()
            compressed = pipeline.compress(state, stats)
            t2 = time.perf_counter()
            blob = encode_state(compressed, pipeline, fingerprint)
            state = decode_state(blob, pipeline, fingerprint)
            t3 = time.perf_counter()
            tally.macs.append(attention_macs(keys, len(req.events), cfg.heads, cfg.d_k, cfg.d_v))
        else:
            history = Events.cat([history, req.events])
            _, hidden, _ = model.prefill(history)
            t1 = t2 = t3 = time.perf_counter()
            tally.macs.append(prefill_macs(len(history), cfg.layers, cfg.heads, cfg.d_k, cfg.d_v))
        for stage, ms in zip(("extend", "compress", "codec"), (t1 - t0, t2 - t1, t3 - t2)):
            tally.ms[stage].append(1000 * ms)
        score_request(model, hidden, req, tally, reference[i] if reference is not None else None, scores_out)
    tally.final_bytes.append(len(blob))
    return scores_out


@torch.no_grad()
def score_request(model, hidden: Tensor, req: Request, tally: Tally, reference: Tensor | None,
                  scores_out: list[Tensor]) -> None:
    scores = model.score(hidden[None])[0]  # [N]
    scores_out.append(scores)
    tally.ranks.append(int(rank_of_targets(scores[None], torch.tensor([req.target]), [req.exclude])[0]))
    pos, neg = scores[req.positives], scores[req.negatives]  # [P], [C]
    if len(pos):
        tally.auc.append(float(((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()))
        tally.auc_weight.append(len(pos))
        cand = torch.cat([pos, neg])
        top = set(torch.topk(cand, min(10, len(cand))).indices.tolist())
        tally.recall.append(len(top & set(range(len(pos)))) / len(pos))
    if reference is not None:
        ref_top = set(torch.topk(reference, 10).indices.tolist())
        tally.overlap.append(len(ref_top & set(torch.topk(scores, 10).indices.tolist())) / 10)
        tally.score_err.append(float((scores - reference).abs().mean()))


def summarize(spec: str, tally: Tally, full_bytes: float | None, users: int) -> dict:
    ranks = np.asarray(tally.ranks)
    gains = np.where(ranks < 10, 1.0 / np.log2(ranks + 2), 0.0)
    b = np.asarray(tally.final_bytes, dtype=float)
    stored = bool(b.any())
    ms = {stage: float(np.mean(v)) if v else 0.0 for stage, v in tally.ms.items()}
    return {
        "policy": spec,
        "ndcg@10": float(gains.mean()) if len(ranks) else 0.0,
        "hr@10": float((ranks < 10).mean()) if len(ranks) else 0.0,
        "gauc": float(np.average(tally.auc, weights=tally.auc_weight)) if tally.auc else 0.0,
        "recall@10": float(np.mean(tally.recall)) if tally.recall else 0.0,
        "top10_overlap": float(np.mean(tally.overlap)) if tally.overlap else 1.0,
        "score_mae": float(np.mean(tally.score_err)) if tally.score_err else 0.0,
        "bytes_per_user_mean": float(b.mean()) if stored else 0.0,
        "bytes_per_user_p50": float(np.percentile(b, 50)) if stored else 0.0,
        "bytes_per_user_p99": float(np.percentile(b, 99)) if stored else 0.0,
        "bytes_per_user_max": float(b.max()) if stored else 0.0,
        "compression_ratio": (full_bytes / b.mean()) if stored and full_bytes else None,
        "macs_per_request": float(np.mean(tally.macs)) if tally.macs else 0.0,
        "ms_per_request": sum(ms.values()),
        "ms_extend": ms["extend"], "ms_compress": ms["compress"], "ms_codec": ms["codec"],
        "users": users, "requests": len(ranks),
    }


def run_offline(checkpoint, dataset, specs: list[str], *, events_per_request: int = 10,
                max_users: int | None = None, max_requests_per_user: int | None = None, negatives: int = 100,
                seed: int = 0, min_prefix: int = 1, exclude_seen: bool | None = None, progress: bool = True,
                calibration_users: int = 64) -> list[dict]:
    """Replay `dataset` (a models.data.Dataset, or a list of StreamUser) under each spec; one row per spec.

    `checkpoint` is a models.checkpoint.Checkpoint; `svd` bases are fitted on the users' prefixes (the
    state the model was trained to build) and saved beside it when missing.
    """
    from kvrec.models.data import stream_split
    from kvrec.models.evaluate import has_repeats
    from tqdm import tqdm

    streams = dataset if isinstance(dataset, list) else stream_split(dataset, min_prefix=min_prefix, min_future=2)
    streams = [s for s in streams if len(s.future) > events_per_request][:max_users]
    model = checkpoint.model.eval()
    num_items = model.cfg.num_items
    if exclude_seen is None:
        exclude_seen = not has_repeats([Events.cat([s.prefix, s.future]) for s in streams])
    context = PolicyContext(model, checkpoint.path, [s.prefix for s in streams[:calibration_users]])
    pipelines = {spec: parse_policy(spec, context) for spec in dict.fromkeys([REFERENCE, *specs])}
    tallies = {spec: Tally() for spec in pipelines}
    bar = tqdm(total=len(streams) * len(pipelines), desc="bench offline", unit="replay", disable=not progress,
               mininterval=2.0)
    for user in streams:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + user.user_index)
        requests = user_requests(user.prefix, user.future, events_per_request, max_requests_per_user,
                                 num_items, negatives, exclude_seen, gen)
        reference = None
        for spec, pipeline in pipelines.items():
            bar.set_postfix_str(spec[:40], refresh=False)
            scores = replay_user(model, checkpoint.fingerprint, pipeline, user.prefix, requests, tallies[spec],
                                 reference)
            if spec == REFERENCE:
                reference = scores
            bar.update()
    bar.close()
    full_bytes = float(np.mean(tallies[REFERENCE].final_bytes))
    return [summarize(pipelines[spec].spec, tallies[spec], full_bytes, len(streams))
            for spec in pipelines if spec in specs]


def relative_loss(row: dict, full: dict, metric: str = "ndcg@10") -> float:
    """1 - metric / full's metric (0 = no loss); NaN when full scores 0."""
    return 1.0 - row[metric] / full[metric] if full[metric] else math.nan
