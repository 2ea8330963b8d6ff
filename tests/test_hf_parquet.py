"""``data.format: hf-parquet``: the REFER fixture written as both Hugging Face layouts (moondream/refcoco-m,
jxu124/refcoco*) reads back as the same samples, masks and images, evaluates to the same table, and bad
files are one error line naming the file and the row."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_refer import compressed_rle, make_refer_fixture  # noqa: E402

from crformer import evaluate  # noqa: E402
from crformer.config import load_config  # noqa: E402
from crformer.data import open_refer  # noqa: E402
from crformer.data.dataset import load_sample_image  # noqa: E402
from crformer.data.hf_parquet import HFParquet, load_embedded_image  # noqa: E402
from crformer.data.refer import REFER, write_refer  # noqa: E402
from crformer.errors import UserError  # noqa: E402
from crformer.process import run  # noqa: E402
from tests.helpers import mixed_mask_checkpoint  # noqa: E402

#: REFER split → the file name a release uses for it: validation for val; jxu124/refcoco also names testA
#: "test" (its rows keep testA in their split column, which RefCOCO-M files do not have).
REFCOCO_M_FILE_SPLIT = {"val": "validation"}
JXU124_FILE_SPLIT = {"val": "validation", "testA": "test"}


def _write(rows: list, path: Path, row_group_size: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def _by_id(fx) -> tuple:
    inst = fx["instances"]
    return ({im["id"]: im for im in inst["images"]}, {a["id"]: a for a in inst["annotations"]},
            {c["id"]: c for c in inst["categories"]})


def write_refcoco_m(fx, out: Path, split_by: str = "unc", refs=None) -> Path:
    """The fixture's refs as moondream/refcoco-m files: one row per image with the image embedded, one
    sample per object with its sentences and its mask as compressed RLE (polygons rasterised)."""
    images, anns, cats = _by_id(fx)
    per_split: dict = {}
    for r in sorted(refs or fx["refs"][split_by], key=lambda r: r["ref_id"]):
        per_split.setdefault(r["split"], {}).setdefault(r["image_id"], []).append(r)
    for split, per_image in per_split.items():
        rows = []
        for iid in sorted(per_image):
            samples = [{"id": r["ann_id"], "image_id": iid, "category": cats[anns[r["ann_id"]]["category_id"]]["name"],
                        "supercategory": "shape", "label": cats[anns[r["ann_id"]]["category_id"]]["name"],
                        "sentences": [s["sent"] or s["raw"] for s in r["sentences"]],
                        "bbox": anns[r["ann_id"]]["bbox"], "mask": compressed_rle(fx["masks"][r["ann_id"]])}
                       for r in per_image[iid]]
            rows.append({"image": {"bytes": Path(fx["image_paths"][iid]).read_bytes(),
                                   "path": images[iid]["file_name"]},
                         "image_id": iid, "file_name": images[iid]["file_name"], "samples": samples})
        _write(rows, out / "data" / f"{REFCOCO_M_FILE_SPLIT.get(split, split)}-00000-of-00001.parquet")
    return out


def write_jxu124(fx, out: Path, split_by: str = "unc", prefix: str = "coco/train2014/",
                 plain_sentences: bool = False) -> Path:
    """The fixture's refs as jxu124/refcoco files: one row per ref, the COCO annotation and image as JSON,
    image paths with the release's ``coco/train2014/`` prefix."""
    images, anns, _ = _by_id(fx)
    per_split: dict = {}
    for r in fx["refs"][split_by]:
        sentences = [s["sent"] or s["raw"] for s in r["sentences"]] if plain_sentences else [
            {"raw": s["raw"], "sent": s["sent"], "sent_id": s["sent_id"], "tokens": s["tokens"], "kind": s.get("kind")}
            for s in r["sentences"]]
        im = images[r["image_id"]]
        per_split.setdefault(r["split"], []).append({
            "sent_ids": r["sent_ids"], "file_name": r["file_name"], "ann_id": r["ann_id"], "ref_id": r["ref_id"],
            "image_id": r["image_id"], "split": r["split"], "sentences": sentences, "category_id": r["category_id"],
            "raw_anns": json.dumps(anns[r["ann_id"]]), "raw_image_info": json.dumps(im),
            "raw_sentences": json.dumps(r["sentences"]), "image_path": prefix + im["file_name"],
            "bbox": anns[r["ann_id"]]["bbox"], "captions": [s["raw"] for s in r["sentences"]],
            "global_image_id": f"coco.{r['image_id']}", "anns_id": str(r["ann_id"])})
    for split, rows in per_split.items():
        _write(rows, out / "data" / f"{JXU124_FILE_SPLIT.get(split, split)}-00000-of-00001.parquet")
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_refer_fixture(str(tmp_path_factory.mktemp("refer")))


# ---------------------------------------------------------------------------------------------- same samples


@pytest.mark.parametrize("split_by", ["unc", "umd"])
def test_refcoco_m_gives_the_refer_samples_masks_and_images(fx, tmp_path, split_by):
    refer = REFER(fx["root"], "refcoco", split_by)
    hf = HFParquet(str(write_refcoco_m(fx, tmp_path / "refcoco-m", split_by)))
    assert hf.layout == "refcoco-m" and hf.splits() == refer.splits()
    for split in refer.splits():
        want, got = refer.samples(split), hf.samples(split)
        assert len(got) == len(want) > 0
        for w, g in zip(want, got):
            for field in ("sentence", "ann_id", "image_id", "split", "height", "width"):
                assert getattr(g, field) == getattr(w, field), (split, field)
            # what this layout does not carry: ref and sentence ids, tokens, kinds, category ids
            assert (g.ref_id, g.sent_id, g.raw, g.tokens, g.kind, g.category_id) == (
                w.ann_id, -1, w.sentence, (), None, None)
            assert g.image_path.endswith(f"{REFCOCO_M_FILE_SPLIT.get(split, split)}-00000-of-00001.parquet")
            assert g.extra["category"] in {"square", "circle", "star"}
            np.testing.assert_array_equal(hf.mask(g), refer.mask(w))
            np.testing.assert_array_equal(np.asarray(load_sample_image(g)), np.asarray(load_sample_image(w)))


@pytest.mark.parametrize("split_by", ["unc", "umd", "google"])
def test_jxu124_gives_the_refer_samples_and_masks(fx, tmp_path, split_by):
    refer = REFER(fx["root"], "refcoco", split_by)
    hf = HFParquet(str(write_jxu124(fx, tmp_path / "refcoco", split_by)), image_dir=fx["image_dir"])
    assert hf.layout == "jxu124" and hf.splits() == refer.splits()  # testA from the file named test
    for split in refer.splits():
        want, got = refer.samples(split), hf.samples(split)
        assert got == want  # every field, image paths included (the coco/train2014/ prefix resolved)
        assert all(g.extra == {} for g in got)  # the release's bookkeeping columns stay out
        for w, g in zip(want, got):
            np.testing.assert_array_equal(hf.mask(g), refer.mask(w))


def test_jxu124_variants_plain_sentences_and_bare_image_paths(fx, tmp_path):
    root = write_jxu124(fx, tmp_path / "plain", "umd", prefix="", plain_sentences=True)
    hf = HFParquet(str(root), image_dir=fx["image_dir"])
    refer = REFER(fx["root"], "refcoco", "umd")
    got, want = hf.samples("val"), refer.samples("val")
    assert [(g.sentence, g.sent_id, g.image_path) for g in got] == [(w.sentence, w.sent_id, w.image_path) for w in want]
    # no split column: the file names give the splits
    table = pq.read_table(root / "data" / "validation-00000-of-00001.parquet").drop_columns(["split"])
    pq.write_table(table, root / "data" / "validation-00000-of-00001.parquet")
    assert HFParquet(str(root), image_dir=fx["image_dir"]).splits() == ["test", "val"]


def test_embedded_images_across_row_groups(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8) for i in range(5)]
    cells = []
    for a in arrays:
        Image.fromarray(a).save(tmp_path / "x.png")
        cells.append({"image": {"bytes": (tmp_path / "x.png").read_bytes(), "path": None}})
    _write(cells, tmp_path / "images.parquet", row_group_size=2)
    for row in (4, 0, 3, 2, 1):
        np.testing.assert_array_equal(np.asarray(load_embedded_image(str(tmp_path / "images.parquet"), row)),
                                      arrays[row])


def test_open_refer_reads_data_format(fx, tmp_path):
    root = write_jxu124(fx, tmp_path / "refcoco")
    cfg = load_config(None, ["data.format=hf-parquet", f"data.root={root}", f"data.image_dir={fx['image_dir']}"])
    assert isinstance(open_refer(cfg), HFParquet)
    with pytest.raises(UserError, match="data.format must be one of refer, hf-parquet"):
        load_config(None, ["data.format=parquet"])
    with pytest.raises(UserError, match="data.root is required with data.format=hf-parquet"):
        open_refer(load_config(None, ["data.format=hf-parquet"]))
    with pytest.raises(UserError, match="split 'testC' is not in"):
        open_refer(cfg).check_splits(["val", "testC"])


# ---------------------------------------------------------------------------------------------- bad input


def _rewrite(path: Path, column: str, row: int, change) -> None:
    """Replace ``column`` of ``row`` in the parquet file ``path`` by ``change(old value)``."""
    rows = pq.read_table(path).to_pylist()
    rows[row][column] = change(rows[row][column])
    _write(rows, path)


def _refcoco_m_mask_size(samples):
    samples[0]["mask"] = dict(samples[0]["mask"], size=[31, 40])
    return samples


def _truncated_jpeg(image):
    """A 40×30 JPEG cut short: its header (and size) reads, its pixels do not decode."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(out, "JPEG")
    return dict(image, bytes=out.getvalue()[:len(out.getvalue()) * 3 // 4])


BAD_FILES = [  # (layout, split file, row, column, change, text the line must hold besides file and row)
    ("refcoco-m", "train", 0, "samples", _refcoco_m_mask_size, "mask is 31×40 (H×W) but the image is 30×40"),
    ("refcoco-m", "train", 0, "image", lambda im: dict(im, bytes=b"not an image"), "cannot read image"),
    ("refcoco-m", "train", 0, "image", lambda im: dict(im, bytes=None), "no embedded image bytes"),
    ("refcoco-m", "train", 0, "samples", lambda s: [dict(s[0], sentences=None)], "'sentences' must be a list"),
    ("refcoco-m", "train", 0, "image_id", lambda v: None, "'image_id' must be an integer"),
    ("jxu124", "train", 1, "raw_anns", lambda v: v[:-2], "'raw_anns' is not valid JSON"),
    ("jxu124", "train", 1, "raw_image_info", lambda v: json.dumps({"id": 1}), "raw_image_info has no height"),
    ("jxu124", "train", 2, "ann_id", lambda v: None, "'ann_id' must be an integer"),
    ("jxu124", "train", 2, "ann_id", lambda v: 12, "raw_anns is annotation 13, but the row's ann_id is 12"),
    ("jxu124", "train", 1, "ref_id", lambda v: 3, "ref 3 is also in"),
    ("jxu124", "train", 0, "raw_anns", lambda v: json.dumps({**json.loads(v), "id": "x"}), "malformed value"),
    ("jxu124", "train", 0, "image_path", lambda v: "../../etc/" + v, "must be a relative path inside"),
    ("jxu124", "validation", 0, "raw_anns", lambda v: json.dumps({**json.loads(v), "segmentation":
                                                                   {"size": [5, 4], "counts": [20]}}),
     "the mask of annotation 21 is 5×4 (H×W) but the image is 24×36"),
]


@pytest.mark.parametrize("layout,split,row,column,change,needle", BAD_FILES,
                         ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD_FILES)])
def test_bad_files_are_one_line_naming_file_and_row(fx, tmp_path, layout, split, row, column, change, needle):
    root = (write_refcoco_m if layout == "refcoco-m" else write_jxu124)(fx, tmp_path / layout)
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    _rewrite(path, column, row, change)
    with pytest.raises(UserError) as e:
        HFParquet(str(root), image_dir=fx["image_dir"])
    msg = str(e.value)
    assert "\n" not in msg and f"{path} row {row}" in msg and needle in msg, msg


def test_bad_folders_and_columns_name_the_file(fx, tmp_path):
    with pytest.raises(UserError, match="not found"):
        HFParquet(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no parquet files in .*empty/data"):
        HFParquet(str(tmp_path / "empty"))
    _write([{"question": "q", "answer": "a"}], tmp_path / "other" / "data" / "val-0.parquet")
    with pytest.raises(UserError, match=r"other/data/val-0.parquet: unknown layout \(columns: question, answer\)"):
        HFParquet(str(tmp_path / "other"))
    root = write_jxu124(fx, tmp_path / "nopath")
    path = root / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["image_path"]), path)
    with pytest.raises(UserError, match=f"{path}: no column 'image_path'"):
        HFParquet(str(root), image_dir=fx["image_dir"])
    with pytest.raises(UserError, match="set data.image_dir"):
        HFParquet(str(write_jxu124(fx, tmp_path / "noimages")))
    mixed = write_jxu124(fx, tmp_path / "mixed")
    shutil.copy(write_refcoco_m(fx, tmp_path / "m") / "data" / "testB-00000-of-00001.parquet",
                mixed / "data" / "testB-00000-of-00001.parquet")
    with pytest.raises(UserError, match="one dataset folder holds one release"):
        HFParquet(str(mixed), image_dir=fx["image_dir"])
    (tmp_path / "junk" / "data").mkdir(parents=True)
    (tmp_path / "junk" / "data" / "val-0.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="cannot read parquet file .*val-0.parquet"):
        HFParquet(str(tmp_path / "junk"))


def test_an_image_that_fails_to_decode_past_its_header_names_file_and_row(fx, tmp_path):
    root = write_refcoco_m(fx, tmp_path / "m")
    path = root / "data" / "train-00000-of-00001.parquet"
    _rewrite(path, "image", 0, _truncated_jpeg)
    sample = HFParquet(str(root)).samples("train")[0]  # the header gives the size: reading works
    with pytest.raises(UserError, match=f"cannot read image {path} row 0"):
        load_sample_image(sample)


# ---------------------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    return mixed_mask_checkpoint(tmp_path_factory.mktemp("hf_ckpt"), data_cache)


def _table(capsys, checkpoint, tmp_path, *overrides) -> list:
    run(evaluate.main, ["--checkpoint", str(checkpoint), "--split", "val", "--language-check", "--device", "cpu",
                        "--out", str(tmp_path / "e.json"), "data.dataset=refcoco", "data.split_by=unc", *overrides])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("val ") for line in lines), lines
    return [line for line in lines if not line.startswith("wrote ")]


def test_evaluate_gives_the_same_table_in_either_format(fx, tmp_path, checkpoint, capsys):
    refer_table = _table(capsys, checkpoint, tmp_path, f"data.root={fx['root']}")
    assert float(next(line for line in refer_table if line.startswith("val ")).split()[1]) > 0  # oIoU: masks overlap
    jxu = write_jxu124(fx, tmp_path / "refcoco")
    assert _table(capsys, checkpoint, tmp_path, "data.format=hf-parquet", f"data.root={jxu}",
                  f"data.image_dir={fx['image_dir']}") == refer_table
    # RefCOCO-M carries no sentence kinds: compare with the same refs, kinds left out, in REFER layout
    plain_refs = [{**r, "sentences": [{k: v for k, v in s.items() if k != "kind"} for s in r["sentences"]]}
                  for r in fx["refs"]["unc"]]
    write_refer(str(tmp_path / "plain"), "refcoco", "unc", plain_refs, fx["instances"])
    plain_table = _table(capsys, checkpoint, tmp_path, f"data.root={tmp_path / 'plain'}",
                         f"data.image_dir={fx['image_dir']}")
    m = write_refcoco_m(fx, tmp_path / "refcoco-m", refs=plain_refs)
    assert _table(capsys, checkpoint, tmp_path, "data.format=hf-parquet", f"data.root={m}") == plain_table
    assert plain_table != refer_table  # the kinds' rows are what differs


def test_check_images_names_the_file_and_the_row_that_gives_its_size(fx, tmp_path):
    images = tmp_path / "train2014"
    shutil.copytree(fx["image_dir"], images)
    Image.new("RGB", (41, 30)).save(images / "COCO_train2014_000000000001.png")
    root = write_jxu124(fx, tmp_path / "refcoco")
    hf = HFParquet(str(root), image_dir=str(images))
    hf.check_images(["val"])
    with pytest.raises(UserError, match=f"COCO_train2014_000000000001.png is 41×30 .* but {root}/data/"
                                        "train-00000-of-00001.parquet row 0 says 40×30"):
        hf.check_images(["val", "train"])
