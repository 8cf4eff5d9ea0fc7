"""Evaluation on the leave-one-out split.

Retrieval (`evaluate`): the true next item against the whole catalogue, scored by the user's last hidden
vector. Ranking (`evaluate_ranking`): the true next item among N sampled candidates, scored by the
target-aware ranking head (each candidate a target token that sees the history and itself, as `rank`
scores it over a cached state) and, for comparison, by retrieval on the same candidates; plus the AUC and
GAUC of the engagement head where the data says which actions count as engagement.

Histories are batched by length (left-padded, so each user's last event sits in the last column) with
a cap on B x L x L so that long histories do not exhaust memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from kvrec.models.data import EvalCase
from kvrec.models.metrics import auc, gauc, hit_rate, ndcg, ndcg_gains, rank_of_targets, summarize
from kvrec.models.recommender import SequentialRecommender, Targets
from kvrec.models.state import Events
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


def popularity_scores(train: list, num_items: int) -> Tensor:
    """[N] double: each item's training count, ties broken by a fixed random order (the popularity baseline)."""
    counts = torch.zeros(num_items, dtype=torch.double)
    for seq in train:
        counts += torch.bincount(seq.items[seq.items < num_items], minlength=num_items).double()
    return counts + torch.rand(num_items, generator=torch.Generator().manual_seed(0)) * 0.5


def popularity_ranks(train: list, cases: list[EvalCase], num_items: int, *, exclude_seen: bool) -> Tensor:
    """The popularity baseline: items ranked by training count, ties broken by a fixed random order."""
    scores = popularity_scores(train, num_items)[None].expand(len(cases), -1)
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


# ------------------------------------------------------------------------------------- ranking (sampled)


def engagement_labels(actions: Tensor, engaged: Iterable[int]) -> Tensor:
    """[n] bool: whether each action counts as engagement (`Dataset.engagement_actions`)."""
    return torch.isin(actions, torch.tensor(sorted(engaged), dtype=actions.dtype, device=actions.device))


def sample_candidates(target: int, seen: Tensor, num_items: int, n: int, gen: torch.Generator) -> Tensor:
    """[<= n] int64 candidate ids: `target` first, then n - 1 distinct items drawn uniformly from those that
    are neither in `seen` (the user's history) nor the target. Fewer when the catalogue runs out.

    The sampled-metric protocol of SASRec and HSTU's ranking stage: a negative the user has consumed could be
    a true future item, and a duplicate would count one item twice. Rejection sampling (draw, skip what is
    taken) keeps it O(n) for a large catalogue; a catalogue that is mostly excluded draws from the pool."""
    taken = torch.zeros(num_items, dtype=torch.bool)
    taken[seen[(seen >= 0) & (seen < num_items)]] = True
    taken[target] = True
    free = num_items - int(taken.sum())
    want = min(n - 1, free)
    if want <= 0:
        return torch.tensor([target], dtype=torch.long)
    if free <= 4 * want:  # most of the catalogue is wanted: a permutation of the pool
        pool = (~taken).nonzero()[:, 0]
        negatives = pool[torch.randperm(len(pool), generator=gen)[:want]]
    else:
        picked: list[int] = []
        while len(picked) < want:
            for item in torch.randint(0, num_items, (2 * (want - len(picked)),), generator=gen).tolist():
                if not taken[item]:
                    taken[item] = True
                    picked.append(item)
                    if len(picked) == want:
                        break
        negatives = torch.tensor(picked, dtype=torch.long)
    return torch.cat([torch.tensor([target], dtype=torch.long), negatives])


@torch.no_grad()
def target_pass(model: SequentialRecommender, seqs: list[Events], seen: list[Tensor],
                items: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Score target tokens with the ranking head, many users and cut points per pass.

    seqs[u]: the events its targets may see; items[u], seen[u] [C_u]: target item ids and how many of
    seqs[u]'s first events each sees (1..len), each target at the time of the last event it sees, as
    `rank` places a candidate at the user's latest event time over a cached state (the two agree, see
    tests/test_ranking.py). Returns per user relevance logits [C_u] and engagement probabilities [C_u],
    and hidden [U, D] after each sequence's last event (the retrieval vector). Batches grow while
    B x (L + C)^2 fits PAIR_BUDGET; a user too long for that is prefilled once and extended from cut to
    cut, ranking at each (the same numbers)."""
    device = model.item_emb.weight.device
    num_items = model.cfg.num_items
    width_of = [max(len(s), 1) + len(c) for s, c in zip(seqs, items)]
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), len(items[i])))
    relevance: list[Tensor] = [torch.zeros(0)] * len(seqs)
    engage: list[Tensor] = [torch.zeros(0)] * len(seqs)
    hidden = torch.zeros(len(seqs), model.cfg.dim, device=device)
    start = 0
    while start < len(order):
        first = order[start]
        if width_of[first] ** 2 > PAIR_BUDGET:
            relevance[first], engage[first], hidden[first] = _rank_by_extension(model, seqs[first], seen[first],
                                                                                items[first])
            start += 1
            continue
        stop, length, cands = start + 1, max(len(seqs[first]), 1), len(items[first])
        while stop < len(order):  # lengths ascend; the candidate count may not
            nxt = order[stop]
            w, c = max(len(seqs[nxt]), 1), max(cands, len(items[nxt]))
            if (stop - start + 1) * (w + c) ** 2 > PAIR_BUDGET:
                break
            length, cands, stop = w, c, stop + 1
        rows = order[start:stop]
        ev, tgt_items, tgt_seen = [seqs[i] for i in rows], torch.full((len(rows), cands), num_items), \
            torch.ones(len(rows), cands, dtype=torch.long)
        tgt_ts = torch.zeros(len(rows), cands, dtype=torch.long)
        for r, i in enumerate(rows):
            c = len(items[i])
            tgt_items[r, :c], tgt_seen[r, :c] = items[i], seen[i]
            tgt_ts[r, :c] = seqs[i].ts[seen[i] - 1]
        b_items, b_ts, b_actions, b_valid = pad_left(ev, length, device)
        h, th = model(b_items, b_ts, b_actions, b_valid,
                      Targets(tgt_items.to(device), tgt_seen.to(device), tgt_ts.to(device)))
        rel, eng = model.head(th)  # [b, C] each
        hidden[torch.tensor(rows, device=device)] = h[:, -1]
        for r, i in enumerate(rows):
            relevance[i], engage[i] = rel[r, :len(items[i])], torch.sigmoid(eng[r, :len(items[i])])
        start = stop
    return relevance, engage, hidden


def _rank_by_extension(model: SequentialRecommender, seq: Events, seen: Tensor,
                       items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`target_pass` for one history too long for a padded pass: prefill to the first cut, then extend
    to each next one and rank its targets over the cached state."""
    relevance = torch.zeros(len(items), device=model.item_emb.weight.device)
    engage = torch.zeros_like(relevance)
    state, hidden, done = model.empty_state(), None, 0
    for cut in sorted(set(seen.tolist())):
        state, hidden, _ = model.extend(state, seq[done:cut]) if done else model.prefill(seq[:cut])
        done = cut
        at = (seen == cut).nonzero()[:, 0]
        relevance[at.to(relevance.device)], engage[at.to(relevance.device)] = model.rank(
            state, items[at], int(seq.ts[cut - 1]))
    if done < len(seq):
        _, hidden, _ = model.extend(state, seq[done:])
    return relevance, engage, hidden


def _padded(lists: list[Tensor], fill: int | float) -> tuple[Tensor, Tensor]:
    """Ragged [C_u] tensors -> [U, C] padded with `fill`, and the mask of real entries [U, C]."""
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), width), fill, dtype=lists[0].dtype if lists else torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for row, x in enumerate(lists):
        out[row, :len(x)], mask[row, :len(x)] = x.cpu(), True
    return out, mask


def sampled_ranks(scores: list[Tensor]) -> Tensor:
    """Rank [U] of each user's first candidate (the true item) among its candidates' scores [C_u]."""
    padded, mask = _padded([s.float().cpu() for s in scores], -math.inf)
    padded = padded.masked_fill(~mask, -math.inf)
    return rank_of_targets(padded, torch.zeros(len(scores), dtype=torch.long))


def _at_10(ranks: Tensor, prefix: str) -> dict[str, float]:
    return {f"{prefix}ndcg@10": ndcg(ranks, 10), f"{prefix}hr@10": hit_rate(ranks, 10)}


@torch.no_grad()
def evaluate_ranking(model: SequentialRecommender, seqs: list[Events], cases: list[EvalCase], *,
                     candidates: int = 100, engaged: Iterable[int] = (), gauc_events: int = 20,
                     history: int | None = None, seed: int = 0, popularity: Tensor | None = None) -> dict:
    """The true next item among `candidates` sampled ones (itself included, negatives drawn by
    `sample_candidates`, seeded per user so every model and run sees the same lists).

    Keys: `rank_ndcg@10`, `rank_hr@10` by the ranking head (when the model has one) and
    `rank_retrieval_ndcg@10`, `rank_retrieval_hr@10` by retrieval on the same candidates (every model),
    and with a head their paired per-user difference (`rank_minus_retrieval_ndcg@10`, its standard error).
    With `engaged` action ids and a head: `engage_auc`, the engagement head's AUC on the cases' targets
    (labels from `seqs[u]`, the user's whole sequence, at the target's index), and `engage_gauc`, the
    per-user AUC over each user's last `gauc_events` events up to the target, scored from their prefixes
    in one pass (several cut points per user; all but the last one or two of them were training targets,
    so GAUC measures fit across a user's events, AUC on the held-out targets generalisation); `gauc_events=0`
    skips GAUC (a second pass). `history`: only the last N events are seen, as in `evaluate`.
    `popularity` ([N] scores, e.g. `popularity_scores` of the training data) adds the baseline on the same
    candidates (`rank_popularity_ndcg@10`): uniform negatives are mostly rare items, so popularity alone
    ranks the true item well, and a sampled metric means little without it."""
    num_items = model.cfg.num_items
    engaged = frozenset(engaged)
    windows = [c.history[max(0, len(c.history) - history):] if history else c.history for c in cases]
    lists = [sample_candidates(c.target, c.history.items, num_items, candidates,
                               torch.Generator().manual_seed(seed * 1_000_003 + c.user_index)) for c in cases]
    has_head = model.rank_head is not None
    result: dict = {"candidates": candidates, "users": len(cases), "history": history or "all"}
    if not cases:
        return result
    if has_head:
        relevance, engage, hidden = target_pass(model, windows, [torch.full((len(k),), len(w))
                                                                 for k, w in zip(lists, windows)], lists)
        head_ranks = sampled_ranks(relevance)
        result.update(_at_10(head_ranks, "rank_"))
    else:
        hidden = last_hidden(model, [c.history for c in cases], history)
    cand, mask = _padded(lists, num_items)
    retrieval = model.score(hidden, cand.to(hidden.device)).cpu()
    retrieval_ranks = sampled_ranks([row[m] for row, m in zip(retrieval, mask)])
    result.update(_at_10(retrieval_ranks, "rank_retrieval_"))
    if has_head:  # paired by user: the same targets and candidates, so the difference's error is small
        diff = ndcg_gains(head_ranks, 10) - ndcg_gains(retrieval_ranks, 10)
        result["rank_minus_retrieval_ndcg@10"] = float(diff.mean())
        result["rank_minus_retrieval_se"] = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
    if popularity is not None:
        result.update(_at_10(sampled_ranks([popularity[k] for k in lists]), "rank_popularity_"))
    if has_head and engaged:
        labels = torch.stack([engagement_labels(seqs[c.user_index].actions[len(c.history)][None], engaged)[0]
                              for c in cases])
        result["engage_auc"] = auc(torch.stack([e[0] for e in engage]).cpu().numpy(), labels.numpy())
        result["engage_positive_rate"] = float(labels.float().mean())
        if gauc_events:
            result.update(engagement_gauc(model, seqs, cases, engaged, gauc_events, history))
    return result


def engagement_gauc(model: SequentialRecommender, seqs: list[Events], cases: list[EvalCase],
                    engaged: frozenset[int], last: int = 20, history: int | None = None) -> dict:
    """GAUC of the engagement head over each case's user's last `last` events up to its target, each true
    item scored from its prefix (cut points in one pass per user; users whose events are of one class are
    skipped before scoring, as `gauc` would skip them)."""
    windows, seen, items, labels, groups = [], [], [], [], []
    for c in cases:
        seq, end = seqs[c.user_index], len(c.history) + 1  # events up to and including the target
        offset = max(0, end - 1 - history) if history else 0
        cuts = torch.arange(max(offset + 1, end - last), end)
        y = engagement_labels(seq.actions[cuts], engaged)
        if len(cuts) < 2 or bool(y.all()) or not bool(y.any()):
            continue
        windows.append(seq[offset:end - 1])
        seen.append(cuts - offset)
        items.append(seq.items[cuts])
        labels.append(y)
        groups.append(torch.full((len(cuts),), c.user_index))
    if not windows:
        return {"engage_gauc": None, "engage_gauc_users": 0}
    _, engage, _ = target_pass(model, windows, seen, items)
    value, users = gauc(torch.cat(engage).cpu().numpy(), torch.cat(labels).numpy(), torch.cat(groups).numpy())
    return {"engage_gauc": value, "engage_gauc_users": users}
