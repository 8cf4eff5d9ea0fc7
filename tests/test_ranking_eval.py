"""Evaluation of the ranking mode: AUC and GAUC, sampled candidates, and the sampled-candidate ranks.

The metrics are checked on hand-made scores whose answer is known; the candidate sampler on the
properties the metric depends on (the true item once and first, no history item, no duplicate); and the
batched target pass against the ranking over a cached state (`rank`), since evaluation and serving must
give the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kvrec.models import evaluate as ev
from kvrec.models.data import build_dataset, leave_one_out
from kvrec.models.metrics import auc, gauc
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events


def test_auc_on_known_examples():
    assert auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    # positives 0.8, 0.4; negatives 0.6, 0.2: of 4 pairs, 3 ordered right
    assert auc([0.8, 0.4, 0.6, 0.2], [1, 1, 0, 0]) == pytest.approx(0.75)
    # a tie counts half: positive 0.5 against negatives 0.5 and 0.1
    assert auc([0.5, 0.5, 0.1], [1, 0, 0]) == pytest.approx(0.75)
    assert auc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert auc([0.1, 0.2], [1, 1]) is None and auc([], []) is None
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        auc([0.1, 0.2, 0.3], [1, 0])


def test_auc_agrees_with_counting_pairs():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auc(scores, labels) == pytest.approx(pairs)


def test_gauc_weights_users_by_their_labelled_events_and_skips_one_class_users():
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.1, 0.5, 0.4]
    labels = [1, 0, 1, 0, 1, 0, 1, 1, 0]
    groups = ["a", "a", "b", "b", "b", "b", "c", "c", "d"]
    # a: 1.0 over 2 events; b: positives .8 .7 vs negatives .2 .6 -> 4/4 = 1.0 over 4 events;
    # c: positives only, skipped; d: one event, skipped
    value, users = gauc(scores, labels, groups)
    assert users == 2 and value == pytest.approx(1.0)
    labels_b_wrong = [1, 0, 0, 1, 0, 1, 1, 1, 0]  # b now: positives .2 .6 vs negatives .8 .7 -> 0
    value, _ = gauc(scores, labels_b_wrong, groups)
    assert value == pytest.approx((1.0 * 2 + 0.0 * 4) / 6)
    assert gauc([0.1, 0.2], [1, 1], ["a", "b"]) == (None, 0)


def test_sampled_candidates_hold_the_target_once_and_no_history():
    history = torch.tensor([3, 5, 7, 7, 11, 3])
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        cands = ev.sample_candidates(5, history, 50, 30, gen)  # the target may itself be in the history
        assert len(cands) == 30 and int(cands[0]) == 5
        assert len(torch.unique(cands)) == 30  # no duplicates, so the target is there once
        assert not torch.isin(cands[1:], history).any()
    # a catalogue that runs out: every item neither seen nor the target, once
    cands = ev.sample_candidates(0, torch.arange(1, 8), 12, 100, torch.Generator().manual_seed(0))
    assert int(cands[0]) == 0 and sorted(cands[1:].tolist()) == list(range(8, 12))
    # seeded: the same generator seed gives the same list, another seed another list
    draw = lambda s: ev.sample_candidates(1, history, 1000, 100, torch.Generator().manual_seed(s))
    assert torch.equal(draw(4), draw(4)) and not torch.equal(draw(4), draw(5))


def test_sampled_candidates_are_uniform_over_the_pool():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(40)
    for _ in range(2000):
        counts += torch.bincount(ev.sample_candidates(0, torch.tensor([1, 2]), 40, 6, gen)[1:], minlength=40)
    assert counts[:3].sum() == 0  # target and history never drawn
    expected = 2000 * 5 / 37
    assert ((counts[3:] - expected).abs() < 5 * math.sqrt(expected)).all()


def test_sampled_ranks_count_candidates_strictly_above_the_first():
    scores = [torch.tensor([0.5, 0.9, 0.1, 0.7]), torch.tensor([2.0, 1.0]), torch.tensor([0.0, *range(1, 15)])]
    ranks = ev.sampled_ranks(scores)
    assert ranks.tolist() == [2, 0, 14]  # ragged lists: padding never outranks the true item


def tiny_ranking_dataset(users: int = 12, items: int = 60, length: int = 15, parity: bool = False):
    """Random items and times; actions 1..4 with 3 and 4 engagement, random or (`parity`) 4 for an even
    item and 1 for an odd one."""
    gen = torch.Generator().manual_seed(0)
    cols: dict[str, list] = {"u": [], "i": [], "t": [], "a": []}
    for u in range(users):
        for k in range(length):
            item = int(torch.randint(0, items, (1,), generator=gen))
            action = int(torch.randint(1, 5, (1,), generator=gen))
            cols["u"].append(f"u{u}"), cols["i"].append(f"i{item}")
            cols["t"].append(1000 + 100 * k + u), cols["a"].append((4 if item % 2 == 0 else 1) if parity else action)
    return build_dataset("tiny", np.array(cols["u"]), np.array(cols["i"]), np.array(cols["t"]), np.array(cols["a"]),
                         engagement_actions=frozenset({3, 4}))


def ranking_model(num_items: int, kind: str = "hstu"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, num_items=num_items, dim=16, heads=2, d_k=8, d_v=8, dropout=0.0,
                                    ranking_head=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)
    return model


def test_evaluate_ranking_finds_the_rank_it_was_given(monkeypatch):
    """With relevance = the candidate's id, the true item's rank is the number of candidates with a larger
    id: NDCG@10 and HR@10 must follow from those ranks, whatever the padding of ragged lists."""
    ds = tiny_ranking_dataset()
    split = leave_one_out(ds)
    model = ranking_model(ds.num_items)

    def by_id(model, seqs, seen, items):
        return [i.float() for i in items], [torch.full((len(i),), 0.5) for i in items], \
            torch.zeros(len(seqs), model.cfg.dim)

    monkeypatch.setattr(ev, "target_pass", by_id)
    result = ev.evaluate_ranking(model, ds.seqs, split.test, candidates=20, gauc_events=0, seed=3,
                                 popularity=-torch.arange(ds.num_items, dtype=torch.double))
    ranks = []
    for case in split.test:
        cands = ev.sample_candidates(case.target, case.history.items, ds.num_items, 20,
                                     torch.Generator().manual_seed(3 * 1_000_003 + case.user_index))
        ranks.append(int((cands > case.target).sum()))
    ranks = np.array(ranks)
    assert 0 < (ranks < 10).mean() < 1  # the check means something: some in the top 10, some not
    assert result["rank_hr@10"] == pytest.approx((ranks < 10).mean())
    assert result["rank_ndcg@10"] == pytest.approx(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0).mean())
    # the paired difference against retrieval, whose tied scores put every target at rank 0 (gain 1)
    gains = np.where(ranks < 10, 1 / np.log2(ranks + 2), 0)
    assert result["rank_minus_retrieval_ndcg@10"] == pytest.approx(gains.mean() - 1.0)
    assert result["rank_minus_retrieval_se"] == pytest.approx(gains.std(ddof=1) / len(gains) ** 0.5)
    # popularity scored by minus the id on the same candidates: the rank counts smaller ids instead
    lower = np.array([int((ev.sample_candidates(c.target, c.history.items, ds.num_items, 20, torch.Generator()
                                                .manual_seed(3 * 1_000_003 + c.user_index)) < c.target).sum())
                      for c in split.test])
    assert result["rank_popularity_hr@10"] == pytest.approx((lower < 10).mean())
    # retrieval from an all-zero hidden ties every candidate: strictly-above ranks put the target first
    assert result["rank_retrieval_hr@10"] == 1.0
    assert "engage_auc" not in result  # no engagement actions given


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_the_batched_target_pass_equals_ranking_over_a_cached_state(kind, monkeypatch):
    """Evaluation scores candidates in padded training passes (several users and cut points at once) and
    falls back to prefill + extend + rank for a history too long for one: both must be `rank`'s numbers."""
    model = ranking_model(30, kind)
    gen = torch.Generator().manual_seed(1)
    seqs = [Events.of(torch.randint(0, 30, (n,), generator=gen), torch.cumsum(torch.randint(0, 900, (n,),
                                                                                            generator=gen), 0),
                      torch.randint(1, 5, (n,), generator=gen)) for n in (4, 17, 9)]
    seen = [torch.tensor([4, 4, 2]), torch.tensor([17, 5, 11, 17]), torch.tensor([3])]
    items = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 29]), torch.tensor([7])]
    relevance, engage, hidden = ev.target_pass(model, seqs, seen, items)
    for seq, cuts, cands, rel, eng in zip(seqs, seen, items, relevance, engage):
        for j, cut in enumerate(cuts.tolist()):
            state, _, _ = model.prefill(seq[:cut])
            want_rel, want_eng = model.rank(state, cands[j:j + 1], int(seq.ts[cut - 1]))
            torch.testing.assert_close(rel[j:j + 1], want_rel, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(eng[j:j + 1], want_eng, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ev.last_hidden(model, seqs), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(ev, "PAIR_BUDGET", 10)  # every user now too long for a padded pass
    slow = ev.target_pass(model, seqs, seen, items)
    for fast_part, slow_part in zip((relevance, engage), slow[:2]):
        for a, b in zip(fast_part, slow_part):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow[2], hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("planted, want", [(1.0, 1.0), (-1.0, 0.0)])
def test_engagement_metrics_take_each_targets_own_label(monkeypatch, planted, want):
    """Engagement is the item's parity here; a head that outputs the parity (or its opposite) scores AUC and
    GAUC 1 (or 0) only if every label is read at its target's own index, the test target's for AUC and each
    of the user's last events for GAUC (an off-by-one reads a neighbour's label, about 0.5)."""
    ds = tiny_ranking_dataset(parity=True)
    split = leave_one_out(ds)
    model = ranking_model(ds.num_items)

    def parity(model, seqs, seen, items):
        external = [torch.tensor([int(ds.item_ids[i][1:]) for i in x.tolist()]) for x in items]
        return [torch.zeros(len(x)) for x in items], [0.5 + planted * 0.4 * (1 - 2 * (e % 2)) for e in external], \
            torch.zeros(len(seqs), model.cfg.dim)

    monkeypatch.setattr(ev, "target_pass", parity)
    result = ev.evaluate_ranking(model, ds.seqs, split.test, candidates=10, engaged={3, 4}, gauc_events=8)
    assert result["engage_auc"] == pytest.approx(want) and result["engage_gauc"] == pytest.approx(want)
    assert result["engage_gauc_users"] == len(split.test)  # every user has both classes among 8 events
    labels = [int(ds.seqs[c.user_index].actions[-1]) in (3, 4) for c in split.test]
    assert 0 < sum(labels) < len(labels)
    assert result["engage_positive_rate"] == pytest.approx(np.mean(labels))
