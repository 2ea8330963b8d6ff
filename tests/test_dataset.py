"""RefDataset's epoch order: torch's DistributedSampler order by default, a thinned one-attribute share."""

import os
import sys

import pytest
from torch.utils.data import DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_refer import make_refer_fixture  # noqa: E402

from crformer.data.dataset import RefDataset  # noqa: E402
from crformer.data.refer import REFER  # noqa: E402
from crformer.data.synthetic import generate  # noqa: E402
from crformer.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate(root, seed=3, size=64, train_images=60, eval_samples=24)
    return RefDataset(REFER(str(root), "synthetic", "unc"), "train", 64, train=True, seed=5, preload=False)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_full_mix_is_the_distributed_sampler_order(train_set, world):
    # Runs made before data.one_attr_fraction existed keep their exact data order.
    for epoch in (0, 4):
        for rank in range(world):
            sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=5,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            assert train_set.epoch_order(epoch, 1.0, rank, world) == list(sampler)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_thinned_mix_keeps_every_other_item_and_a_fresh_share_of_one_attribute_ones(train_set, world):
    easy = set(train_set.one_attr_items())
    others = set(range(len(train_set))) - easy
    assert len(easy) >= 20 and len(others) >= 20
    kept_easy = []
    for epoch in range(3):
        ranks = [train_set.epoch_order(epoch, 0.25, rank, world) for rank in range(world)]
        assert len({len(r) for r in ranks}) == 1  # equal steps on every rank
        seen = [i for r in ranks for i in r]
        assert len(seen) == len(set(seen)) == train_set.epoch_size(0.25) // world * world
        assert len(train_set.epoch_order(epoch, 0.25)) == train_set.epoch_size(0.25)
        if world == 1:
            assert set(seen) >= others
            kept_easy.append(set(seen) & easy)
            assert len(kept_easy[-1]) == round(0.25 * len(easy))
    if world == 1:
        assert kept_easy[0] != kept_easy[1] != kept_easy[2]  # drawn anew each epoch
        assert train_set.epoch_order(1, 0.25) == train_set.epoch_order(1, 0.25)  # resumable
    assert train_set.epoch_size(0.0) == len(others)


def test_thinning_needs_sentence_kinds(tmp_path):
    fx = make_refer_fixture(str(tmp_path))
    data = RefDataset(REFER(fx["root"], fx["dataset"], "unc"), "train", 32, train=True, preload=False)
    assert data.epoch_order(0, 1.0) and not data.one_attr_items()
    with pytest.raises(UserError, match="one_attr_fraction=0.5 needs one-attribute sentences"):
        data.epoch_order(0, 0.5)


def test_trainer_steps_follow_the_thinned_epoch(tiny):
    from crformer.config import load_config
    from crformer.train import Trainer

    full = Trainer(load_config(None, tiny))
    thin = Trainer(load_config(None, tiny + ["data.one_attr_fraction=0"]))
    assert thin.steps_per_epoch == thin.train_set.epoch_size(0.0) // thin.local_batch < full.steps_per_epoch
    assert thin.total_steps == thin.steps_per_epoch * thin.cfg["train"]["epochs"]
