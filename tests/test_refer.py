import os
import pickle
import pickletools
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_refer import make_refer_fixture  # noqa: E402

from crformer.data.refer import REFER, RefSample, load_refs_pickle, write_refer  # noqa: E402
from crformer.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_refer_fixture(str(tmp_path_factory.mktemp("refer")))


SPLITS = {"unc": ["testA", "testB", "train", "val"], "umd": ["test", "val"], "google": ["train", "val"]}


def test_fixture_pickle_is_python2_style(fx):
    # the refs file really uses Python-2 str opcodes, so the latin1/bytes path is exercised
    with open(fx["refs_paths"]["unc"], "rb") as f:
        ops = {op.name for op, _, _ in pickletools.genops(f.read())}
    assert "SHORT_BINSTRING" in ops and "BINUNICODE" in ops
    with open(fx["refs_paths"]["unc"], "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert any(isinstance(k, bytes) for k in raw[0])


@pytest.mark.parametrize("split_by", ["unc", "umd", "google"])
def test_splits_and_samples(fx, split_by):
    r = REFER(fx["root"], fx["dataset"], split_by)
    assert r.splits() == SPLITS[split_by]
    total = 0
    for split in r.splits():
        got = r.samples(split)
        exp = fx["samples"][split_by][split]
        assert len(got) == len(exp) > 0
        for s, e in zip(got, exp):
            assert isinstance(s, RefSample)
            for k, v in e.items():
                assert getattr(s, k) == v, (split_by, split, k)
            assert isinstance(s.sentence, str) and isinstance(s.split, str)
        total += len(got)
    n_sent = sum(len(ref["sentences"]) for ref in fx["refs"][split_by])
    assert total == n_sent


def test_sample_order_and_fields(fx):
    r = REFER(fx["root"], fx["dataset"], "unc")
    train = r.samples("train")
    # on disk the refs are in reverse order; samples are by ref_id then sentence order
    assert [(s.ref_id, s.sent_id) for s in train] == [(1, 101), (1, 102), (2, 201), (2, 202),
                                                      (2, 203), (3, 301)]
    assert train[0].kind == "one-attr" and train[1].kind is None
    assert train[3].sentence == "Raw only sentence"  # empty 'sent' falls back to 'raw'
    assert train[4].sentence == fx["cafe_sentence"]  # UTF-8 Python-2 str decoded, no mojibake
    assert "\u00c3" not in train[4].sentence
    assert train[5].kind == "relational"
    assert train[5].extra == {"foo": "bar", "target_kind": "star"}
    assert train[0].tokens == ("two", "red", "squares")
    assert train[0].height == 30 and train[0].width == 40
    assert os.path.isfile(train[0].image_path)
    assert train[0].image_path.startswith(os.path.join(fx["root"], "images", "mscoco", "images",
                                                       "train2014"))
    # frozen
    with pytest.raises(Exception):
        train[0].sentence = "x"
    # deterministic across instances
    assert REFER(fx["root"], fx["dataset"], "unc").samples("train") == train


@pytest.mark.parametrize("split_by", ["unc", "umd", "google"])
def test_masks_match_expected(fx, split_by):
    r = REFER(fx["root"], fx["dataset"], split_by)
    seen = set()
    for split in r.splits():
        for s in r.samples(split):
            m = r.mask(s)
            exp = fx["masks"][s.ann_id]
            assert m.dtype == np.bool_
            assert m.shape == (s.height, s.width)
            assert np.array_equal(m, exp), (split_by, s.ann_id)
            seen.add(s.ann_id)
    assert seen  # something was checked


def test_mask_kinds_cover_all_formats(fx):
    r = REFER(fx["root"], fx["dataset"], "unc")
    segs = {aid: a["segmentation"] for aid, a in r.anns.items()}
    assert len(segs[11]) == 2  # multi-part polygon
    assert isinstance(segs[21], dict) and isinstance(segs[21]["counts"], str)  # compressed RLE
    assert isinstance(segs[22], dict) and isinstance(segs[22]["counts"], list)  # uncompressed RLE
    # union of parts, not xor: overlapping rectangles of ann 12 give the union area
    assert r.mask(12).sum() == 6 * 4 + 7 * 4 - 3 * 2
    # multi-part polygon: both rectangles, exact raster of integer-corner rectangles
    m11 = r.mask(11)
    assert m11.sum() == 8 * 6 + 10 * 10
    assert m11[3:9, 2:10].all() and m11[15:25, 20:30].all()
    assert not m11[9, 2] and not m11[3, 10]
    # mask by annotation dict works too; ann_id lookups of unknown ids fail cleanly
    assert np.array_equal(r.mask(r.anns[22]), fx["masks"][22])
    with pytest.raises(UserError, match="annotation 9999"):
        r.mask(9999)


def test_refs_by_image(fx):
    for split_by in ("unc", "umd", "google"):
        r = REFER(fx["root"], fx["dataset"], split_by)
        assert r.refs_by_image() == fx["refs_by_image"][split_by]
    r = REFER(fx["root"], fx["dataset"], "unc")
    rbi = r.refs_by_image()
    assert rbi[1] == [11, 12, 13]
    assert 23 not in rbi[2]  # never referred
    assert r.refs_by_image("val") == {2: [21, 22]}


def test_errors_name_the_path(fx, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="nope"):
        REFER(missing, "refcoco", "unc")
    with pytest.raises(UserError) as ei:
        REFER(fx["root"], "refcocoz", "unc")
    assert os.path.join(fx["root"], "refcocoz") in str(ei.value)
    with pytest.raises(UserError) as ei:
        REFER(fx["root"], fx["dataset"], "berkeley")
    msg = str(ei.value)
    assert "refs(berkeley).p" in msg and fx["data_dir"] in msg
    assert "refs(unc).p" in msg and "refs(umd).p" in msg and "refs(google).p" in msg
    r = REFER(fx["root"], fx["dataset"], "unc")
    with pytest.raises(UserError) as ei:
        r.samples("testC")
    assert "testC" in str(ei.value) and "testA" in str(ei.value) and "val" in str(ei.value)


def test_missing_instances_and_corrupt_files(fx, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(fx["root"], root)
    inst = os.path.join(root, fx["dataset"], "instances.json")
    os.remove(inst)
    with pytest.raises(UserError) as ei:
        REFER(root, fx["dataset"], "unc")
    assert inst in str(ei.value)
    with open(inst, "w") as f:
        f.write("{not json")
    with pytest.raises(UserError) as ei:
        REFER(root, fx["dataset"], "unc")
    assert inst in str(ei.value)
    shutil.copy(fx["instances_path"], inst)
    refs = os.path.join(root, fx["dataset"], "refs(unc).p")
    with open(refs, "wb") as f:
        f.write(b"\x80\x02garbage")
    with pytest.raises(UserError) as ei:
        REFER(root, fx["dataset"], "unc")
    assert refs in str(ei.value)


def test_ref_pointing_to_missing_annotation(tmp_path, fx):
    inst = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
            "annotations": [], "categories": []}
    refs = [{"ref_id": 1, "ann_id": 5, "image_id": 1, "split": "train",
             "sentences": [{"sent_id": 1, "raw": "x", "sent": "x", "tokens": ["x"]}]}]
    write_refer(str(tmp_path), "bad", "unc", refs, inst)
    with pytest.raises(UserError, match="annotation 5"):
        REFER(str(tmp_path), "bad", "unc")


def test_write_refer_roundtrip_and_default_image_dir(tmp_path, fx):
    root = str(tmp_path / "syn")
    paths = write_refer(root, "synthetic", "unc", fx["refs"]["unc"], fx["instances"])
    assert os.path.isfile(paths["refs"]) and os.path.isfile(paths["instances"])
    with open(paths["refs"], "rb") as f:
        assert f.read(2) == b"\x80\x02"  # protocol 2
    assert load_refs_pickle(paths["refs"]) == fx["refs"]["unc"]
    r = REFER(root, "synthetic", "unc")
    assert r.image_dir == os.path.join(root, "images", "synthetic")
    s = r.samples("val")
    assert [x.sent_id for x in s] == [401, 402, 501]
    assert s[0].image_path == os.path.join(root, "images", "synthetic",
                                           "COCO_train2014_000000000002.png")
    assert np.array_equal(r.mask(s[0]), fx["masks"][21])
    assert np.array_equal(r.mask(s[2]), fx["masks"][22])
    r2 = REFER(root, "synthetic", "unc", image_dir=str(tmp_path / "imgs"))
    assert r2.samples("val")[0].image_path == str(tmp_path / "imgs" / "COCO_train2014_000000000002.png")


def test_non_coco_fixture_dataset(tmp_path):
    fx2 = make_refer_fixture(str(tmp_path), dataset="synthetic")
    r = REFER(fx2["root"], "synthetic", "unc")
    s = r.samples("testB")
    assert os.path.isfile(s[0].image_path)
    assert s[0].image_path.startswith(os.path.join(fx2["root"], "images", "synthetic"))
    assert np.array_equal(r.mask(s[0]), fx2["masks"][41])


def test_bad_rle_size(tmp_path):
    inst = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 5}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "area": 1.0, "bbox": [0, 0, 1, 1],
                             "segmentation": {"size": [5, 4], "counts": [20]}}],
            "categories": []}
    refs = [{"ref_id": 1, "ann_id": 7, "image_id": 1, "split": "train",
             "sentences": [{"sent_id": 1, "raw": "x", "sent": "x", "tokens": ["x"]}]}]
    write_refer(str(tmp_path), "bad", "unc", refs, inst)
    with pytest.raises(UserError, match="annotation 7.*RLE size"):  # when the data is opened, not at step N
        REFER(str(tmp_path), "bad", "unc")


def test_short_polygon_parts_are_dropped_with_one_warning():
    import warnings

    from crformer.data.refer import SHORT_POLYGON_WARNING, check_segmentation

    square = [1.0, 1.0, 9.0, 1.0, 9.0, 9.0, 1.0, 9.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert check_segmentation([square, [2.0, 2.0, 5.0, 5.0]], 20, 20) == [square]
        assert check_segmentation([[2.0, 2.0, 5.0, 5.0]], 20, 20) is None
        assert check_segmentation([square], 20, 20) == [square]
    assert [str(w.message) for w in caught] == [SHORT_POLYGON_WARNING]
