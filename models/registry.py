"""Build a model from its config: the one place that maps `ModelConfig.kind` to a class.

`MODELS` maps each backbone kind to its class; within HSTU, the trained levels that change what a state
holds (`recurrent`, `memory`, `slots`; `ModelConfig.check` allows at most one, on hstu only) choose a
variant of it, each keeping its own kind of state.
"""

from __future__ import annotations

from kvrec.models.astro import ASTRO
from kvrec.models.compressive_memory import CompressiveMemoryHSTU
from kvrec.models.hstu import HSTU
from kvrec.models.linear_attention import LinearHSTU
from kvrec.models.recommender import ModelConfig, SequentialRecommender
from kvrec.models.sasrec import SASRec
from kvrec.models.slots import SlotHSTU

MODELS = {"hstu": HSTU, "sasrec": SASRec, "astro": ASTRO}


def model_class(cfg: ModelConfig) -> type[SequentialRecommender]:
    if cfg.kind not in MODELS:
        raise ValueError(f"unknown model kind {cfg.kind!r}; choose one of {sorted(MODELS)}")
    if cfg.kind == "hstu":
        if cfg.recurrent == "linear":
            return LinearHSTU
        if cfg.memory:
            return CompressiveMemoryHSTU
        if cfg.slots:
            return SlotHSTU
    return MODELS[cfg.kind]


def build_model(cfg: ModelConfig) -> SequentialRecommender:
    return model_class(cfg)(cfg)
