"""Tiny REFER-format dataset with known masks, for tests.

``make_refer_fixture(root, dataset="refcoco")`` writes

* ``root/<dataset>/instances.json`` — 4 images, 9 annotations: multi-part polygons (integer-corner
  rectangles, whose pycocotools raster is exactly ``m[y0:y1, x0:x1]``), a triangle, a degenerate
  2-point polygon part (must be ignored), compressed RLE (``counts`` str) and uncompressed RLE
  (``counts`` list, encoded here by hand, column-major);
* ``root/<dataset>/refs(unc).p`` (train/val/testA/testB), ``refs(umd).p`` (val/test) and
  ``refs(google).p`` (train/val) — written as a **Python-2-style** protocol-2 pickle: Python-2 ``str``
  values appear as ``SHORT_BINSTRING``/``BINSTRING`` opcodes (so Python 3 sees them as bytes/latin-1),
  including a UTF-8 encoded non-ASCII sentence; a few values are ``unicode`` (``BINUNICODE``);
* PNG images in the dataset's default image folder.

It returns a dict with everything a test needs to check the reader (see the end of the function).
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from typing import Any, Dict, List

import numpy as np
from PIL import Image

COCO_DATASETS = ("refcoco", "refcoco+", "refcocog")


# ---------------------------------------------------------------------------------------------
# Python-2 style pickling


class Py2Str(bytes):
    """Marks a byte string that Python 2 would have pickled as a ``str`` (BINSTRING opcode)."""


class _Py2Pickler(pickle._Pickler):  # pure-Python pickler: its dispatch table is extensible
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: Py2Str) -> None:
        data = bytes(obj)
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def _py2ify(obj: Any, keep_unicode: frozenset = frozenset()) -> Any:
    """str -> Py2Str (UTF-8 bytes), recursively; dict keys too.  Strings in ``keep_unicode`` stay
    ``str`` (pickled as Python-2 ``unicode``)."""
    if isinstance(obj, str):
        return obj if obj in keep_unicode else Py2Str(obj.encode("utf-8"))
    if isinstance(obj, dict):
        return {_py2ify(k, keep_unicode): _py2ify(v, keep_unicode) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2ify(v, keep_unicode) for v in obj]
    return obj


def dump_py2_pickle(obj: Any, path: str, keep_unicode: frozenset = frozenset()) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2ify(obj, keep_unicode))


# ---------------------------------------------------------------------------------------------
# masks


def rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rect_poly(x0: int, y0: int, x1: int, y1: int) -> List[float]:
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def uncompressed_rle(m: np.ndarray) -> Dict[str, Any]:
    """COCO uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = np.asarray(m, dtype=bool).flatten(order="F")
    counts: List[int] = []
    cur, run = False, 0
    for v in flat:
        if bool(v) == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = bool(v), 1
    counts.append(run)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def compressed_rle(m: np.ndarray) -> Dict[str, Any]:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ---------------------------------------------------------------------------------------------


def make_refer_fixture(root: str, dataset: str = "refcoco") -> Dict[str, Any]:
    from pycocotools import mask as mask_utils

    root = os.fspath(root)
    data_dir = os.path.join(root, dataset)
    if dataset in COCO_DATASETS:
        image_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
    else:
        image_dir = os.path.join(root, "images", dataset)
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)

    # image_id -> (file_name, H, W); H != W to catch transposes
    images = {
        1: ("COCO_train2014_000000000001.png", 30, 40),
        2: ("COCO_train2014_000000000002.png", 24, 36),
        3: ("COCO_train2014_000000000003.png", 32, 32),
        4: ("COCO_train2014_000000000004.png", 20, 50),
    }
    rng = np.random.default_rng(0)
    image_paths = {}
    for iid, (fn, h, w) in images.items():
        p = os.path.join(image_dir, fn)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(p)
        image_paths[iid] = p

    masks: Dict[int, np.ndarray] = {}
    anns: List[Dict[str, Any]] = []

    def add(aid: int, iid: int, seg: Any, m: np.ndarray, cat: int) -> None:
        masks[aid] = m
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1)] if len(xs) else [0.0, 0.0, 0.0, 0.0]
        anns.append({"id": aid, "image_id": iid, "segmentation": seg, "area": float(m.sum()),
                     "bbox": bbox, "iscrowd": 0, "category_id": cat})

    H, W = 30, 40
    # 11: two-part polygon (union of two disjoint rectangles)
    add(11, 1, [rect_poly(2, 3, 10, 9), rect_poly(20, 15, 30, 25)],
        rect(H, W, 2, 3, 10, 9) | rect(H, W, 20, 15, 30, 25), 1)
    # 12: degenerate 2-point part FIRST (ignored; pycocotools would read a leading 4-number part as a
    # box) + two overlapping rectangles (union, not xor)
    add(12, 1, [[0.0, 0.0, 1.0, 1.0], rect_poly(12, 2, 18, 6), rect_poly(15, 4, 22, 8)],
        rect(H, W, 12, 2, 18, 6) | rect(H, W, 15, 4, 22, 8), 2)
    # 13: triangle; expected raster from pycocotools on that single part (independent of merge)
    tri = [5.0, 28.0, 15.0, 12.0, 25.0, 28.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs NumPy 2
        tri_mask = mask_utils.decode(mask_utils.frPyObjects([tri], H, W))[:, :, 0] > 0
    add(13, 1, [tri], tri_mask, 3)

    H, W = 24, 36
    m21 = _disc(H, W, 10.0, 12.0, 6.5)
    add(21, 2, compressed_rle(m21), m21, 1)
    m22 = rect(H, W, 20, 2, 34, 6) | rect(H, W, 30, 2, 34, 20)  # L shape
    add(22, 2, uncompressed_rle(m22), m22, 2)
    add(23, 2, [rect_poly(0, 20, 5, 24)], rect(H, W, 0, 20, 5, 24), 3)  # never referred

    H, W = 32, 32
    add(31, 3, [rect_poly(0, 0, 32, 10)], rect(H, W, 0, 0, 32, 10), 1)
    m32 = _disc(H, W, 22.0, 20.0, 7.0) & ~rect(H, W, 0, 0, 32, 20)
    add(32, 3, compressed_rle(m32), m32, 2)

    H, W = 20, 50
    add(41, 4, [rect_poly(1, 1, 5, 5), rect_poly(10, 1, 14, 5), rect_poly(40, 10, 50, 20)],
        rect(H, W, 1, 1, 5, 5) | rect(H, W, 10, 1, 14, 5) | rect(H, W, 40, 10, 50, 20), 3)

    instances = {
        "info": {"description": "crformer test fixture"},
        "images": [{"id": iid, "file_name": fn, "height": h, "width": w}
                   for iid, (fn, h, w) in images.items()],
        "annotations": anns,
        "categories": [{"id": 1, "name": "square", "supercategory": "shape"},
                       {"id": 2, "name": "circle", "supercategory": "shape"},
                       {"id": 3, "name": "star", "supercategory": "shape"}],
    }
    import json

    with open(os.path.join(data_dir, "instances.json"), "w", encoding="utf-8") as f:
        json.dump(instances, f)

    ann_image = {a["id"]: a["image_id"] for a in anns}
    ann_cat = {a["id"]: a["category_id"] for a in anns}

    # sentences: (sent text, raw text, kind or None, extra keys)
    def sent(sid: int, text: str, raw: str | None = None, kind: str | None = None,
             **extra: Any) -> Dict[str, Any]:
        d = {"sent_id": sid, "raw": raw if raw is not None else text.capitalize(), "sent": text,
             "tokens": text.split()}
        if kind is not None:
            d["kind"] = kind
        d.update(extra)
        return d

    def ref(rid: int, aid: int, split: str, sents: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
        iid = ann_image[aid]
        r = {"ref_id": rid, "ann_id": aid, "image_id": iid, "split": split,
             "category_id": ann_cat[aid],
             "file_name": images[iid][0].replace(".png", f"_{aid}.png"),  # REFER style, not on disk
             "sent_ids": [s["sent_id"] for s in sents], "sentences": sents}
        r.update(extra)
        return r

    s_cafe = "the chair in front of the caf\u00e9"
    unc_refs = [
        ref(1, 11, "train", [sent(101, "two red squares", kind="one-attr"),
                             sent(102, "the split object")]),
        ref(2, 12, "train", [sent(201, "the blue bar"),
                             sent(202, "", raw="Raw only sentence"),  # empty 'sent' -> raw
                             sent(203, s_cafe, raw=s_cafe)]),
        ref(3, 13, "train", [sent(301, "the triangle below the bar", kind="relational",
                                  foo="bar")], target_kind="star"),
        ref(4, 21, "val", [sent(401, "the disc", kind="one-attr"),
                           sent(402, "round thing on the left", kind="two-attr")]),
        ref(5, 22, "val", [sent(501, "the l shape", kind="superlative")]),
        ref(6, 31, "testA", [sent(601, "top band"), sent(602, "the wide bar at the top")]),
        ref(7, 32, "testA", [sent(701, "half disc")]),
        ref(8, 41, "testB", [sent(801, "the three boxes"), sent(802, "all the squares")]),
    ]
    umd_refs = [
        ref(10, 11, "val", [sent(1001, "two red squares")]),
        ref(11, 21, "val", [sent(1101, "the disc"), sent(1102, "a round thing")]),
        ref(12, 31, "test", [sent(1201, "top band")]),
        ref(13, 41, "test", [sent(1301, "the boxes")]),
    ]
    google_refs = [
        ref(20, 12, "train", [sent(2001, "the blue bar")]),
        ref(21, 22, "train", [sent(2101, "the l shape")]),
        ref(22, 32, "val", [sent(2201, "half disc"), sent(2202, "lower half of a circle")]),
    ]
    all_refs = {"unc": unc_refs, "umd": umd_refs, "google": google_refs}
    # a few values stay Python-2 unicode (BINUNICODE); everything else is a Python-2 str (bytes)
    keep_unicode = frozenset({"the disc", "round thing on the left"})
    refs_paths = {}
    for split_by, refs in all_refs.items():
        p = os.path.join(data_dir, f"refs({split_by}).p")
        dump_py2_pickle(list(reversed(refs)), p, keep_unicode)  # unsorted on disk on purpose
        refs_paths[split_by] = p

    # expected samples: split_by -> split -> list of dicts, in (ref_id, sentence order)
    expected: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    refs_by_image: Dict[str, Dict[int, List[int]]] = {}
    for split_by, refs in all_refs.items():
        per: Dict[str, List[Dict[str, Any]]] = {}
        rbi: Dict[int, set] = {}
        for r in sorted(refs, key=lambda r: r["ref_id"]):
            rbi.setdefault(r["image_id"], set()).add(r["ann_id"])
            for s in r["sentences"]:
                per.setdefault(r["split"], []).append({
                    "ref_id": r["ref_id"], "ann_id": r["ann_id"], "image_id": r["image_id"],
                    "sent_id": s["sent_id"], "sentence": s["sent"] or s["raw"],
                    "kind": s.get("kind"), "split": r["split"],
                    "image_path": image_paths[r["image_id"]],
                    "height": images[r["image_id"]][1], "width": images[r["image_id"]][2],
                    "category_id": r["category_id"],
                })
        expected[split_by] = per
        refs_by_image[split_by] = {k: sorted(v) for k, v in rbi.items()}

    return {
        "root": root,
        "dataset": dataset,
        "data_dir": data_dir,
        "image_dir": image_dir,
        "image_paths": image_paths,
        "refs_paths": refs_paths,
        "instances_path": os.path.join(data_dir, "instances.json"),
        "masks": masks,  # ann_id -> bool H×W
        "samples": expected,  # split_by -> split -> [expected sample fields]
        "refs_by_image": refs_by_image,  # split_by -> image_id -> sorted ann_ids
        "refs": all_refs,  # plain-Python (str) versions of the refs
        "instances": instances,
        "cafe_sentence": s_cafe,
    }
