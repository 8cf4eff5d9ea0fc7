"""Build a model from its config: the one place that maps `ModelConfig.kind` to a class."""

from __future__ import annotations

from kvrec.models.astro import ASTRO
from kvrec.models.hstu import HSTU
from kvrec.models.recommender import ModelConfig, SequentialRecommender
from kvrec.models.sasrec import SASRec

MODELS = {"hstu": HSTU, "sasrec": SASRec, "astro": ASTRO}


def build_model(cfg: ModelConfig) -> SequentialRecommender:
    if cfg.kind not in MODELS:
        raise ValueError(f"unknown model kind {cfg.kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[cfg.kind](cfg)
