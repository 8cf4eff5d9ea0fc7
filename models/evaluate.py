"""Full-ranking evaluation on the leave-one-out split: the true next item against the whole catalogue.

Histories are batched by length (left-padded, so each user's last event sits in the last column) with
a cap on B x L x L so that long histories do not exhaust memory.
"""

from __future__ import annotations

import torch
from kvrec.models.data import EvalCase
from kvrec.models.metrics import ndcg_gains, rank_of_targets, summarize
from kvrec.models.recommender import SequentialRecommender
from torch import Tensor

PAIR_BUDGET = 8_000_000  # B x L x L attention entries per batch


def pad_left(seqs: list, width: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Events list -> items, ts, actions [B, width] int64 and valid [B, width] bool, left-padded."""
    b = len(seqs)
    items = torch.zeros(b, width, dtype=torch.long)
    ts, actions = torch.zeros_like(items), torch.zeros_like(items)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for row, ev in enumerate(seqs):
        n = min(len(ev), width)
        if n:
            items[row, -n:], ts[row, -n:], actions[row, -n:] = ev.items[-n:], ev.ts[-n:], ev.actions[-n:]
            valid[row, -n:] = True
    return items.to(device), ts.to(device), actions.to(device), valid.to(device)


@torch.no_grad()
def last_hidden(model: SequentialRecommender, seqs: list, history: int | None = None) -> Tensor:
    """Hidden [U, D] after each user's (last `history`) events, batched by length."""
    device = model.item_emb.weight.device
    lengths = [min(len(s), history or len(s)) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    out = torch.zeros(len(seqs), model.cfg.dim, device=device)
    start = 0
    while start < len(order):
        width = max(lengths[order[start]], 1)
        if width * width > PAIR_BUDGET:  # one history too long for a padded pass: chunked prefill, same result
            seq = seqs[order[start]]
            out[order[start]] = model.prefill(seq[len(seq) - lengths[order[start]]:])[1]
            start += 1
            continue
        stop = start + 1
        while stop < len(order):  # grow the batch while B x L x L fits the budget
            w = max(lengths[order[stop]], 1)
            if (stop - start + 1) * w * w > PAIR_BUDGET:
                break
            width, stop = w, stop + 1
        rows = order[start:stop]
        items, ts, actions, valid = pad_left([seqs[i] for i in rows], width, device)
        out[torch.tensor(rows, device=device)] = model(items, ts, actions, valid)[:, -1]
        start = stop
    return out


@torch.no_grad()
def rank_cases(model: SequentialRecommender, cases: list[EvalCase], *, exclude_seen: bool,
               history: int | None = None, batch: int = 512) -> Tensor:
    """Rank [len(cases)] of each case's target among all items, seen items excluded if asked."""
    hidden = last_hidden(model, [c.history for c in cases], history)
    ranks = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        scores = model.score(hidden[start:start + batch])  # [b, N]
        targets = torch.tensor([c.target for c in chunk], device=scores.device)
        exclude = [c.history.items.to(scores.device) for c in chunk] if exclude_seen else None
        ranks.append(rank_of_targets(scores, targets, exclude))
    return torch.cat(ranks).cpu() if ranks else torch.zeros(0, dtype=torch.long)


def popularity_ranks(train: list, cases: list[EvalCase], num_items: int, *, exclude_seen: bool) -> Tensor:
    """The popularity baseline: items ranked by training count, ties broken by a fixed random order."""
    counts = torch.zeros(num_items, dtype=torch.double)
    for seq in train:
        counts += torch.bincount(seq.items[seq.items < num_items], minlength=num_items).double()
    counts += torch.rand(num_items, generator=torch.Generator().manual_seed(0)) * 0.5
    scores = counts[None].expand(len(cases), -1)
    targets = torch.tensor([c.target for c in cases], dtype=torch.long)
    exclude = [c.history.items for c in cases] if exclude_seen else None
    return rank_of_targets(scores, targets, exclude)


def has_repeats(seqs: list) -> bool:
    """Whether any user consumes an item twice: then excluding seen items would hide true targets."""
    return any(len(s) != len(torch.unique(s.items)) for s in seqs)


def evaluate(model: SequentialRecommender, train: list, cases: list[EvalCase], *, exclude_seen: bool | None = None,
             history: int | None = None, compare_history: int | None = None) -> dict:
    """HR/NDCG@10/50 of the model and NDCG@10 of popularity; `exclude_seen=None` excludes seen items
    only when the training data never repeats an item within a user. With `compare_history`, also the
    paired NDCG@10 difference of seeing only that many last events (`history_gap`)."""
    if exclude_seen is None:
        exclude_seen = not has_repeats(train)
    ranks = rank_cases(model, cases, exclude_seen=exclude_seen, history=history)
    result = summarize(ranks)
    pop = summarize(popularity_ranks(train, cases, model.cfg.num_items, exclude_seen=exclude_seen), "popularity_")
    result.update(pop)
    result.update(users=len(cases), exclude_seen=exclude_seen, history=history or "all")
    if compare_history:
        recent = rank_cases(model, cases, exclude_seen=exclude_seen, history=compare_history)
        result["compare_history"] = history_gap(ranks, recent, compare_history)
    return result


def history_gap(whole: Tensor, recent: Tensor, history: int) -> dict:
    """NDCG@10 from the ranks of `evaluate`'s main pass (the whole history unless it was given one)
    against those with only each user's last `history` events.

    The same users and targets score both ways, so the standard error of the per-user difference is
    far smaller than either metric's own: the measure of whether the far history matters."""
    whole, recent = ndcg_gains(whole, 10), ndcg_gains(recent, 10)  # [U] each
    diff = recent - whole
    se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
    return {"history": history, "users": len(diff), "ndcg@10_whole": float(whole.mean()),
            "ndcg@10_recent": float(recent.mean()), "difference": float(diff.mean()), "difference_se": se,
            "relative": float(diff.mean() / whole.mean()) if float(whole.mean()) else 0.0}
