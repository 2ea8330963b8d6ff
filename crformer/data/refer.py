"""Python-3-safe reader (and tiny writer) for the REFER dataset layout.

Layout (docs/DESIGN.md §4)::

    ROOT/<dataset>/refs(<split_by>).p      # pickle written by Python 2 (list of ref dicts)
    ROOT/<dataset>/instances.json          # COCO-style images / annotations / categories
    ROOT/images/mscoco/images/train2014/   # images for refcoco, refcoco+, refcocog
    ROOT/images/<dataset>/                 # images for any other dataset (e.g. ``synthetic``)

A ref dict (original REFER format)::

    {'ref_id', 'ann_id', 'image_id', 'split', 'category_id', 'file_name', 'sent_ids',
     'sentences': [{'sent_id', 'raw', 'sent', 'tokens', ...optional extra keys e.g. 'kind'}, ...]}

Python-2 pickles
----------------
Python 2 ``str`` objects are pickled as raw byte strings.  We unpickle with ``encoding="bytes"`` so
they arrive as ``bytes`` and then decode every bytes key/value recursively as UTF-8 (falling back to
latin-1 for byte strings that are not valid UTF-8).  This keeps non-ASCII sentences intact, which a
plain ``encoding="latin1"`` load would turn into mojibake.

Loading never runs code: the unpickler rebuilds only the types real refs files hold (dict, list,
tuple, str, bytes, int, float, bool, None). A pickle that names any other Python object (a class,
``os.system``) is refused before that object is looked up.

Masks are rasterised with pycocotools at the image's original size (polygon parts merged, RLE
compressed or uncompressed) and returned as ``bool`` arrays; nothing large is cached.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from crformer.errors import UserError

__all__ = ["REFER", "RefSample", "write_refer", "load_refs_pickle", "COCO_DATASETS"]

#: datasets whose images live in the shared MS-COCO train2014 folder
COCO_DATASETS = ("refcoco", "refcoco+", "refcocog")

_STD_SENT_KEYS = {"sent_id", "raw", "sent", "tokens", "kind"}
_STD_REF_KEYS = {"ref_id", "ann_id", "image_id", "split", "sentences", "file_name", "category_id",
                 "sent_ids"}


@dataclass(frozen=True)
class RefSample:
    """One sample = one sentence of one referred object."""

    image_path: str
    sentence: str
    ref_id: int
    ann_id: int
    image_id: int
    sent_id: int
    split: str
    kind: Optional[str]
    height: int
    width: int
    category_id: Optional[int] = None
    raw: str = ""
    tokens: tuple = ()
    #: non-standard keys of the ref dict and of the sentence dict (sentence keys win), e.g.
    #: ``target_kind``.  Excluded from equality/hash.
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------------------------
# pickle helpers


def _decode_bytes(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")


def _to_str(obj: Any) -> Any:
    """Recursively turn bytes (Python-2 ``str``) into ``str`` in dict keys/values, lists, tuples, sets."""
    if isinstance(obj, (bytes, bytearray)):
        return _decode_bytes(bytes(obj))
    if isinstance(obj, dict):
        return {_to_str(k): _to_str(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_str(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_str(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_to_str(v) for v in obj)
    return obj


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a Python object outside :data:`REFS_PICKLE_TYPES`."""


#: The only globals a refs pickle may name (the plain types, which protocol-0/1 pickles reach
#: through ``__builtin__``); everything the real files hold is built by opcodes without any.
REFS_PICKLE_TYPES = frozenset({"dict", "list", "tuple", "str", "bytes", "int", "float", "bool"})


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in REFS_PICKLE_TYPES:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def load_refs_pickle(path: str) -> Any:
    """Load a refs pickle written by Python 2 or 3, plain data only; all byte strings come back as
    ``str``. A pickle that asks for any other Python object is a UserError (nothing runs)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read refs file {path}: {e.strerror or e}") from None
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedGlobal as e:
        raise UserError(f"refusing to load refs file {path}: it asks for the Python object {e}, and refs files "
                        "hold only plain data (a file that needs code can run code)") from None
    except Exception as e:  # corrupt / truncated / not a pickle
        raise UserError(f"cannot unpickle refs file {path}: {type(e).__name__}: {e}") from None
    return _to_str(obj)


# ----------------------------------------------------------------------------------------------
# reader


def _as_int(v: Any) -> int:
    return int(v)


class REFER:
    """Reader for one REFER dataset / split scheme.

    ``REFER(root, dataset, split_by, image_dir=None)`` reads ``root/<dataset>/refs(<split_by>).p`` and
    ``root/<dataset>/instances.json``.  ``image_dir`` defaults to
    ``root/images/mscoco/images/train2014`` for refcoco/refcoco+/refcocog and ``root/images/<dataset>``
    otherwise.  Bad paths or inconsistent files raise :class:`~crformer.errors.UserError`.
    """

    def __init__(self, root: str, dataset: str, split_by: str, image_dir: Optional[str] = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise UserError(f"REFER data root not found: {root}")
        data_dir = os.path.join(root, dataset)
        if not os.path.isdir(data_dir):
            avail = sorted(d for d in os.listdir(root)
                           if os.path.isdir(os.path.join(root, d)) and d != "images")
            raise UserError(f"REFER dataset folder not found: {data_dir} "
                            f"(datasets under {root}: {', '.join(avail) or 'none'})")
        self.root = root
        self.dataset = dataset
        self.split_by = split_by
        self.data_dir = data_dir
        self.refs_path = os.path.join(data_dir, f"refs({split_by}).p")
        self.instances_path = os.path.join(data_dir, "instances.json")
        if not os.path.isfile(self.refs_path):
            avail = sorted(f for f in os.listdir(data_dir) if f.startswith("refs(") and f.endswith(").p"))
            raise UserError(f"refs file not found: {self.refs_path} "
                            f"(available: {', '.join(avail) or 'none'})")
        if not os.path.isfile(self.instances_path):
            raise UserError(f"instances file not found: {self.instances_path}")
        if image_dir is None:
            if dataset in COCO_DATASETS:
                image_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
            else:
                image_dir = os.path.join(root, "images", dataset)
        self.image_dir = os.fspath(image_dir)

        refs = load_refs_pickle(self.refs_path)
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise UserError(f"refs file {self.refs_path} does not hold a list of ref dicts")
        self.refs: List[Dict[str, Any]] = sorted(refs, key=lambda r: _as_int(r.get("ref_id", -1)))

        try:
            with open(self.instances_path, "r", encoding="utf-8") as f:
                inst = json.load(f)
            images = inst["images"]
            anns = inst["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read instances file {self.instances_path}: "
                            f"{type(e).__name__}: {e}") from None
        self.images: Dict[int, Dict[str, Any]] = {int(im["id"]): im for im in images}
        self.anns: Dict[int, Dict[str, Any]] = {int(a["id"]): a for a in anns}
        self.categories: Dict[int, Dict[str, Any]] = {
            int(c["id"]): c for c in inst.get("categories", []) or []}
        self.refs_by_id: Dict[int, Dict[str, Any]] = {}
        for r in self.refs:
            for k in ("ref_id", "ann_id", "image_id", "split"):
                if k not in r:
                    raise UserError(f"refs file {self.refs_path}: a ref lacks key {k!r}")
            rid, aid, iid = _as_int(r["ref_id"]), _as_int(r["ann_id"]), _as_int(r["image_id"])
            if aid not in self.anns:
                raise UserError(f"refs file {self.refs_path}: ref {rid} points to annotation {aid} "
                                f"missing from {self.instances_path}")
            if iid not in self.images:
                raise UserError(f"refs file {self.refs_path}: ref {rid} points to image {iid} "
                                f"missing from {self.instances_path}")
            self.refs_by_id[rid] = r

    # ------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"REFER(root={self.root!r}, dataset={self.dataset!r}, split_by={self.split_by!r}, "
                f"refs={len(self.refs)})")

    def splits(self) -> List[str]:
        """Sorted names of the splits present in the refs file."""
        return sorted({str(r["split"]) for r in self.refs})

    def check_splits(self, names: Sequence[str]) -> None:
        """UserError naming the first of ``names`` that the refs file does not hold (and those it does),
        so a typo is reported before any training or evaluation starts."""
        have = self.splits()
        missing = [n for n in names if n not in have]
        if missing:
            raise UserError(f"split {missing[0]!r} is not in {self.refs_path} (splits: {', '.join(have)})")

    def refs_in(self, split: Optional[str] = None) -> List[Dict[str, Any]]:
        """Ref dicts of ``split`` (all refs if ``None``), sorted by ref_id."""
        if split is None:
            return list(self.refs)
        self._check_split(split)
        return [r for r in self.refs if r["split"] == split]

    def _check_split(self, split: str) -> None:
        avail = self.splits()
        if split not in avail:
            raise UserError(f"unknown split {split!r} for {self.refs_path} "
                            f"(available: {', '.join(avail)})")

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, str(self.images[int(image_id)]["file_name"]))

    def samples(self, split: str) -> List[RefSample]:
        """One :class:`RefSample` per sentence of each ref in ``split``, ordered by ref_id then
        sentence order."""
        out: List[RefSample] = []
        for r in self.refs_in(split):
            iid = _as_int(r["image_id"])
            im = self.images[iid]
            ref_extra = {k: v for k, v in r.items() if k not in _STD_REF_KEYS}
            cat = r.get("category_id", self.anns[_as_int(r["ann_id"])].get("category_id"))
            for i, s in enumerate(r.get("sentences", []) or []):
                sent = s.get("sent") or s.get("raw") or ""
                extra = dict(ref_extra)
                extra.update({k: v for k, v in s.items() if k not in _STD_SENT_KEYS})
                sid = s.get("sent_id")
                if sid is None:
                    ids = r.get("sent_ids") or []
                    sid = ids[i] if i < len(ids) else -1
                kind = s.get("kind")
                out.append(RefSample(
                    image_path=self.image_path(iid),
                    sentence=str(sent),
                    ref_id=_as_int(r["ref_id"]),
                    ann_id=_as_int(r["ann_id"]),
                    image_id=iid,
                    sent_id=_as_int(sid),
                    split=str(r["split"]),
                    kind=None if kind is None else str(kind),
                    height=int(im["height"]),
                    width=int(im["width"]),
                    category_id=None if cat is None else int(cat),
                    raw=str(s.get("raw", sent)),
                    tokens=tuple(s.get("tokens", ()) or ()),
                    extra=extra,
                ))
        return out

    def refs_by_image(self, split: Optional[str] = None) -> Dict[int, List[int]]:
        """``image_id -> sorted unique ann_ids referred to`` (optionally only refs of ``split``)."""
        acc: Dict[int, set] = {}
        for r in self.refs_in(split):
            acc.setdefault(_as_int(r["image_id"]), set()).add(_as_int(r["ann_id"]))
        return {k: sorted(v) for k, v in sorted(acc.items())}

    # ------------------------------------------------------------------------------------------
    def mask(self, record: Union[RefSample, int, Mapping[str, Any]]) -> np.ndarray:
        """Boolean H×W mask (original image size) of a sample, an ann_id, or an annotation dict."""
        if isinstance(record, RefSample):
            ann = self.anns[record.ann_id]
        elif isinstance(record, Mapping):
            ann = record
        else:
            aid = int(record)
            if aid not in self.anns:
                raise UserError(f"annotation {aid} not found in {self.instances_path}")
            ann = self.anns[aid]
        im = self.images.get(int(ann["image_id"]))
        if im is None:
            raise UserError(f"image {ann['image_id']} of annotation {ann.get('id')} not found in "
                            f"{self.instances_path}")
        h, w = int(im["height"]), int(im["width"])
        try:
            return segmentation_to_mask(ann.get("segmentation"), h, w)
        except ValueError as e:
            raise UserError(f"bad segmentation for annotation {ann.get('id')} in "
                            f"{self.instances_path}: {e}") from None


def segmentation_to_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """COCO segmentation (polygon list, compressed or uncompressed RLE) -> bool H×W array.

    Polygon parts with fewer than 3 points are ignored (pycocotools would misread a 4-number list
    as a box).  Raises ValueError on malformed input or an RLE whose size differs from (h, w).
    """
    from pycocotools import mask as mask_utils

    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return np.zeros((h, w), dtype=bool)
    if isinstance(seg, list):
        polys = [[float(v) for v in p] for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not polys:
            return np.zeros((h, w), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg, Mapping):
        if "counts" not in seg or "size" not in seg:
            raise ValueError("RLE dict needs 'counts' and 'size'")
        size = [int(v) for v in seg["size"]]
        if size != [h, w]:
            raise ValueError(f"RLE size {size} differs from image size {[h, w]}")
        counts = seg["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {h * w}")
            rle = mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, h, w)
        else:
            if isinstance(counts, str):
                counts = counts.encode("ascii")
            rle = {"size": size, "counts": counts}
    else:
        raise ValueError(f"unsupported segmentation type {type(seg).__name__}")
    with warnings.catch_warnings():
        # pycocotools' RLE wrapper triggers a NumPy-2 "copy keyword" DeprecationWarning; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.any(axis=2)
    return m > 0


# ----------------------------------------------------------------------------------------------
# writer


def write_refer(root: str, dataset: str, split_by: str, refs: Sequence[Mapping[str, Any]],
                instances: Mapping[str, Any]) -> Dict[str, str]:
    """Write ``root/<dataset>/refs(<split_by>).p`` (pickle protocol 2) and ``instances.json``.

    Creates folders as needed and returns ``{'refs': path, 'instances': path}``.  Images are not
    written here (they go to ``root/images/<dataset>/`` or the COCO folder).
    """
    data_dir = os.path.join(os.fspath(root), dataset)
    os.makedirs(data_dir, exist_ok=True)
    refs_path = os.path.join(data_dir, f"refs({split_by}).p")
    inst_path = os.path.join(data_dir, "instances.json")
    tmp = refs_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump([dict(r) for r in refs], f, protocol=2)
    os.replace(tmp, refs_path)
    tmp = inst_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(instances), f)
    os.replace(tmp, inst_path)
    return {"refs": refs_path, "instances": inst_path}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("ascii")  # compressed RLE counts
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
