"""`kvrec bench levels`: MALLOC's levels side by side, post-hoc policies and trained variants, in one table.

Every model (`--models base.ckpt,gqa.ckpt,...`, all trained on one dataset) is replayed under `full` and
each post-hoc spec that applies to its state (a spec that does not is skipped for that model, with the
reason in the row's `note`). All (model, policy) rows answer the SAME requests: one `bench.RequestPlan`
makes each user's requests once (the same users, next items and sampled negatives) and `bench.replay` runs
them through every model's serving steps, so each request's NDCG@10 is paired with the base model's `full`
answer to the same request. `ndcg@10_vs_base` is the relative difference (sum of the row's gains minus the
base's, over the base's), `ndcg@10_vs_base_se` its standard error and `ndcg@10_vs_base_ci95` its 95%
percentile interval, both from a bootstrap over users (models.uncertainty: users are resampled, not
requests, since one user's requests are correlated). `ndcg@10_vs_full` is the difference to the same
model's own `full`.

Sizes. `bytes_per_user_mean` is the mean blob the replay left per user (the accuracy's states).
`bytes_at_{n}` is measured, not extrapolated: one fixed stream (the longest replayed user's whole history,
cycled to n events, each cycle's times shifted past the previous cycle's last so time keeps moving) is
served in requests of `growth_request` events, each one restore -> extend -> compress -> encode as the
service does, and the blob after n events is counted. `compression_ratio` is the base model's `full`
bytes over the row's at the replay mean, `compression_ratio_at_{n}` the same at the longest length.

`level` says what a row measures: "reference" (the base model's `full`), "post-hoc" (a policy on the base
model, or on a copy of it: same fingerprint), "trained" (another model, i.e. a trained level, under
`full`) or "trained+post-hoc".

`target` names the issue's memory targets a row meets with its interval, not its point estimate:
"8x@1%" when the replay-mean ratio is at least 8 and the 95% interval's lower bound of the relative
NDCG@10 difference is at least -1%, "32x@5%" likewise with 32 and -5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from kvrec.compression import bench
from kvrec.compression.bench import REFERENCE, Lane
from kvrec.compression.spec import parse_policy
from kvrec.compression.step import ServingStep
from kvrec.models.cli import UsageError
from kvrec.models.state import Events
from kvrec.models.uncertainty import RESAMPLES, paired_difference

GROWTH_LENGTHS = (1000, 10_000)
GROWTH_REQUEST = 100
TARGETS = (("8x@1%", 8.0, -0.01), ("32x@5%", 32.0, -0.05))
# what a row measures: (another model than the base (by fingerprint), a post-hoc policy) -> its `level`
LEVELS = {(False, False): "reference", (False, True): "post-hoc", (True, False): "trained",
          (True, True): "trained+post-hoc"}
INTERVAL = f"bootstrap over users ({RESAMPLES} resamples), percentile 95% interval; s.e. = bootstrap std"


@dataclass
class Level:
    """One model of the comparison: its label (the checkpoint's path stem), its lane, and the specs
    skipped for it with the reason."""

    label: str
    checkpoint: object  # models.checkpoint.Checkpoint
    lane: Lane | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def labels_of(paths: list) -> list[str]:
    """Path stems, with `#2`, `#3` ... after a stem seen before (a model may be compared with itself)."""
    out, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}#{seen[stem]}")
    return out


def check_same_dataset(checkpoints: list, labels: list[str]) -> None:
    """Refuse models trained on different datasets: their rows could not answer the same requests."""
    base = checkpoints[0]
    for ckpt, label in zip(checkpoints[1:], labels[1:], strict=True):
        if ckpt.dataset_fingerprint != base.dataset_fingerprint or ckpt.item_ids != base.item_ids:
            raise UsageError(f"--models: {label} was trained on dataset {ckpt.dataset_fingerprint}, the base "
                             f"{labels[0]} on {base.dataset_fingerprint}; every level must be trained on the same "
                             "dataset to be compared request by request")


def short_reason(exc: Exception) -> str:
    """A PolicyError's reason without the list of policies that would fit."""
    return " ".join(str(exc).split("; policies for")[0].split())


def growth_stream(streams: list, length: int) -> Events:
    """The fixed stream of the growth measurement: the longest user's whole history cycled to `length`
    events, each cycle's times shifted past the previous cycle's last."""
    user = max(streams, key=lambda s: len(s.prefix) + len(s.future))
    history = Events.cat([user.prefix, user.future])
    cycles = math.ceil(length / len(history))
    span = int(history.ts[-1] - history.ts[0]) + 1
    ts = torch.cat([history.ts + k * span for k in range(cycles)])
    return Events(history.items.repeat(cycles)[:length], ts[:length], history.actions.repeat(cycles)[:length])


def grow(step: ServingStep, events: Events, lengths: list[int], per_request: int) -> dict[int, int]:
    """Blob bytes after each of `lengths` events of `events`, served in requests of `per_request` events
    (the last request before a length is cut at it): restore -> extend -> compress -> encode, as served."""
    cuts = sorted(set(range(per_request, max(lengths) + 1, per_request)) | set(lengths))
    state, start, out = step.start(0), 0, {}
    for end in cuts:
        blob = step.advance(state, events[start:end]).blob
        state, start = step.restore(blob), end
        if state is None:
            raise RuntimeError(f"{step.pipeline.spec}: a blob it encoded does not decode")
        if end in lengths:
            out[end] = len(blob)
    return out


def versus_base(tally, base_tally) -> dict:
    """The row's NDCG@10 against the base model's `full`, paired request by request."""
    if tally.rank_user != base_tally.rank_user:
        raise AssertionError("rows of one levels replay answered different requests")
    gains, base_gains = bench.ndcg_gains(tally.ranks), bench.ndcg_gains(base_tally.ranks)
    d = paired_difference(list(base_gains), list(gains), tally.rank_user)
    return {"ndcg@10_vs_base": None if d is None else d.relative,
            "ndcg@10_vs_base_se": None if d is None else d.se,
            "ndcg@10_vs_base_ci95": None if d is None else list(d.ci95)}


def targets_met(row: dict) -> str:
    ratio, ci = row.get("compression_ratio"), row.get("ndcg@10_vs_base_ci95")
    return " ".join(name for name, need, loss in TARGETS if ratio and ci and ratio >= need and ci[0] >= loss)


def run_levels(checkpoints: list, dataset, specs: list[str], *, labels: list[str] | None = None,
               events_per_request: int = 10, max_users: int | None = None,
               max_requests_per_user: int | None = None, negatives: int = 100, seed: int = 0,
               lengths: tuple[int, ...] | list[int] = GROWTH_LENGTHS, growth_request: int = GROWTH_REQUEST,
               progress: bool = True, calibration_users: int = 64) -> list[dict]:
    """One row per (model, policy): every model under `full` and each spec of `specs` that applies to it
    (in that order, models in the given order); `checkpoints[0]` is the base every row is compared with.
    `dataset` is a models.data.Dataset or a list of StreamUser, as for bench.run_offline."""
    from tqdm import tqdm

    labels = labels or labels_of([c.path or f"model{i}" for i, c in enumerate(checkpoints)])
    check_same_dataset(checkpoints, labels)
    streams = bench.replay_streams(dataset, events_per_request, max_users)
    if not streams:
        raise UsageError(f"no user has more than {events_per_request} events after the prefix; lower "
                         "--events-per-request or --fraction")
    calibration = [s.prefix for s in streams[:calibration_users]]
    levels = []
    for label, ckpt in zip(labels, checkpoints, strict=True):
        level = Level(label, ckpt)
        level.lane = bench.make_lane(ckpt, specs, calibration, lambda spec, exc, lv=level: lv.skipped.update(
            {spec: short_reason(exc)}))
        levels.append(level)
    plan = bench.RequestPlan(events_per_request, max_requests_per_user, checkpoints[0].model.cfg.num_items,
                             negatives, bench.seen_is_excluded(streams), seed)
    bench.replay(streams, plan, [level.lane for level in levels], progress, desc="bench levels")

    lengths = sorted(set(lengths))
    stream = growth_stream(streams, lengths[-1])
    growth: dict[tuple[str, str], dict[int, int]] = {}
    stateful = [(lv, spec) for lv in levels for spec, step in lv.lane.steps.items() if step.keeps_state]
    for level, spec in tqdm(stateful, desc=f"bench levels: states to {lengths[-1]} events", unit="state",
                            disable=not progress, mininterval=2.0):
        growth[level.label, spec] = grow(level.lane.steps[spec], stream, lengths, growth_request)

    base = levels[0].lane.tallies[REFERENCE]
    base_bytes = float(np.mean(base.final_bytes))
    base_at = growth[levels[0].label, REFERENCE]
    rows = []
    base_fingerprint = levels[0].checkpoint.fingerprint
    for level in levels:
        lane, cfg = level.lane, level.checkpoint.model.cfg
        for spec in dict.fromkeys([REFERENCE, *specs]):
            head = {"model": level.label, "variant": cfg.variant(), "kind": cfg.kind,
                    "level": LEVELS[level.checkpoint.fingerprint != base_fingerprint, spec != REFERENCE],
                    "path": str(level.checkpoint.path or "")}
            if spec in level.skipped:
                rows.append({**head, "policy": parse_policy(spec).spec, "skipped": True,
                             "note": f"skipped: {level.skipped[spec]}"})
                continue
            tally = lane.tallies[spec]
            row = {**head, **bench.summarize(lane.pipelines[spec].spec, tally, base_bytes, len(streams)),
                   **bench.versus_full(tally, lane.tallies[REFERENCE]), **versus_base(tally, base), "skipped": False,
                   "note": ""}
            sizes = growth.get((level.label, spec), {})
            for n in lengths:
                row[f"bytes_at_{n}"] = sizes.get(n)
            top = sizes.get(lengths[-1])
            row[f"compression_ratio_at_{lengths[-1]}"] = base_at[lengths[-1]] / top if top else None
            row["target"] = targets_met(row)
            rows.append(row)
    return rows
