"""One checkpoint file per trained model: safetensors weights with everything else in its metadata.

The metadata holds the model config, the external item ids (index = internal id), the fingerprint of
the dataset it was trained on and the training summary, all as JSON strings (safetensors metadata is a
str -> str map). No pickle: loading a checkpoint never executes code. The model fingerprint, a hash of
config and weights, is what state blobs carry so that a state made by another model is never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kvrec.models.recommender import ModelConfig, SequentialRecommender
from kvrec.models.registry import build_model
from safetensors.torch import load_file, save_file

FORMAT = "kvrec-model-1"


@dataclass
class Checkpoint:
    model: SequentialRecommender
    item_ids: list[str]  # external item id of each internal id
    dataset_fingerprint: str
    fingerprint: str  # of this model: config + weights
    path: Path | None = None
    info: dict = field(default_factory=dict)  # training summary (epochs, metrics, seed, ...)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def holdout(self) -> float:
        """The share of users kept out of training (`kvrec train --holdout-users`; 0 when none), whose
        ids `models.data.holdout_users` gives back from the dataset."""
        return float(self.info.get("train", {}).get("holdout", 0.0))

    def item_index(self) -> dict[str, int]:
        """External item id -> internal id."""
        return {item: i for i, item in enumerate(self.item_ids)}


UNTRAINED_ITEMS = 10_000


def untrained_checkpoint(kind: str = "hstu", ranking_head: bool = False) -> Checkpoint:
    """A model of the default size with random weights, for benchmarks of cost (which does not depend
    on training) when no checkpoint is given."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, num_items=UNTRAINED_ITEMS, dropout=0.0,
                                    ranking_head=ranking_head)).eval()
    return Checkpoint(model, [str(i) for i in range(UNTRAINED_ITEMS)], "untrained", model_fingerprint(model))


class CheckpointError(ValueError):
    """A file that is not a readable kvrec checkpoint."""


def model_fingerprint(model: SequentialRecommender) -> str:
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | Path, model: SequentialRecommender, item_ids: list[str],
                    dataset_fingerprint: str, info: dict | None = None) -> Checkpoint:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(item_ids) != model.cfg.num_items:
        raise ValueError(f"{len(item_ids)} item ids for a model of {model.cfg.num_items} items")
    fp = model_fingerprint(model)
    meta = {
        "format": FORMAT,
        "config": json.dumps(model.cfg.to_dict()),
        "item_ids": json.dumps(item_ids),
        "dataset_fingerprint": dataset_fingerprint,
        "fingerprint": fp,
        "info": json.dumps(info or {}),
    }
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(path), metadata=meta)
    return Checkpoint(model, item_ids, dataset_fingerprint, fp, path, info or {})


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint in eval mode on `device`; a missing or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model checkpoint at {path} (train one with `kvrec train`)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for non-safetensors input
        raise CheckpointError(f"{path} is not a safetensors checkpoint: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kvrec model (format {meta.get('format')!r}, want {FORMAT!r})")
    cfg = ModelConfig(**json.loads(meta["config"]))
    model = build_model(cfg).to(device)
    model.load_state_dict(weights)
    model.eval()
    return Checkpoint(model, json.loads(meta["item_ids"]), meta["dataset_fingerprint"], meta["fingerprint"],
                      path, json.loads(meta.get("info", "{}")))
