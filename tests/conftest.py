"""Shared fixtures: a tiny synthetic dataset and a tiny model config, so CLI tests run in seconds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = [
    "data.image_size=32", "data.synthetic.size=32", "data.synthetic.train_images=24", "data.synthetic.eval_samples=12",
    "model.backbone.embed_dim=16", "model.backbone.depths=[1,1,1,1]", "model.backbone.num_heads=[1,1,2,2]",
    "model.backbone.window_size=2", "model.backbone.drop_path_rate=0.0",
    "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64", "model.num_queries=4", "model.num_decoder_layers=2",
    "train.batch_size=8", "train.warmup_iters=2", "train.log_every=1", "eval.batch_size=16",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One cache folder per test session; the tiny synthetic dataset is generated once into it."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny(data_cache, tmp_path):
    """``key=value`` overrides for a tiny model on the tiny synthetic dataset, writing to tmp_path."""
    return TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path / 'run'}"]
