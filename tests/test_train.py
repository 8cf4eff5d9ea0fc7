"""Training, checkpoints and full-ranking evaluation on tiny synthetic data."""

import json
import random

import numpy as np
import pytest
import torch
from kvrec.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kvrec.models.data import build_dataset, leave_one_out
from kvrec.models.evaluate import evaluate, popularity_ranks
from kvrec.models.metrics import ndcg, rank_of_targets
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.train import TrainConfig, length_batches, train, windows

from kvrec.cli import main as kvrec


def cyclic_dataset(users: int = 40, items: int = 20, length: int = 30):
    """Each user walks the catalogue in steps of +1 from a random start: the next item is always
    predictable from the last one, and popularity carries no signal at all."""
    gen = torch.Generator().manual_seed(0)
    user_col, item_col, ts_col = [], [], []
    for u in range(users):
        start = int(torch.randint(0, items, (1,), generator=gen))
        for t in range(length):
            user_col.append(f"u{u}")
            item_col.append(f"i{(start + t) % items}")
            ts_col.append(1000 + 60 * t)
    return build_dataset("cyclic", np.array(user_col), np.array(item_col), np.array(ts_col, dtype=np.int64))


TINY = ModelConfig(dim=16, heads=2, d_k=8, d_v=8, max_len=20, dropout=0.0)
QUICK = TrainConfig(epochs=20, batch_size=32, random_negatives=16, in_batch_negatives=16, patience=20, lr=3e-3)


def test_metrics_from_ranks():
    ranks = torch.tensor([0, 1, 9, 10, 100])
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / torch.log2(torch.tensor(3.0)).item()
                                             + 1 / torch.log2(torch.tensor(11.0)).item()) / 5)
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1]])
    assert rank_of_targets(scores, torch.tensor([1])).tolist() == [2]
    # excluding a better item lifts the target; the target itself is never excluded
    assert rank_of_targets(scores, torch.tensor([1]), [torch.tensor([0, 1])]).tolist() == [1]


def test_windows_cut_from_the_end():
    from kvrec.models.state import Events

    seq = Events.of(range(45))
    wins = windows([seq], max_len=20)
    assert [w.items[-1].item() for w in wins] == [44, 24, 4]
    assert all(len(w) <= 21 for w in wins)
    assert wins[0].items[0].item() == 24  # consecutive windows share their boundary event as input/target


def test_length_batches_hold_the_pair_budget():
    from kvrec.models.state import Events

    wins = [Events.of(range(n)) for n in [5] * 40 + [30, 31, 60, 100, 1000]]
    batches = length_batches(wins, batch_size=16, rng=random.Random(0), pair_budget=4000)
    assert sorted(len(w) for b in batches for w in b) == sorted(len(w) for w in wins)  # every window once
    for b in batches:
        width = max(len(w) for w in b)
        assert len(b) <= 16 and (len(b) == 1 or len(b) * width * width <= 4000)
    assert [len(b) for b in batches if len(b[0]) >= 60] == [1, 1, 1]  # too wide to share a batch
    assert sum(len(b) for b in batches if len(b[0]) == 5) == 40  # short ones still fill batches


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_training_learns_a_sequential_pattern(kind):
    ds = cyclic_dataset()
    model, summary = train(ds, ModelConfig(**{**TINY.to_dict(), "kind": kind}), QUICK, progress=False)
    split = leave_one_out(ds)
    result = evaluate(model, split.train, split.test)
    assert result["exclude_seen"] is False  # users revisit items: excluding them would hide targets
    # the walk is deterministic given the last item, while popularity is flat
    assert result["ndcg@10"] > 0.5 and result["ndcg@10"] > 4 * result["popularity_ndcg@10"], result
    assert summary["best_epoch"] >= 1 and summary["history"][0]["loss"] > summary["history"][-1]["loss"]


def test_history_gap_pairs_the_same_users():
    ds = cyclic_dataset(users=12)
    model = build_model(ModelConfig(**{**TINY.to_dict(), "num_items": ds.num_items})).eval()
    split = leave_one_out(ds)
    longest = max(len(c.history) for c in split.test)
    whole = evaluate(model, split.train, split.test, compare_history=longest)
    same = whole["compare_history"]
    assert same["difference"] == 0.0 and same["difference_se"] == 0.0  # the whole history either way
    assert same["ndcg@10_whole"] == pytest.approx(whole["ndcg@10"])
    short = evaluate(model, split.train, split.test, compare_history=2)["compare_history"]
    recent = evaluate(model, split.train, split.test, history=2)["ndcg@10"]
    assert short["ndcg@10_recent"] == pytest.approx(recent)
    assert short["difference"] == pytest.approx(recent - short["ndcg@10_whole"])


def test_checkpoint_round_trip(tmp_path):
    ds = cyclic_dataset(users=5)
    model = build_model(ModelConfig(**{**TINY.to_dict(), "num_items": ds.num_items})).eval()
    saved = save_checkpoint(tmp_path / "m.ckpt", model, ds.item_ids, ds.fingerprint(), {"note": "x"})
    loaded = load_checkpoint(tmp_path / "m.ckpt")
    assert loaded.fingerprint == saved.fingerprint
    assert loaded.item_ids == ds.item_ids and loaded.dataset_fingerprint == ds.fingerprint()
    assert loaded.config == model.cfg and loaded.info == {"note": "x"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])
    assert b"pickle" not in (tmp_path / "m.ckpt").read_bytes()[:200]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="kvrec train"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        load_checkpoint(tmp_path / "junk.ckpt")


def test_popularity_baseline_ranks_by_count():
    from kvrec.models.data import EvalCase
    from kvrec.models.state import Events

    train_seqs = [Events.of([0, 0, 0, 1, 1, 2])]
    cases = [EvalCase(0, Events.of([2]), target, 0) for target in (0, 1, 2)]
    assert popularity_ranks(train_seqs, cases, 3, exclude_seen=False).tolist() == [0, 1, 2]
    assert popularity_ranks(train_seqs, cases, 3, exclude_seen=True).tolist() == [0, 1, 2]


@pytest.mark.slow
def test_cli_train_then_eval(tmp_path, capsys):
    ds = cyclic_dataset(users=20)
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{ds.user_ids[u]},{ds.item_ids[i]},{t}\n" for u, s in enumerate(ds.seqs)
        for i, t in zip(s.items.tolist(), s.ts.tolist())))
    ckpt = tmp_path / "m.ckpt"
    assert kvrec(["train", "--model", "sasrec", "--dataset", str(path), "--out", str(ckpt), "--dim", "16",
                  "--head-dim", "8", "--max-len", "20", "--epochs", "2", "--batch-size", "8", "--negatives", "8"]) == 0
    out = tmp_path / "eval.json"
    assert kvrec(["eval-model", "--model", str(ckpt), "--dataset", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "popularity_ndcg@10"):
        assert 0.0 <= result[key] <= 1.0
    assert result["users"] == 20 and "popularity" in capsys.readouterr().out


def test_last_hidden_is_the_same_batched_or_prefilled(monkeypatch):
    """Evaluation batches short histories and prefills long ones in chunks: both give each user's hidden."""
    from kvrec.models import evaluate as ev
    from kvrec.models.state import Events

    model = build_model(ModelConfig(**{**TINY.to_dict(), "num_items": 30})).eval()
    seqs = [Events.of(torch.randint(0, 30, (n,)), torch.arange(n) * 100) for n in (3, 40, 12, 25)]
    batched = ev.last_hidden(model, seqs, history=30)
    monkeypatch.setattr(ev, "PAIR_BUDGET", 100)  # every history over 10 events now goes through prefill
    torch.testing.assert_close(ev.last_hidden(model, seqs, history=30), batched, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], model.prefill(seqs[1][10:])[1], atol=1e-5, rtol=0)
