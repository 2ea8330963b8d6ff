"""The synthetic generator: REFER layout, balanced hard split, unambiguous sentences, determinism."""

from collections import Counter

import numpy as np
import pytest

from crformer.data.refer import REFER
from crformer.data.synthetic import HARD_KINDS, Obj, describe, ensure_synthetic, generate


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate(root, seed=3, size=64, train_images=30, eval_samples=24)
    return REFER(str(root), "synthetic", "unc")


def test_layout_splits_and_masks(small):
    assert small.splits() == ["test_easy", "test_hard", "train", "val_easy", "val_hard"]
    for split in small.splits():
        for s in small.samples(split)[:10]:
            m = small.mask(s)
            assert m.shape == (64, 64) and m.dtype == bool and m.sum() > 10
            assert s.kind is not None and s.sentence.startswith("the ")


def test_eval_splits_are_balanced_by_kind(small):
    hard = Counter(s.kind for s in small.samples("val_hard"))
    assert set(hard) == set(HARD_KINDS) and set(hard.values()) == {8}
    assert Counter(s.kind for s in small.samples("val_easy")) == {"one-attr": 24}
    train_kinds = Counter(s.kind for s in small.samples("train"))
    assert set(train_kinds) == {"one-attr", *HARD_KINDS}


def test_each_eval_image_has_another_referred_object(small):
    by_image = small.refs_by_image("val_hard")
    with_partner = sum(len(v) >= 2 for v in by_image.values())
    assert with_partner >= len(by_image) - 1  # only the quota's last image may hold a single ref


def _objs():
    return [Obj("square", "red", "small", 10, 10, 4), Obj("square", "blue", "small", 40, 10, 4),
            Obj("circle", "red", "large", 10, 40, 8), Obj("circle", "blue", "small", 40, 40, 4)]


def test_describe_refers_to_exactly_one_object():
    objs, rng = _objs(), np.random.default_rng(0)
    # The red square: neither "red" nor "square" alone is unique, so one-attr is impossible.
    assert describe(objs[0], objs, "one-attr", rng, 2.0) is None
    assert describe(objs[0], objs, "two-attr", rng, 2.0) in ("the red square", "the small red shape")
    # The large circle is unique by one word, so no hard sentence may be made for it.
    assert describe(objs[2], objs, "one-attr", rng, 2.0) in ("the large shape", )
    for kind in HARD_KINDS:
        assert describe(objs[2], objs, kind, rng, 2.0) is None
    sup = describe(objs[0], objs, "superlative", rng, 2.0)
    assert sup in ("the leftmost square", "the topmost red shape", "the leftmost small shape",
                   "the topmost small shape", "the leftmost red shape") or sup is None
    rel = describe(objs[1], objs, "relational", rng, 2.0)
    assert rel is None or rel.split()[1] in ("square", "blue", "small", "shape")


def test_generation_is_deterministic_and_cached(tmp_path):
    a = ensure_synthetic(tmp_path / "c", seed=1, size=32, train_images=6, eval_samples=6)
    b = ensure_synthetic(tmp_path / "c", seed=1, size=32, train_images=6, eval_samples=6)
    assert a == b  # second call reuses the cache
    c = tmp_path / "d"
    generate(c, seed=1, size=32, train_images=6, eval_samples=6)
    ra, rc = REFER(str(a), "synthetic", "unc"), REFER(str(c), "synthetic", "unc")
    assert [s.sentence for s in ra.samples("train")] == [s.sentence for s in rc.samples("train")]
    assert all((ra.mask(x) == rc.mask(y)).all() for x, y in zip(ra.samples("val_hard"), rc.samples("val_hard")))
    assert not list((tmp_path / "c").glob(".synthetic-*"))  # no temp folders left behind
