"""Training: sampled softmax over in-batch and random negatives, AdamW, early stopping on validation NDCG@10.

Every user's training sequence is cut, from its end, into windows of `max_len + 1` events; each window
teaches next-item prediction at every position. The loss contrasts each true next item with a shared
set of negatives per batch (items sampled uniformly from the catalogue plus the batch's own targets,
which are popularity-distributed), scored by cosine similarity over a temperature, with the logQ
correction of sampled softmax for how often each item is drawn.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from kvrec.models.data import DataError, Dataset, leave_one_out
from kvrec.models.evaluate import evaluate, has_repeats, pad_left
from kvrec.models.recommender import ModelConfig, SequentialRecommender, time_bucket
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
    patience: int = 5  # evaluations without a better validation NDCG@10 before stopping
    max_valid_users: int = 2000  # validation on a fixed sample, for speed
    max_minutes: float | None = None  # wall-clock cap, checked after each epoch
    pair_budget: int = 32_000_000  # B x L x L attention entries per batch: bounds memory for long windows
    seed: int = 0


def windows(train: list[Events], max_len: int) -> list[Events]:
    """Non-overlapping windows of up to max_len + 1 events, cut from the end of each sequence."""
    out = []
    for seq in train:
        for end in range(len(seq), 1, -max_len):
            out.append(seq[max(0, end - max_len - 1):end])
    return out


def length_batches(wins: list[Events], batch_size: int, rng: random.Random,
                   pair_budget: int | None = None) -> list[list[Events]]:
    """Batches of similar length in random order: attention cost is quadratic in the padded width, and
    most users are far shorter than the window. A batch also stops growing before B x L x L passes
    `pair_budget`, so that windows as long as whole histories (thousands of events) fit in memory."""
    order = sorted(range(len(wins)), key=lambda i: (len(wins[i]), rng.random()))
    batches: list[list[Events]] = []
    for i in order:
        width = len(wins[i])  # the widest so far: lengths ascend
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


def batch_loss(model: SequentialRecommender, batch: list[Events], cfg: TrainConfig,
               gen: torch.Generator, log_q: torch.Tensor) -> torch.Tensor:
    device = model.item_emb.weight.device
    width = max(len(w) for w in batch)
    items, ts, actions, valid = pad_left(batch, width, device)  # [B, L+1]
    hidden = model(items[:, :-1], ts[:, :-1], actions[:, :-1], valid[:, :-1])  # [B, L, D]
    has_target = valid[:, :-1] & valid[:, 1:]  # [B, L]
    h = F.normalize(hidden[has_target], dim=-1)  # [P, D]
    targets = items[:, 1:][has_target]  # [P]
    n = model.cfg.num_items
    random_neg = torch.randint(0, n, (cfg.random_negatives,), generator=gen).to(device)
    pick = torch.randint(0, len(targets), (min(cfg.in_batch_negatives, len(targets)),), generator=gen).to(device)
    negatives = torch.cat([random_neg, targets[pick]])  # [M]
    item_vec = F.normalize(model.item_emb.weight, dim=-1)
    pos_logit = (h * item_vec[targets]).sum(-1, keepdim=True)  # [P, 1]
    neg_logit = h @ item_vec[negatives].T  # [P, M]
    neg_logit = neg_logit.masked_fill(negatives[None] == targets[:, None], -math.inf)  # accidental hits
    log_q = log_q.to(device)
    logits = torch.cat([pos_logit / cfg.temperature - log_q[targets, None],
                        neg_logit / cfg.temperature - log_q[negatives][None]], dim=1)  # [P, 1 + M]
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=device))


def train(dataset: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, device: str = "cpu",
          progress: bool = True) -> tuple[SequentialRecommender, dict]:
    """Train on the leave-one-out split of `dataset`; returns the best model (eval mode) and a summary."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    split = leave_one_out(dataset)
    wins = windows(split.train, model_cfg.max_len)
    # time buckets up to the widest gap a training window holds: longer gaps at serving share the last one
    widest_gap = max((int(w.ts[-1] - w.ts[0]) for w in wins), default=0)
    model_cfg = replace(model_cfg, num_items=dataset.num_items,
                        time_buckets=int(time_bucket(torch.tensor(widest_gap), 64)) + 1)  # 64: all of int64
    if not split.valid:
        raise DataError(f"{dataset.name}: no user has the 3 events needed for a validation target; "
                        "train on a dataset with longer histories")
    model = build_model(model_cfg).to(device)
    valid = random.Random(cfg.seed).sample(split.valid, min(cfg.max_valid_users, len(split.valid)))
    exclude_seen = not has_repeats(split.train)
    log_q = sampling_log_q(split.train, dataset.num_items, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, stale, history = -1.0, None, 0, 0, []
    started = time.time()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {model_cfg.kind}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        total = 0.0
        for batch in length_batches(wins, cfg.batch_size, random.Random(cfg.seed + epoch), cfg.pair_budget):
            loss = batch_loss(model, batch, cfg, gen, log_q)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        model.eval()
        metrics = evaluate(model, split.train, valid, exclude_seen=exclude_seen, history=model_cfg.max_len)
        history.append({"epoch": epoch, "loss": total / len(wins), "valid_ndcg@10": metrics["ndcg@10"]})
        bar.set_postfix(loss=f"{total / len(wins):.3f}", val_ndcg10=f"{metrics['ndcg@10']:.4f}",
                        best=f"{max(best, metrics['ndcg@10']):.4f}")
        if metrics["ndcg@10"] > best:
            best, best_epoch, stale = metrics["ndcg@10"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        minutes = (time.time() - started) / 60
        if stale >= cfg.patience or (cfg.max_minutes is not None and minutes >= cfg.max_minutes):
            break
    model.load_state_dict(best_state)
    model.eval()
    summary = {"train": asdict(cfg), "best_epoch": best_epoch, "valid_ndcg@10": best, "epochs_run": len(history),
               "minutes": round((time.time() - started) / 60, 2), "windows": len(wins), "device": str(device),
               "exclude_seen": exclude_seen, "history": history}
    return model, summary
