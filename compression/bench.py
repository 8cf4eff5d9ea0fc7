"""Offline replay: every user's stream through the service's own serving step (`compression.step`).

Per user: the prefix is prefilled, compressed and encoded as the pre-loaded state. Then each request of
`events_per_request` events goes decode -> extend -> compress -> encode (`recompute` instead folds the
whole history so far into an empty state, timed the same way). Scoring uses the last hidden state of the
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
from kvrec.compression.spec import parse_policy
from kvrec.compression.step import ServingStep
from kvrec.models.metrics import percentile, rank_of_targets
from kvrec.models.state import Events
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


def replay_user(step: ServingStep, prefix: Events, requests: list[Request], tally: Tally,
                reference: list[Tensor] | None) -> list[Tensor]:
    """Replay one user's requests through the serving step; returns the catalogue scores [N] of each.

    As in the service, every request starts from what a decode of the stored blob gives back; under
    `recompute` each request folds the whole history so far into an empty state."""
    scores_out = []
    history = prefix
    blob = b""
    if step.keeps_state:
        blob = step.advance(step.start(0), prefix).blob
    for i, req in enumerate(requests):
        if step.keeps_state:
            clock = time.perf_counter()
            state = step.restore(blob)
            decode_ms = (time.perf_counter() - clock) * 1e3
            out = step.advance(state, req.events)
            blob = out.blob
        else:
            history = Events.cat([history, req.events])
            out = step.advance(step.start(0), history)
            decode_ms = 0.0
        tally.macs.append(out.macs)
        for stage in ("extend", "compress"):
            tally.ms[stage].append(out.timing_ms[stage])
        tally.ms["codec"].append(decode_ms + out.timing_ms.get("encode", 0.0))
        score_request(step, out.hidden, req, tally, reference[i] if reference is not None else None, scores_out)
    tally.final_bytes.append(len(blob))
    return scores_out


@torch.no_grad()
def score_request(step: ServingStep, hidden: Tensor, req: Request, tally: Tally, reference: Tensor | None,
                  scores_out: list[Tensor]) -> None:
    scores = step.scores(hidden)  # [N]
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
        "bytes_per_user_p50": percentile(b, 50) if stored else 0.0,
        "bytes_per_user_p99": percentile(b, 99) if stored else 0.0,
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
    steps = {spec: ServingStep(model, pipeline, checkpoint.fingerprint) for spec, pipeline in pipelines.items()}
    tallies = {spec: Tally() for spec in pipelines}
    bar = tqdm(total=len(streams) * len(pipelines), desc="bench offline", unit="replay", disable=not progress,
               mininterval=2.0)
    for user in streams:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + user.user_index)
        requests = user_requests(user.prefix, user.future, events_per_request, max_requests_per_user,
                                 num_items, negatives, exclude_seen, gen)
        reference = None
        for spec in pipelines:
            bar.set_postfix_str(spec[:40], refresh=False)
            scores = replay_user(steps[spec], user.prefix, requests, tallies[spec], reference)
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
