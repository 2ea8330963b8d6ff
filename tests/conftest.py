"""Shared fixtures: a tiny synthetic dataset and a tiny model config, so CLI tests run in seconds."""

from __future__ import annotations

import os

import pytest

from tests.helpers import TINY_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One cache folder per test session; the tiny synthetic dataset is generated once into it."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny(data_cache, tmp_path):
    """``key=value`` overrides for a tiny model on the tiny synthetic dataset, writing to tmp_path."""
    return TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path / 'run'}"]
