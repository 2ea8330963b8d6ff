"""Reader for the Hugging Face parquet releases of RefCOCO-family data (``data.format: hf-parquet``).

A downloaded dataset folder (``data.root``) holds ``data/<split>-*.parquet`` (``validation-00000-of-00002.parquet``
...), read in place by pyarrow: no conversion step, nothing downloaded. Two layouts, told apart by their columns
(the fields their dataset cards list; docs/DESIGN.md §4):

* ``refcoco-m`` (``moondream/refcoco-m``): one row per image: ``image`` (``{bytes, path}``, embedded),
  ``image_id`` and ``samples``, a list of ``{id, image_id, category, supercategory, label, sentences: [str],
  bbox, mask: {counts, size}}`` with ``mask`` a compressed COCO RLE at the image's size. No split column:
  the file name gives the split. Each sample is one object: its ``id`` is both ``ref_id`` and ``ann_id``;
  sentences have no ids (``sent_id`` -1) and no tokens.
* ``jxu124`` (``jxu124/refcoco``, ``refcocoplus``, ``refcocog``): one row per ref with the REFER ref fields
  (``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences``, ``sent_ids``, ``category_id``) plus
  ``raw_anns`` (the COCO annotation as JSON, polygons), ``raw_image_info`` (the COCO image as JSON: height,
  width) and ``image_path`` into COCO train2014, read under ``data.image_dir`` (as given, else by its file
  name: a ``coco/train2014/`` prefix is dropped). Sentences are REFER sentence dicts or plain strings.

Split names: ``validation`` is REFER's ``val``; a row's own ``split`` column (jxu124: the REFER split, e.g.
``testA`` in the file named ``test``) wins over its file's name. Samples and masks are built by the REFER
reader's own functions (:func:`~crformer.data.refer.ref_samples`, :func:`~crformer.data.refer.segmentation_to_mask`),
so the same object gives the same :class:`~crformer.data.refer.RefSample` fields and the same mask in either
format. Order: jxu124 by ref_id (as REFER); refcoco-m as stored (files by name, rows, samples), which keeps
one image's samples together, so each block of embedded images is read once.

Bad input — no parquet files, an unknown layout, a missing column, a missing or malformed value, a mask whose
size is not the image's, an image that does not decode — is one :class:`~crformer.errors.UserError` line naming
the file and the row (rows count from 0).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from crformer.data.image import image_size, load_image
from crformer.data.refer import RefSample, ref_samples, segmentation_to_mask
from crformer.errors import UserError, first_line

__all__ = ["HFParquet", "LAYOUT_COLUMNS", "load_embedded_image", "refer_split"]

#: Columns each layout needs; a file's columns decide its layout (``samples`` or ``raw_anns``).
LAYOUT_COLUMNS = {
    "refcoco-m": ("image", "image_id", "samples"),
    "jxu124": ("ref_id", "ann_id", "image_id", "sentences", "raw_anns", "raw_image_info", "image_path"),
}
#: Optional jxu124 columns that are read when present.
_JXU124_OPTIONAL = ("split", "sent_ids", "category_id", "file_name")
#: Hugging Face split names that differ from REFER's.
_HF_TO_REFER = {"validation": "val"}


def refer_split(name: str) -> str:
    """A Hugging Face split name as REFER names it (``validation`` → ``val``; others unchanged)."""
    return _HF_TO_REFER.get(name, name)


@dataclass(frozen=True)
class _Ref:
    """One REFER ref dict and where its image is (a file, or a parquet file and row)."""

    ref: Dict[str, Any]
    image_path: str
    image_row: Optional[int]
    where: str  # "FILE row N", for messages


class HFParquet:
    """The refs of one Hugging Face dataset folder, with the interface of :class:`~crformer.data.refer.REFER`
    that training and evaluation use: :meth:`splits`, :meth:`check_splits`, :meth:`samples`, :meth:`mask`.

    ``HFParquet(root, image_dir=None)`` reads every ``root/data/*.parquet`` (all columns but embedded
    images; those are only checked for size here, from their headers, and decoded when a sample is
    loaded). ``image_dir``: the COCO train2014 folder, required by the jxu124 layout.
    """

    def __init__(self, root: str, image_dir: Optional[str] = None):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise UserError(f"Hugging Face dataset folder not found: {self.root}")
        files = sorted(Path(self.root, "data").glob("*.parquet"))
        if not files:
            raise UserError(f"no parquet files in {os.path.join(self.root, 'data')} (a downloaded Hugging Face "
                            "dataset folder holds data/<split>-*.parquet)")
        self.image_dir = None if image_dir is None else os.fspath(image_dir)
        self.layout: Optional[str] = None
        self.images: Dict[int, Dict[str, int]] = {}  # image_id -> {"height", "width"}
        self.anns: Dict[int, Dict[str, Any]] = {}  # ann_id -> {"segmentation", "image_id", "where"}
        self._refs: List[_Ref] = []
        self._ref_where: Dict[int, str] = {}
        self._image_files: Dict[str, str] = {}  # jxu124 image_path -> the file under image_dir
        for path in files:
            self._read_file(str(path))
        if self.layout == "jxu124":
            self._refs.sort(key=lambda r: int(r.ref["ref_id"]))

    def __repr__(self) -> str:
        return f"HFParquet(root={self.root!r}, layout={self.layout!r}, refs={len(self._refs)})"

    # ------------------------------------------------------------------------------------------ reading
    def _read_file(self, path: str) -> None:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            columns = pf.schema_arrow.names
        except Exception as e:  # noqa: BLE001 - not parquet, truncated, unreadable
            raise UserError(f"cannot read parquet file {path}: {first_line(e)}") from None
        layout = "refcoco-m" if "samples" in columns else "jxu124" if "raw_anns" in columns else None
        if layout is None:
            raise UserError(f"{path}: unknown layout (columns: {', '.join(columns[:12])}); hf-parquet reads "
                            "moondream/refcoco-m (a 'samples' column) or jxu124/refcoco* (a 'raw_anns' column)")
        if self.layout not in (None, layout):
            raise UserError(f"{path} is a {layout} file, but the other files in {self.root} are {self.layout}: "
                            "one dataset folder holds one release")
        self.layout = layout
        missing = [c for c in LAYOUT_COLUMNS[layout] if c not in columns]
        if missing:
            raise UserError(f"{path}: no column {missing[0]!r} (a {layout} file has "
                            f"{', '.join(LAYOUT_COLUMNS[layout])})")
        file_split = refer_split(Path(path).name.split("-")[0].removesuffix(".parquet"))
        wanted = ["image_id", "samples"] if layout == "refcoco-m" else \
            list(LAYOUT_COLUMNS[layout]) + [c for c in _JXU124_OPTIONAL if c in columns]
        try:
            rows = pf.read(columns=wanted).to_pylist()
            sizes = self._embedded_image_sizes(pf, path) if layout == "refcoco-m" else [None] * len(rows)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow failing on a damaged file
            raise UserError(f"cannot read parquet file {path}: {first_line(e)}") from None
        for row, (values, size) in enumerate(zip(rows, sizes)):
            try:
                if layout == "refcoco-m":
                    self._add_refcoco_m_row(values, size, path, row, file_split)
                else:
                    self._add_jxu124_row(values, path, row, file_split)
            except (TypeError, ValueError, KeyError, IndexError) as e:  # a value of an unexpected type or shape
                raise UserError(f"{path} row {row}: malformed value ({first_line(e)})") from None

    @staticmethod
    def _embedded_image_sizes(pf, path: str) -> List[tuple]:
        """(width, height) of every row's embedded image, from its header (EXIF orientation applied)."""
        sizes = []
        for batch in pf.iter_batches(batch_size=32, columns=["image"]):
            for cell in batch.column(0).to_pylist():
                where = f"{path} row {len(sizes)}"
                sizes.append(image_size(_image_bytes(cell, where), name=where))
        return sizes

    def _add_refcoco_m_row(self, values: Mapping[str, Any], size: tuple, path: str, row: int, split: str) -> None:
        where = f"{path} row {row}"
        image_id = _int(values, "image_id", where)
        if image_id in self.images:
            raise UserError(f"{where}: image {image_id} is also in an earlier row")
        width, height = size
        self.images[image_id] = {"height": height, "width": width}
        samples = values["samples"] or []
        for k, sample in enumerate(samples):
            what = f"{where}, sample {k}"
            if not isinstance(sample, Mapping):
                raise UserError(f"{what}: a sample must be a struct; got {type(sample).__name__}")
            obj_id = _int(sample, "id", what)
            if sample.get("image_id") is not None and int(sample["image_id"]) != image_id:
                raise UserError(f"{what}: sample image_id {sample['image_id']} differs from the row's {image_id}")
            mask = sample.get("mask")
            if not isinstance(mask, Mapping) or mask.get("counts") is None or mask.get("size") is None:
                raise UserError(f"{what}: no mask {{counts, size}}")
            if _size(mask["size"]) != [height, width]:
                raise UserError(f"{what}: its mask is {'×'.join(map(str, mask['size']))} (H×W) but the image is "
                                f"{height}×{width}: the mask would not line up")
            sentences = sample.get("sentences")
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise UserError(f"{what}: 'sentences' must be a list of strings")
            ref = {"ref_id": obj_id, "ann_id": obj_id, "image_id": image_id, "split": split,
                   "sentences": [{"raw": s} for s in sentences],
                   **{k: sample[k] for k in ("category", "supercategory", "label") if sample.get(k) is not None}}
            self._add(_Ref(ref, path, row, where), {"segmentation": dict(mask), "image_id": image_id})

    def _add_jxu124_row(self, values: Mapping[str, Any], path: str, row: int, file_split: str) -> None:
        where = f"{path} row {row}"
        if self.image_dir is None:
            raise UserError(f"{path} (jxu124 layout) refers to COCO train2014 images: set data.image_dir to the "
                            "folder that holds them (COCO_train2014_*.jpg)")
        ref_id, ann_id, image_id = (_int(values, k, where) for k in ("ref_id", "ann_id", "image_id"))
        ann = _json_value(values, "raw_anns", where)
        if isinstance(ann, list):  # every annotation of the image: pick the referred one
            ann = next((a for a in ann if isinstance(a, Mapping) and a.get("id") == ann_id), None)
        if not isinstance(ann, Mapping) or "segmentation" not in ann:
            raise UserError(f"{where}: raw_anns holds no COCO annotation with a segmentation for ann_id {ann_id}")
        if ann.get("id") is not None and int(ann["id"]) != ann_id:
            raise UserError(f"{where}: raw_anns is annotation {ann['id']}, but the row's ann_id is {ann_id}")
        info = _json_value(values, "raw_image_info", where)
        if not isinstance(info, Mapping) or info.get("height") is None or info.get("width") is None:
            raise UserError(f"{where}: raw_image_info has no height and width")
        image = {k: _int(info, k, f"{where}: raw_image_info") for k in ("height", "width")}
        if self.images.setdefault(image_id, image) != image:
            raise UserError(f"{where}: image {image_id} is {image['height']}×{image['width']} here but "
                            f"{self.images[image_id]['height']}×{self.images[image_id]['width']} in an earlier row")
        seg = ann["segmentation"]
        if isinstance(seg, Mapping) and _size(seg.get("size")) != [image["height"], image["width"]]:
            raise UserError(f"{where}: the mask of annotation {ann_id} is {'×'.join(map(str, seg.get('size') or []))}"
                            f" (H×W) but the image is {image['height']}×{image['width']}")
        rel = values.get("image_path") or info.get("file_name")
        if not isinstance(rel, str) or not rel:
            raise UserError(f"{where}: no image_path (and no file_name in raw_image_info)")
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise UserError(f"{where}: image_path must be a relative path inside data.image_dir; got {rel[:60]!r}")
        split = values.get("split")
        ref = {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
               "split": refer_split(str(split)) if split else file_split,
               "sentences": _sentences(values["sentences"], where)}
        for k in ("sent_ids", "category_id", "file_name"):
            if values.get(k) is not None:
                ref[k] = values[k]
        self._add(_Ref(ref, str(rel), None, where), {"segmentation": seg, "image_id": image_id,
                                                     "category_id": ann.get("category_id")})

    def _add(self, ref: _Ref, ann: Dict[str, Any]) -> None:
        rid, aid = int(ref.ref["ref_id"]), int(ref.ref["ann_id"])
        if rid in self._ref_where:
            raise UserError(f"{ref.where}: ref {rid} is also in {self._ref_where[rid]}")
        self._ref_where[rid] = ref.where
        self.anns.setdefault(aid, {**ann, "where": ref.where})
        self._refs.append(ref)

    # ------------------------------------------------------------------------------------------ interface
    def splits(self) -> List[str]:
        """Sorted REFER names of the splits in the folder."""
        return sorted({str(r.ref["split"]) for r in self._refs})

    def check_splits(self, names: Sequence[str]) -> None:
        """UserError naming the first of ``names`` that the folder does not hold (and those it does)."""
        have = self.splits()
        missing = [n for n in names if n not in have]
        if missing:
            raise UserError(f"split {missing[0]!r} is not in {self.root} (splits: {', '.join(have)})")

    def check_images(self, splits: Sequence[str], progress: bool = False) -> None:
        """Before any step: every image file the ``splits`` use (jxu124) exists, decodes its header and
        has the size ``raw_image_info`` gives (EXIF orientation applied); otherwise a UserError naming the
        file and the row. Embedded images (refcoco-m) were checked when the files were read."""
        from tqdm import tqdm

        files: Dict[str, _Ref] = {}
        for r in self._refs:
            if r.ref["split"] in splits and r.image_row is None:
                files.setdefault(self._image_file(r.image_path), r)
        for path, r in tqdm(files.items(), desc="checking images", unit="img",
                            disable=not progress or len(files) < 2000, leave=False):
            image = self.images[int(r.ref["image_id"])]
            w, h = image_size(path)
            if (w, h) != (image["width"], image["height"]):
                raise UserError(f"image {path} is {w}×{h} (after EXIF orientation) but {r.where} says "
                                f"{image['width']}×{image['height']}")

    def samples(self, split: str) -> List[RefSample]:
        """One :class:`RefSample` per sentence of each ref in ``split`` (order: module docstring)."""
        self.check_splits([split])
        out: List[RefSample] = []
        for r in self._refs:
            if r.ref["split"] != split:
                continue
            image_id = int(r.ref["image_id"])
            path = r.image_path if r.image_row is not None else self._image_file(r.image_path)
            out += ref_samples(r.ref, self.images[image_id], path, self.anns[int(r.ref["ann_id"])].get("category_id"),
                               r.image_row)
        return out

    def mask(self, sample: RefSample) -> np.ndarray:
        """Boolean H×W mask (the image's size) of a sample."""
        ann = self.anns[sample.ann_id]
        image = self.images[ann["image_id"]]
        try:
            return segmentation_to_mask(ann["segmentation"], image["height"], image["width"])
        except ValueError as e:
            raise UserError(f"{ann['where']}: bad mask for annotation {sample.ann_id}: {e}") from None

    def _image_file(self, rel: str) -> str:
        """``rel`` (a jxu124 ``image_path``) under ``image_dir``: as given if that file exists, else by its
        file name alone (``coco/train2014/X.jpg`` → ``image_dir/X.jpg``)."""
        if rel not in self._image_files:
            given = os.path.join(self.image_dir, rel)
            self._image_files[rel] = given if os.path.isfile(given) else os.path.join(self.image_dir,
                                                                                      os.path.basename(rel))
        return self._image_files[rel]


# ---------------------------------------------------------------------------------------------- embedded images


def load_embedded_image(path: str, row: int) -> Image.Image:
    """The image embedded in row ``row`` of the parquet file ``path``, decoded as :func:`load_image`
    decodes a file (8-bit RGB, EXIF orientation applied)."""
    starts = _row_group_starts(path)
    group = int(np.searchsorted(starts, row, side="right")) - 1
    where = f"{path} row {row}"
    return load_image(_image_bytes(_row_group_images(path, group)[row - starts[group]], where), name=where)


@functools.lru_cache(maxsize=8)
def _row_group_starts(path: str) -> List[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return list(np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])[:-1])


@functools.lru_cache(maxsize=2)
def _row_group_images(path: str, group: int) -> list:
    """The ``image`` cells of one row group. Why cached: parquet reads a whole row group's column at once,
    and evaluation asks for its images one after another (two groups: the current one and the next)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=["image"]).column(0).to_pylist()


def _image_bytes(cell: Any, where: str) -> bytes:
    """The encoded image of a Hugging Face ``Image`` cell (``{bytes, path}``, or plain bytes)."""
    data = cell.get("bytes") if isinstance(cell, Mapping) else cell
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise UserError(f"{where}: no embedded image bytes")
    return bytes(data)


# ---------------------------------------------------------------------------------------------- values


def _int(values: Mapping[str, Any], key: str, where: str) -> int:
    v = values.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise UserError(f"{where}: {key!r} must be an integer; got {v!r}")
    return int(v)


def _size(value: Any) -> Optional[List[int]]:
    """An RLE ``size`` as ``[H, W]`` ints (None unless it is two integers)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2 or \
            not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return None
    return [int(v) for v in value]


def _json_value(values: Mapping[str, Any], key: str, where: str) -> Any:
    text = values.get(key)
    if not isinstance(text, str):
        raise UserError(f"{where}: {key!r} must be a JSON string; got {type(text).__name__}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: {key!r} is not valid JSON ({e})") from None


def _sentences(value: Any, where: str) -> List[Dict[str, Any]]:
    """REFER sentence dicts from a jxu124 ``sentences`` cell: a list of dicts (``raw``, ``sent``,
    ``sent_id``, ``tokens``; null fields dropped) or of strings, or either as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise UserError(f"{where}: 'sentences' is a string but not valid JSON ({e})") from None
    if not isinstance(value, list):
        raise UserError(f"{where}: 'sentences' must be a list; got {type(value).__name__}")
    out = []
    for s in value:
        if isinstance(s, str):
            out.append({"raw": s})
        elif isinstance(s, Mapping) and (s.get("sent") or s.get("raw")) is not None:
            out.append({k: v for k, v in s.items() if v is not None})
        else:
            raise UserError(f"{where}: a sentence must be a string or a dict with 'sent' or 'raw'; got {s!r:.60}")
    return out
