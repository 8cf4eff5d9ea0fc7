"""Training: sampled softmax over in-batch and random negatives, AdamW, early stopping on validation NDCG@10.

Every user's training sequence is cut, from its end, into windows of `max_len + 1` events; each window
teaches next-item prediction at every position. The loss contrasts each true next item with a shared
set of negatives per batch (items sampled uniformly from the catalogue plus the batch's own targets,
which are popularity-distributed), scored by cosine similarity over a temperature, with the logQ
correction of sampled softmax for how often each item is drawn.

`task="ranking"` adds a target-aware ranking head and trains it jointly, in the same forward pass
(models.recommender.Targets): per window, `rank_cuts` cut points, at each the true next item and
`rank_negatives` sampled items as target tokens that see the window up to the cut, at the time of the
last event they see (what serving gives a candidate: the user's latest event time). A listwise softmax
over each cut's candidates trains relevance; where the data says which actions count as engagement
(`Dataset.engagement_actions`), a binary cross-entropy on the true item's action trains engagement.
Early stopping then follows the validation ranking NDCG@10 among `eval_candidates` sampled candidates,
plus the engagement AUC where there are labels.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from kvrec.models.data import DataError, Dataset, holdout_users, leave_one_out
from kvrec.models.evaluate import (
    engagement_labels,
    evaluate,
    evaluate_ranking,
    has_repeats,
    pad_left,
    popularity_scores,
)
from kvrec.models.recommender import ModelConfig, SequentialRecommender, Targets, time_bucket
from kvrec.models.registry import build_model
from kvrec.models.state import Events
from tqdm import tqdm


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    random_negatives: int = 256
    in_batch_negatives: int = 256
    temperature: float = 0.05
    patience: int = 10  # evaluations without a better validation NDCG@10 before stopping (see kvrec train --help)
    max_valid_users: int = 2000  # validation on a fixed sample, for speed
    max_minutes: float | None = None  # wall-clock cap, checked after each epoch
    pair_budget: int = 32_000_000  # B x L x L attention entries per batch: bounds memory for long windows
    seed: int = 0
    holdout: float = 0.0  # share of users kept out of training, for replays of unseen users (data.holdout_users)
    task: str = "retrieval"  # or "ranking": retrieval plus a target-aware ranking head, trained jointly
    rank_cuts: int = 8  # cut points per window, each a ranking list
    rank_negatives: int = 15  # sampled negatives per cut, beside the true next item
    rank_sampling: str = "uniform"  # negatives drawn "uniform"ly from the catalogue or by "popularity"
    rank_weight: float = 1.0  # of the listwise ranking loss, beside the retrieval loss (weight 1)
    engage_weight: float = 1.0  # of the engagement loss (only where the data has engagement labels)
    eval_candidates: int = 100  # sampled candidates per validation user (ranking task)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.rank_sampling not in ("uniform", "popularity"):
            raise ValueError(f"unknown rank_sampling {self.rank_sampling!r}; choose uniform or popularity")


TASKS = ("retrieval", "ranking")


def windows(train: list[Events], max_len: int) -> list[Events]:
    """Non-overlapping windows of up to max_len + 1 events, cut from the end of each sequence."""
    out = []
    for seq in train:
        for end in range(len(seq), 1, -max_len):
            out.append(seq[max(0, end - max_len - 1):end])
    return out


def length_batches(wins: list[Events], batch_size: int, rng: random.Random,
                   pair_budget: int | None = None, extra: int = 0) -> list[list[Events]]:
    """Batches of similar length in random order: attention cost is quadratic in the padded width, and
    most users are far shorter than the window. A batch also stops growing before B x L x L passes
    `pair_budget`, so that windows as long as whole histories (thousands of events) fit in memory;
    `extra` tokens join every window's pass (the ranking task's target tokens) and count in L."""
    order = sorted(range(len(wins)), key=lambda i: (len(wins[i]), rng.random()))
    batches: list[list[Events]] = []
    for i in order:
        width = len(wins[i]) + extra  # the widest so far: lengths ascend
        if (not batches or len(batches[-1]) >= batch_size
                or pair_budget is not None and (len(batches[-1]) + 1) * width * width > pair_budget):
            batches.append([])
        batches[-1].append(wins[i])
    rng.shuffle(batches)
    return batches


def sampling_log_q(train: list[Events], num_items: int, cfg: TrainConfig) -> torch.Tensor:
    """log of each item's expected count among a batch's negatives [N]: uniform draws plus in-batch
    targets (drawn by popularity). Subtracting it from the logits is the sampled-softmax correction
    that keeps in-batch negatives from teaching the model to rank popular items down."""
    counts = torch.zeros(num_items, dtype=torch.double)
    for seq in train:
        counts += torch.bincount(seq.items[1:].clamp(max=num_items - 1), minlength=num_items).double()
    expected = cfg.random_negatives / num_items + cfg.in_batch_negatives * counts / counts.sum().clamp(min=1)
    return expected.clamp(min=1e-12).log().float()


class RankingSampler:
    """What the ranking loss draws from: each item's probability of being a negative, and the engagement
    action ids (empty: the data has no engagement label, and the engagement loss is skipped)."""

    def __init__(self, train: list[Events], num_items: int, cfg: TrainConfig, engaged: frozenset[int]):
        if cfg.rank_sampling == "popularity":
            counts = torch.zeros(num_items, dtype=torch.double)
            for seq in train:
                counts += torch.bincount(seq.items.clamp(max=num_items - 1), minlength=num_items).double()
            self.weights = (counts + 1e-3).float()  # an unseen item keeps a sliver of chance
        else:
            self.weights = None
        self.num_items, self.engaged = num_items, frozenset(engaged)

    def negatives(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        count = math.prod(shape)
        if self.weights is None:
            return torch.randint(0, self.num_items, shape, generator=gen)
        return torch.multinomial(self.weights, count, replacement=True, generator=gen).view(shape)


def ranking_targets(items: torch.Tensor, ts: torch.Tensor, valid: torch.Tensor, cfg: TrainConfig,
                    sampler: RankingSampler, gen: torch.Generator) -> tuple[Targets, torch.Tensor, torch.Tensor]:
    """Target tokens for a left-padded batch of windows, items/ts/valid [B, L+1] (inputs are [:, :-1]).

    Per row, up to `rank_cuts` distinct cut points c (1..n-1 for a window of n events): the target sees
    the first c events and is the true event c plus `rank_negatives` sampled items, all at position c
    and at the time of event c-1. Returns the Targets [B, P * (1 + M)], the true event's padded column
    [B, P] (its item, action) and which cuts exist [B, P] (a short window has fewer than P)."""
    b, width = items.shape
    n_in = valid.sum(1) - 1  # [B] input events per row
    p = min(cfg.rank_cuts, width - 1)
    draw = torch.rand(b, width - 1, generator=gen).to(items.device)
    draw = draw.masked_fill(torch.arange(width - 1, device=items.device)[None] >= n_in[:, None], -1.0)
    score, pick = draw.topk(p, dim=1)  # [B, P] distinct cut indices; -1: no such cut
    keep = score >= 0
    cut = (pick + 1).where(keep, torch.ones_like(pick))  # events seen
    col = (width - 1 - n_in)[:, None] + cut  # column of the true next event (first valid column + cut)
    col = col.clamp(max=width - 1)
    true = items.gather(1, col)  # [B, P]
    at = ts.gather(1, col - 1)  # time of the last event seen
    m = 1 + cfg.rank_negatives
    cands = torch.cat([true[..., None], sampler.negatives((b, p, cfg.rank_negatives), gen).to(items.device)], -1)
    targets = Targets(cands.view(b, p * m), cut.repeat_interleave(m, dim=1), at.repeat_interleave(m, dim=1))
    return targets, col, keep


def batch_loss(model: SequentialRecommender, batch: list[Events], cfg: TrainConfig,
               gen: torch.Generator, log_q: torch.Tensor,
               sampler: RankingSampler | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss and its parts: retrieval's sampled softmax, and with a `sampler` (ranking task) the
    listwise ranking loss and the engagement loss of target tokens from the same forward pass."""
    device = model.item_emb.weight.device
    width = max(len(w) for w in batch)
    items, ts, actions, valid = pad_left(batch, width, device)  # [B, L+1]
    targets = None
    if sampler is not None:
        targets, col, keep = ranking_targets(items, ts, valid, cfg, sampler, gen)
        hidden, target_hidden = model(items[:, :-1], ts[:, :-1], actions[:, :-1], valid[:, :-1], targets)
    else:
        hidden = model(items[:, :-1], ts[:, :-1], actions[:, :-1], valid[:, :-1])  # [B, L, D]
    has_target = valid[:, :-1] & valid[:, 1:]  # [B, L]
    h = F.normalize(hidden[has_target], dim=-1)  # [P, D]
    next_items = items[:, 1:][has_target]  # [P]
    n = model.cfg.num_items
    random_neg = torch.randint(0, n, (cfg.random_negatives,), generator=gen).to(device)
    pick = torch.randint(0, len(next_items), (min(cfg.in_batch_negatives, len(next_items)),), generator=gen).to(device)
    negatives = torch.cat([random_neg, next_items[pick]])  # [M]
    item_vec = F.normalize(model.item_emb.weight, dim=-1)
    pos_logit = (h * item_vec[next_items]).sum(-1, keepdim=True)  # [P, 1]
    neg_logit = h @ item_vec[negatives].T  # [P, M]
    neg_logit = neg_logit.masked_fill(negatives[None] == next_items[:, None], -math.inf)  # accidental hits
    log_q = log_q.to(device)
    logits = torch.cat([pos_logit / cfg.temperature - log_q[next_items, None],
                        neg_logit / cfg.temperature - log_q[negatives][None]], dim=1)  # [P, 1 + M]
    loss = F.cross_entropy(logits, torch.zeros(len(next_items), dtype=torch.long, device=device))
    parts = {"retrieval": loss.item()}
    if targets is None:
        return loss, parts
    b, m = keep.shape[0], 1 + cfg.rank_negatives
    relevance, engage = model.head(target_hidden)  # [B, P * (1 + M)] each
    relevance, engage = relevance.view(b, -1, m)[keep], engage.view(b, -1, m)[keep][:, 0]  # [K, 1 + M], [K]
    cands = targets.items.view(b, -1, m)[keep]  # [K, 1 + M]
    hits = torch.cat([torch.zeros_like(cands[:, :1], dtype=torch.bool), cands[:, 1:] == cands[:, :1]], dim=1)
    rank_loss = F.cross_entropy(relevance.masked_fill(hits, -math.inf),
                                torch.zeros(len(cands), dtype=torch.long, device=device))
    loss = loss + cfg.rank_weight * rank_loss
    parts["ranking"] = rank_loss.item()
    if sampler.engaged:
        label = engagement_labels(actions.gather(1, col)[keep], sampler.engaged).float()
        engage_loss = F.binary_cross_entropy_with_logits(engage, label)
        loss = loss + cfg.engage_weight * engage_loss
        parts["engagement"] = engage_loss.item()
    return loss, parts


def train(dataset: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, device: str = "cpu",
          progress: bool = True) -> tuple[SequentialRecommender, dict]:
    """Train on the leave-one-out split of `dataset`; returns the best model (eval mode) and a summary.

    The ranking task builds the model with a ranking head, trains it jointly with retrieval and selects
    the epoch by validation ranking NDCG@10 (plus engagement AUC where there are labels); the summary
    then also holds the best model's validation ranking metrics (`valid_ranking`: NDCG/HR@10 among
    sampled candidates by the head and by retrieval, engagement AUC and GAUC where there are labels)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    held = holdout_users(dataset, cfg.holdout)
    split = leave_one_out(dataset, skip=held)
    wins = windows(split.train, model_cfg.max_len)
    ranking = cfg.task == "ranking"
    # time buckets up to the widest gap a training window holds: longer gaps at serving share the last one
    widest_gap = max((int(w.ts[-1] - w.ts[0]) for w in wins), default=0)
    model_cfg = replace(model_cfg, num_items=dataset.num_items, ranking_head=ranking,
                        time_buckets=int(time_bucket(torch.tensor(widest_gap), 64)) + 1)  # 64: all of int64
    if not split.valid:
        raise DataError(f"{dataset.name}: no user has the 3 events needed for a validation target; "
                        "train on a dataset with longer histories")
    model = build_model(model_cfg).to(device)
    valid = random.Random(cfg.seed).sample(split.valid, min(cfg.max_valid_users, len(split.valid)))
    exclude_seen = not has_repeats(split.train)
    log_q = sampling_log_q(split.train, dataset.num_items, cfg)
    engaged = frozenset(dataset.engagement_actions) if ranking else frozenset()
    sampler = RankingSampler(split.train, dataset.num_items, cfg, engaged) if ranking else None
    extra = min(cfg.rank_cuts, model_cfg.max_len) * (1 + cfg.rank_negatives) if ranking else 0
    # the epoch kept: retrieval's NDCG@10, or the ranking heads' validation metrics summed (ranking NDCG@10,
    # plus the engagement AUC where there are labels: an epoch must not be kept for one head alone)
    selected_on = ("valid_rank_ndcg@10+valid_engage_auc" if engaged else "valid_rank_ndcg@10") if ranking \
        else "valid_ndcg@10"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, stale, history = -1.0, None, 0, 0, []
    started = time.time()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {model_cfg.kind} ({cfg.task})", unit="epoch",
               disable=not progress)
    for epoch in bar:
        model.train()
        totals: dict[str, float] = {}
        for batch in length_batches(wins, cfg.batch_size, random.Random(cfg.seed + epoch), cfg.pair_budget, extra):
            loss, parts = batch_loss(model, batch, cfg, gen, log_q, sampler)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for name, value in {"loss": loss.item(), **parts}.items():
                totals[name] = totals.get(name, 0.0) + value * len(batch)
        model.eval()
        metrics = evaluate(model, split.train, valid, exclude_seen=exclude_seen, history=model_cfg.max_len)
        row = {"epoch": epoch, **{name: total / len(wins) for name, total in totals.items()},
               "valid_ndcg@10": metrics["ndcg@10"]}
        if ranking:
            ranked = evaluate_ranking(model, dataset.seqs, valid, candidates=cfg.eval_candidates, engaged=engaged,
                                      gauc_events=0, history=model_cfg.max_len, seed=cfg.seed)
            row.update({f"valid_{k}": ranked[k] for k in ("rank_ndcg@10", "rank_retrieval_ndcg@10", "engage_auc")
                        if k in ranked})
        history.append(row)
        score = sum(row[name] or 0.0 for name in selected_on.split("+"))
        bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{score:.4f}", best=f"{max(best, score):.4f}")
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        minutes = (time.time() - started) / 60
        if stale >= cfg.patience or (cfg.max_minutes is not None and minutes >= cfg.max_minutes):
            break
    model.load_state_dict(best_state)
    model.eval()
    best_row = history[best_epoch - 1]
    summary = {"task": cfg.task, "train": asdict(cfg), "best_epoch": best_epoch, "selected_on": selected_on,
               "valid_ndcg@10": best_row["valid_ndcg@10"], "epochs_run": len(history),
               "minutes": round((time.time() - started) / 60, 2), "windows": len(wins), "device": str(device),
               "exclude_seen": exclude_seen, "engagement_actions": sorted(engaged), "heldout_users": len(held),
               "history": history}
    if ranking:
        summary["valid_ranking"] = evaluate_ranking(model, dataset.seqs, valid, candidates=cfg.eval_candidates,
                                                    engaged=engaged, history=model_cfg.max_len, seed=cfg.seed,
                                                    popularity=popularity_scores(split.train, dataset.num_items))
    return model, summary
