"""Offline replay: every user's stream through the service's own serving step (`compression.step`).

Per user: the prefix is prefilled, compressed and encoded as the pre-loaded state. Then each request of
`events_per_request` events goes decode -> extend -> compress -> encode (`recompute` instead folds the
whole history so far into an empty state, timed the same way). Scoring uses the last hidden state of the
extended state, as the server answers a request after folding its events in: it predicts the NEXT
request's first event (HR@10, NDCG@10 over the whole catalogue) and ranks the next request's items
against sampled negatives (GAUC, Recall@10). Every policy is compared with `full` on the same requests
(top-10 overlap, mean absolute score error), which is why `full` always runs first.

With a ranking head (a model trained with `--task ranking`), each request also ranks the next request's
first item among `rank_candidates` sampled ones (itself included, negatives never in the history) as the
server ranks a request's candidates: target tokens over the state the policy left (`ServingStep.rank`), so a
policy's loss shows in the ranking (`rank_ndcg@10`, `rank_hr@10`), beside retrieval on the same candidates
(`rank_retrieval_ndcg@10`); where the checkpoint records engagement actions, the engagement head's AUC and
per-user GAUC on the next item's label (`engage_auc`, `engage_gauc`). `ms_rank` is the ranking pass's
time, apart from `ms_per_request` so that the state path's cost stays comparable across models.

One replay serves both `kvrec bench offline` (one model) and `kvrec bench levels` (several models, each
under its policies): a `RequestPlan` makes each user's requests once, and `replay` runs them through every
`Lane` (a model with a serving step and a `Tally` per spec), users in the same order, so every tally's
i-th request is the same request and any two rows can be compared request by request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from kvrec.compression.base import PolicyContext, PolicyError
from kvrec.compression.spec import parse_policy
from kvrec.compression.step import ServingStep
from kvrec.models.evaluate import engagement_labels, sample_candidates
from kvrec.models.metrics import auc, gauc, percentile, rank_of_targets
from kvrec.models.state import Events
from kvrec.models.uncertainty import paired_difference
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
    candidates: Tensor | None = None  # [C] for the ranking head: `target` first, then items never seen
    engaged: bool | None = None  # whether `target`'s event counts as engagement (None: no labels)


@dataclass
class Tally:
    """Per-request measurements of one policy, summarized into one results row."""

    ranks: list[int] = field(default_factory=list)
    rank_user: list[int] = field(default_factory=list)  # the user of each entry of `ranks`
    auc: list[float] = field(default_factory=list)
    auc_weight: list[int] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    overlap: list[float] = field(default_factory=list)
    score_err: list[float] = field(default_factory=list)
    final_bytes: list[int] = field(default_factory=list)  # per user: the blob left in the store
    macs: list[int] = field(default_factory=list)
    ms: dict[str, list[float]] = field(default_factory=lambda: {"extend": [], "compress": [], "codec": []})
    head_ranks: list[int] = field(default_factory=list)  # the target among the candidates, ranking head
    head_user: list[int] = field(default_factory=list)  # the user of each entry of `head_ranks`
    cand_ranks: list[int] = field(default_factory=list)  # the same, by retrieval
    engage: list[float] = field(default_factory=list)  # engagement probability of the target
    engage_label: list[bool] = field(default_factory=list)
    engage_user: list[int] = field(default_factory=list)
    ms_rank: list[float] = field(default_factory=list)  # the ranking pass over the state (not in ms_per_request)


def user_requests(prefix: Events, future: Events, events_per_request: int, max_requests: int | None,
                  num_items: int, negatives: int, exclude_seen: bool, gen: torch.Generator,
                  rank_candidates: int = 0, engaged: frozenset[int] = frozenset(),
                  rank_gen: torch.Generator | None = None) -> list[Request]:
    """The scored requests of one user. With `rank_candidates`, each also carries candidates for the ranking
    head, drawn from `rank_gen` (its own generator, so the retrieval metrics' negatives stay as they were)."""
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
        history = torch.cat([prefix.items, future.items[:end]])
        seen = history if exclude_seen else torch.zeros(0, dtype=torch.long)
        req = Request(future[end - events_per_request:end], int(nxt.items[0]), positives, neg,
                      seen[seen != int(nxt.items[0])])
        if rank_candidates and req.target < num_items:
            req.candidates = sample_candidates(req.target, history, num_items, rank_candidates, rank_gen)
            if engaged:
                req.engaged = bool(engagement_labels(nxt.actions[:1], engaged)[0])
        out.append(req)
    return out


def replay_user(step: ServingStep, prefix: Events, requests: list[Request], tally: Tally,
                reference: list[Tensor] | None, user: int = 0) -> list[Tensor]:
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
        tally.rank_user.append(user)
        if req.candidates is not None and step.ranks:
            rank_request(step, out, req, tally, user)
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


@torch.no_grad()
def rank_request(step: ServingStep, out, req: Request, tally: Tally, user: int) -> None:
    """The request's candidates ranked by the head over the state the policy left (`out.state`), at the
    user's latest event time, and by retrieval from the same request's hidden vector."""
    clock = time.perf_counter()
    relevance, engage = step.rank(out.state, req.candidates, int(req.events.ts[-1]))
    tally.ms_rank.append((time.perf_counter() - clock) * 1e3)
    retrieval = step.scores(out.hidden, req.candidates)
    first = torch.zeros(1, dtype=torch.long)
    tally.head_ranks.append(int(rank_of_targets(relevance.cpu()[None], first)[0]))
    tally.head_user.append(user)
    tally.cand_ranks.append(int(rank_of_targets(retrieval.cpu()[None], first)[0]))
    if req.engaged is not None:
        tally.engage.append(float(engage[0]))
        tally.engage_label.append(req.engaged)
        tally.engage_user.append(user)


def ndcg_gains(ranks: list[int]) -> np.ndarray:
    """NDCG@10 of each 0-based rank of one relevant item."""
    r = np.asarray(ranks)
    return np.where(r < 10, 1.0 / np.log2(r + 2), 0.0)


def _at_10(ranks: list[int]) -> tuple[float | None, float | None]:
    """NDCG@10 and HR@10 of 0-based ranks; None when nothing was ranked."""
    if not ranks:
        return None, None
    return float(ndcg_gains(ranks).mean()), float((np.asarray(ranks) < 10).mean())


def versus_full(tally: Tally, full: Tally) -> dict:
    """NDCG@10's paired relative difference to `full` on the same requests, retrieval and (with a head)
    ranking, with 95% intervals from a bootstrap over users (kvrec.models.uncertainty)."""
    row = {}
    for key, mine, ref, users in (("ndcg@10", tally.ranks, full.ranks, tally.rank_user),
                                  ("rank_ndcg@10", tally.head_ranks, full.head_ranks, tally.head_user)):
        d = paired_difference(list(ndcg_gains(ref)), list(ndcg_gains(mine)), users) if mine else None
        row[f"{key}_vs_full"] = None if d is None else d.relative
        row[f"{key}_vs_full_ci95"] = None if d is None else list(d.ci95)
    return row


def summarize(spec: str, tally: Tally, full_bytes: float | None, users: int) -> dict:
    ranks = np.asarray(tally.ranks)
    gains = ndcg_gains(tally.ranks)
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
        **ranking_summary(tally),
    }


def ranking_summary(tally: Tally) -> dict:
    """The ranking head's keys of a results row: None where the model has no head or the data no labels."""
    head_ndcg, head_hr = _at_10(tally.head_ranks)
    cand_ndcg, cand_hr = _at_10(tally.cand_ranks)
    row = {"rank_ndcg@10": head_ndcg, "rank_hr@10": head_hr, "rank_retrieval_ndcg@10": cand_ndcg,
           "rank_retrieval_hr@10": cand_hr, "engage_auc": None, "engage_gauc": None,
           "ms_rank": float(np.mean(tally.ms_rank)) if tally.ms_rank else None}
    if tally.engage:
        row["engage_auc"] = auc(tally.engage, tally.engage_label)
        row["engage_gauc"] = gauc(tally.engage, tally.engage_label, tally.engage_user)[0]
    return row


@dataclass
class RequestPlan:
    """How a user's stream becomes scored requests; the same plan gives every replay the same requests (the
    same users, next items, sampled negatives and candidates: each user's generators are seeded from `seed`
    and the user's index), which is what makes rows comparable request by request."""

    events_per_request: int
    max_requests_per_user: int | None
    num_items: int
    negatives: int
    exclude_seen: bool
    seed: int = 0
    rank_candidates: int = 0  # 0: no candidates for a ranking head
    engaged: frozenset[int] = frozenset()

    def requests(self, user) -> list[Request]:
        """The scored requests of one models.data.StreamUser."""
        base = self.seed * 1_000_003 + user.user_index
        return user_requests(user.prefix, user.future, self.events_per_request, self.max_requests_per_user,
                             self.num_items, self.negatives, self.exclude_seen, torch.Generator().manual_seed(base),
                             self.rank_candidates, self.engaged, torch.Generator().manual_seed(base * 2 + 1))


@dataclass
class Lane:
    """One model replayed under its policies: a serving step and a tally per spec. `full` comes first, as
    the reference of the other specs' top-10 overlap and score error (the same model's uncompressed answer)."""

    checkpoint: object  # models.checkpoint.Checkpoint
    pipelines: dict  # spec as given -> compression.pipeline.Pipeline
    steps: dict[str, ServingStep]
    tallies: dict[str, Tally]

    @property
    def ranks(self) -> bool:
        return self.checkpoint.model.rank_head is not None


def make_lane(checkpoint, specs: list[str], calibration: list[Events] | None = None,
              skip: Callable[[str, PolicyError], None] | None = None) -> Lane:
    """Bind `full` and each spec to the checkpoint's model. A spec that does not apply to it raises
    PolicyError, or, with `skip`, is left out of the lane and handed to `skip` with the error."""
    model = checkpoint.model.eval()
    context = PolicyContext(model, checkpoint.path, calibration)
    pipelines = {}
    for spec in dict.fromkeys([REFERENCE, *specs]):
        try:
            pipelines[spec] = parse_policy(spec, context)
        except PolicyError as exc:
            if skip is None or spec == REFERENCE:
                raise
            skip(spec, exc)
    steps = {spec: ServingStep(model, pipeline, checkpoint.fingerprint) for spec, pipeline in pipelines.items()}
    return Lane(checkpoint, pipelines, steps, {spec: Tally() for spec in pipelines})


def replay(streams: list, plan: RequestPlan, lanes: list[Lane], progress: bool = True,
           desc: str = "bench offline") -> None:
    """Replay every user of `streams` through every lane's steps, filling their tallies. Each user's
    requests are made once and replayed by every (lane, spec), users in the same order, so position i of
    every tally's `ranks` is the same request."""
    from tqdm import tqdm

    bar = tqdm(total=len(streams) * sum(len(lane.steps) for lane in lanes), desc=desc, unit="replay",
               disable=not progress, mininterval=2.0)
    for user in streams:
        requests = plan.requests(user)
        for lane in lanes:
            reference = None
            for spec, step in lane.steps.items():
                bar.set_postfix_str(spec[:40], refresh=False)
                scores = replay_user(step, user.prefix, requests, lane.tallies[spec], reference, user.user_index)
                if spec == REFERENCE:
                    reference = scores
                bar.update()
    bar.close()


def replay_streams(dataset, events_per_request: int, max_users: int | None, min_prefix: int = 1) -> list:
    """The users a replay scores: `dataset` (a models.data.Dataset, or a list of StreamUser) cut into prefix
    and future, keeping those with more than one request's events after the prefix."""
    from kvrec.models.data import stream_split

    streams = dataset if isinstance(dataset, list) else stream_split(dataset, min_prefix=min_prefix, min_future=2)
    return [s for s in streams if len(s.future) > events_per_request][:max_users]


def unseen_users(dataset, checkpoints: list) -> tuple[frozenset[int] | None, str]:
    """The users a replay of `checkpoints` should score, and a line that says which: the users every model
    was kept from in training (`kvrec train --holdout-users`; by the rule of models.data.holdout_users,
    those of the smallest fraction), or None (every user) when some model trained on all of them, said
    plainly, since the replay then predicts events that model was fitted to."""
    from kvrec.models.data import holdout_users

    fraction = min(c.holdout for c in checkpoints)
    if fraction == 0.0:
        return None, ("replaying users the model trained on (in-sample accuracy; train with --holdout-users "
                      "to replay users it never saw)")
    users = holdout_users(dataset, fraction)
    return users, f"replaying the {len(users)} users held out of training ({fraction:g} of {len(dataset.seqs)})"


def seen_is_excluded(streams: list) -> bool:
    """Whether the catalogue ranking excludes items already seen: when the data never repeats an item."""
    from kvrec.models.evaluate import has_repeats

    return not has_repeats([Events.cat([s.prefix, s.future]) for s in streams])


def run_offline(checkpoint, dataset, specs: list[str], *, events_per_request: int = 10,
                max_users: int | None = None, max_requests_per_user: int | None = None, negatives: int = 100,
                seed: int = 0, min_prefix: int = 1, exclude_seen: bool | None = None, progress: bool = True,
                calibration_users: int = 64, rank_candidates: int = 100) -> list[dict]:
    """Replay `dataset` (a models.data.Dataset, or a list of StreamUser) under each spec; one row per spec.

    `checkpoint` is a models.checkpoint.Checkpoint; policies that calibrate get the first users' prefixes
    (the state the model was trained to build). With a ranking head, each
    request ranks the next item among `rank_candidates` sampled ones (0: no ranking); engagement labels come
    from the actions the checkpoint's training recorded as engagement.
    """
    streams = replay_streams(dataset, events_per_request, max_users, min_prefix)
    if exclude_seen is None:
        exclude_seen = seen_is_excluded(streams)
    lane = make_lane(checkpoint, specs, [s.prefix for s in streams[:calibration_users]])
    plan = RequestPlan(events_per_request, max_requests_per_user, checkpoint.model.cfg.num_items, negatives,
                       exclude_seen, seed, rank_candidates if lane.ranks else 0,
                       frozenset(checkpoint.info.get("engagement_actions", ())))
    replay(streams, plan, [lane], progress)
    tallies = lane.tallies
    full_bytes = float(np.mean(tallies[REFERENCE].final_bytes))
    return [{**summarize(lane.pipelines[spec].spec, tallies[spec], full_bytes, len(streams)),
             **versus_full(tallies[spec], tallies[REFERENCE]), "note": storage_note(lane.pipelines[spec])}
            for spec in lane.pipelines if spec in specs]


def storage_note(pipeline) -> str:
    """What a row must say beside its numbers: how much a merging storage (MiniCache) merged over the
    replay, so that one that merged nothing is flagged rather than shown as a compression (its bytes are
    then its dtype cast alone)."""
    storage = pipeline.storage
    if not hasattr(storage, "merged_tokens"):
        return ""
    if storage.merged_tokens == 0:
        return f"merged nothing of {storage.paired_tokens} paired tokens: the row is its dtype cast alone"
    return f"merged {storage.merged_tokens} of {storage.paired_tokens} paired tokens"
