"""Shared fixtures: a tiny synthetic dataset and a tiny model config, so CLI tests run in seconds."""

from __future__ import annotations

import os

import pytest

from tests.helpers import TINY_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def home(tmp_path_factory):
    """A home folder of the session's own: nothing a test runs writes into the user's. Evaluate and
    predict generate a checkpoint's synthetic data in the default data.cache_dir (~/.cache/crformer),
    never in the folder the checkpoint names."""
    previous = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    yield os.environ["HOME"]
    if previous is None:
        del os.environ["HOME"]
    else:
        os.environ["HOME"] = previous


@pytest.fixture(scope="session")
def data_cache(home):
    """One cache folder per test session, the default data.cache_dir of its home: the tiny synthetic
    dataset is generated once into it."""
    return os.path.join(home, ".cache", "crformer")


@pytest.fixture
def tiny(data_cache, tmp_path):
    """``key=value`` overrides for a tiny model on the tiny synthetic dataset, writing to tmp_path."""
    return TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def near_random_checkpoint(tmp_path_factory, data_cache):
    """A tiny model after one training step at a learning rate too small to move it: its masks are as
    varied as an untrained model's (15-40 % of an image, different for each sentence), so two masks
    that agree are a real check; a few steps at the usual rate already give empty masks everywhere."""
    from crformer import train
    from crformer.process import run

    out = tmp_path_factory.mktemp("near_random")
    run(train.main, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={out}", "train.max_steps=1",
                                  "train.lr=1e-7"])
    return out / "last.pt"
