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
from crformer.files import regular_file

__all__ = ["REFER", "RefSample", "ref_samples", "write_refer", "load_refs_pickle", "COCO_DATASETS"]

#: datasets whose images live in the shared MS-COCO train2014 folder
COCO_DATASETS = ("refcoco", "refcoco+", "refcocog")

_STD_SENT_KEYS = {"sent_id", "raw", "sent", "tokens", "kind"}
_STD_REF_KEYS = {"ref_id", "ann_id", "image_id", "split", "sentences", "file_name", "category_id",
                 "sent_ids"}


@dataclass(frozen=True)
class RefSample:
    """One sample = one sentence of one referred object.

    ``image_path`` is the image file, or, when ``image_row`` is set, the parquet file whose row
    ``image_row`` (counted from 0) embeds the image (``data.format: hf-parquet``, RefCOCO-M)."""

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
    image_row: Optional[int] = None
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
        raise UserError(f"cannot unpickle refs file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        return _to_str(obj)
    except RecursionError:  # real refs are 4 levels deep; a crafted file can nest thousands
        raise UserError(f"refs file {path} nests its data deeper than Python can walk; not a refs file") from None


# ----------------------------------------------------------------------------------------------
# reader


def _as_int(v: Any) -> int:
    return int(v)


def _check_image(im: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a COCO image entry (None if nothing): the size must be a real picture's,
    and ``file_name`` a relative path inside the image folder."""
    from crformer.data.image import MAX_PIXELS

    h, w, name = im.get("height"), im.get("width"), im.get("file_name")
    if not (_is_int_like(h) and _is_int_like(w) and h > 0 and w > 0):
        return f"height and width must be positive integers; got {str(h)[:20]}×{str(w)[:20]}"
    if h * w > MAX_PIXELS:
        return f"{w}×{h} is more pixels than the limit of {MAX_PIXELS:,}"
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return f"file_name must be a relative path inside the image folder; got {str(name)[:60]!r}"
    return None


def _check_annotation(ann: Dict[str, Any]) -> Optional[str]:
    if not _is_int_like(ann.get("image_id")):
        return f"image_id must be an integer; got {str(ann.get('image_id'))[:40]!r}"
    return None


def _index(items: Any, what: str, path: str, check=None) -> Dict[int, Dict[str, Any]]:
    """``{id: entry}`` of the COCO list ``items`` (``images``, ``annotations``...), every entry a dict
    with an integer ``id`` that ``check`` (returns an error or None) accepts; else a UserError naming
    the list, the entry and the problem."""
    if not isinstance(items, list):
        raise UserError(f"instances file {path}: {what!r} must be a list; got {type(items).__name__}")
    out: Dict[int, Dict[str, Any]] = {}
    for i, entry in enumerate(items):
        if not isinstance(entry, dict) or not _is_int_like(entry.get("id")):
            raise UserError(f"instances file {path}: {what}[{i}] must be an object with an integer id")
        problem = check(entry) if check else None
        if problem:
            raise UserError(f"instances file {path}: {what[:-1]} {entry['id']}: {problem}")
        out[int(entry["id"])] = entry
    return out


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
        if not os.path.lexists(self.refs_path):
            avail = sorted(f for f in os.listdir(data_dir) if f.startswith("refs(") and f.endswith(").p"))
            raise UserError(f"refs file not found: {self.refs_path} "
                            f"(available: {', '.join(avail) or 'none'})")
        regular_file(self.refs_path, "refs file")  # a FIFO or a device would block the read
        regular_file(self.instances_path, "instances file")
        if image_dir is None:
            if dataset in COCO_DATASETS:
                image_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
            else:
                image_dir = os.path.join(root, "images", dataset)
        self.image_dir = os.fspath(image_dir)

        refs = load_refs_pickle(self.refs_path)
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise UserError(f"refs file {self.refs_path} does not hold a list of ref dicts")
        try:
            with open(self.instances_path, "r", encoding="utf-8") as f:
                inst = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"cannot read instances file {self.instances_path}: {type(e).__name__}: "
                            f"{str(e)[:200]}") from None
        if not isinstance(inst, dict):
            raise UserError(f"instances file {self.instances_path} does not hold a JSON object")
        self.images = _index(inst.get("images"), "images", self.instances_path, _check_image)
        self.anns = _index(inst.get("annotations"), "annotations", self.instances_path, _check_annotation)
        self.categories = _index(inst.get("categories") or [], "categories", self.instances_path)
        self.refs_by_id: Dict[int, Dict[str, Any]] = {}
        for r in refs:
            rid = self._check_ref(r)
            self.refs_by_id[rid] = r
        self.refs: List[Dict[str, Any]] = [self.refs_by_id[k] for k in sorted(self.refs_by_id)]

    def _check_ref(self, r: Dict[str, Any]) -> int:
        """The ref's id, after checking what the readers rely on: integer ids that exist, the
        annotation on the ref's own image, a split name, sentences as dicts with text."""
        where = f"refs file {self.refs_path}"
        for k in ("ref_id", "ann_id", "image_id", "split"):
            if k not in r:
                raise UserError(f"{where}: a ref lacks key {k!r}")
        if not all(_is_int_like(r[k]) for k in ("ref_id", "ann_id", "image_id")):
            bad = next(k for k in ("ref_id", "ann_id", "image_id") if not _is_int_like(r[k]))
            raise UserError(f"{where}: {bad} must be an integer; got {str(r[bad])[:40]!r}")
        rid, aid, iid = int(r["ref_id"]), int(r["ann_id"]), int(r["image_id"])
        if rid in self.refs_by_id:
            raise UserError(f"{where}: ref {rid} appears twice")
        if not isinstance(r["split"], str) or not r["split"]:
            raise UserError(f"{where}: ref {rid} has split {str(r['split'])[:40]!r}, not a name")
        if aid not in self.anns:
            raise UserError(f"{where}: ref {rid} points to annotation {aid} missing from {self.instances_path}")
        if iid not in self.images:
            raise UserError(f"{where}: ref {rid} points to image {iid} missing from {self.instances_path}")
        if int(self.anns[aid]["image_id"]) != iid:
            raise UserError(f"{where}: ref {rid} is on image {iid} but its annotation {aid} is on image "
                            f"{self.anns[aid]['image_id']}")
        sentences = r.get("sentences", [])
        if not isinstance(sentences, list) or not all(
                isinstance(x, dict) and isinstance(x.get("sent", x.get("raw")), str) for x in sentences):
            raise UserError(f"{where}: ref {rid}'s sentences must be a list of dicts with a 'sent' or 'raw' string")
        im = self.images[iid]
        try:
            check_segmentation(self.anns[aid].get("segmentation"), int(im["height"]), int(im["width"]))
        except ValueError as e:
            raise UserError(f"bad segmentation for annotation {aid} in {self.instances_path}: {e}") from None
        return rid

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

    def check_images(self, splits: Sequence[str], progress: bool = False) -> None:
        """Before any step: every image the ``splits`` use exists, is a regular file, decodes its header
        and has the size ``instances.json`` gives (EXIF orientation applied); otherwise a UserError
        naming the file. Reads headers only (a progress bar on large datasets)."""
        from tqdm import tqdm

        from crformer.data.image import image_size

        ids = sorted({int(r["image_id"]) for split in splits for r in self.refs_in(split)})
        quiet = not progress or len(ids) < 2000
        # disable=None: a bar on a terminal only, not in logs.
        for iid in tqdm(ids, desc="checking images", unit="img", disable=True if quiet else None, leave=False):
            im = self.images[iid]
            path = self.image_path(iid)
            if image_size(path) != (int(im["width"]), int(im["height"])):
                w, h = image_size(path)
                raise UserError(f"image {path} is {w}×{h} (after EXIF orientation) but {self.instances_path} "
                                f"says {im['width']}×{im['height']}")

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
            out += ref_samples(r, self.images[iid], self.image_path(iid),
                               self.anns[_as_int(r["ann_id"])].get("category_id"))
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


def ref_samples(r: Mapping[str, Any], image: Mapping[str, Any], image_path: str,
                ann_category_id: Any = None, image_row: Optional[int] = None) -> List[RefSample]:
    """One :class:`RefSample` per sentence of the REFER ref dict ``r`` (sentence order): ``image`` is
    its COCO image dict (``height``, ``width``), ``ann_category_id`` the annotation's category (used
    when the ref has none). Shared by every reader, so each format gives the same samples."""
    out: List[RefSample] = []
    ref_extra = {k: v for k, v in r.items() if k not in _STD_REF_KEYS}
    cat = r.get("category_id", ann_category_id)
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
            image_path=image_path,
            sentence=str(sent),
            ref_id=_as_int(r["ref_id"]),
            ann_id=_as_int(r["ann_id"]),
            image_id=_as_int(r["image_id"]),
            sent_id=_as_int(sid),
            split=str(r["split"]),
            kind=None if kind is None else str(kind),
            height=int(image["height"]),
            width=int(image["width"]),
            category_id=None if cat is None else int(cat),
            raw=str(s.get("raw", sent)),
            tokens=tuple(s.get("tokens", ()) or ()),
            image_row=image_row,
            extra=extra,
        ))
    return out


#: A polygon coordinate further than this many image sides outside the image is not a real one (and
#: pycocotools' rasteriser crashes on 1e30 or NaN).
_POLYGON_REACH = 4


SHORT_POLYGON_WARNING = ("dropped polygon parts of fewer than 3 points from the annotations (pycocotools would "
                         "misread one as a box; RefCOCO holds a few); not repeated")


def check_segmentation(seg: Any, h: int, w: int) -> Any:
    """``seg`` (COCO polygon list, compressed or uncompressed RLE) checked against an h×w image without
    rasterising it: returns the polygon parts to draw (a list), the RLE dict to decode, or None for an
    empty mask. Polygon parts with fewer than 3 points are dropped with a warning, once per process
    (pycocotools would misread a 4-number list as a box; real COCO annotations hold a few). Raises
    ValueError, before pycocotools sees it, on anything else malformed: an odd number of coordinates, a
    coordinate that is not finite or lies far outside the image, an RLE whose size differs from (h, w)
    or whose counts do not cover exactly h·w pixels."""
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return None
    if isinstance(seg, list):
        parts = [_polygon(part, h, w) for part in seg]
        polys = [p for p in parts if len(p) >= 6]
        if len(polys) < len(parts):
            # One warning per process (the text is constant): RefCOCO's instances.json holds a few.
            warnings.warn(SHORT_POLYGON_WARNING)
        return polys or None
    if not isinstance(seg, Mapping):
        raise ValueError(f"unsupported segmentation type {type(seg).__name__}")
    if "counts" not in seg or "size" not in seg:
        raise ValueError("RLE dict needs 'counts' and 'size'")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int_like(v) for v in size)):
        raise ValueError(f"RLE size must be [height, width]; got {str(size)[:40]}")
    size = [int(v) for v in size]
    if size != [h, w]:
        raise ValueError(f"RLE size {size} differs from image size {[h, w]}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int_like(c) and 0 <= int(c) <= h * w for c in counts):
            raise ValueError(f"uncompressed RLE counts must be integers in [0, {h * w}]")
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(int(c) for c in counts)}, expected {h * w}")
        return {"size": size, "counts": [int(c) for c in counts]}
    if isinstance(counts, (str, bytes)):
        counts = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
        total = _compressed_rle_total(counts)
        if total != h * w:
            raise ValueError(f"compressed RLE covers {total} pixels, expected {h * w}")
        return {"size": size, "counts": counts}
    raise ValueError(f"RLE counts must be a list or a string; got {type(counts).__name__}")


def segmentation_to_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """COCO segmentation -> bool H×W array, rasterised by pycocotools after :func:`check_segmentation`
    (whose ValueErrors it raises)."""
    from pycocotools import mask as mask_utils

    shape = check_segmentation(seg, h, w)
    if shape is None:
        return np.zeros((h, w), dtype=bool)
    if isinstance(shape, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(shape, h, w))
    elif isinstance(shape["counts"], list):
        rle = mask_utils.frPyObjects(shape, h, w)
    else:
        rle = shape
    with warnings.catch_warnings():
        # pycocotools' RLE wrapper triggers a NumPy-2 "copy keyword" DeprecationWarning; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.any(axis=2)
    return m > 0


def _is_int_like(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _polygon(part: Any, h: int, w: int) -> List[float]:
    """One polygon part as floats, checked: an even number of finite coordinates near the image."""
    if not isinstance(part, (list, tuple)):
        raise ValueError(f"a polygon must be a list of numbers; got {type(part).__name__}")
    if len(part) % 2:
        raise ValueError(f"a polygon has {len(part)} coordinates, an odd number (x, y pairs expected)")
    try:
        xy = np.asarray(part, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise ValueError("a polygon holds something that is not a number") from None
    reach = _POLYGON_REACH * max(h, w)
    if not np.isfinite(xy).all() or np.abs(xy).max(initial=0.0) > reach:
        raise ValueError(f"a polygon coordinate is not finite or lies more than {reach} px from the image")
    return xy.reshape(-1).tolist()


def _compressed_rle_total(counts: bytes) -> int:
    """Pixels covered by a COCO compressed RLE string (the sum of its run lengths), decoded the way
    pycocotools' ``rleFrString`` reads it: 5-bit groups with a continuation bit, runs after the
    second stored as differences. ValueError if the string ends inside a number."""
    runs: List[int] = []
    i = 0
    while i < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(counts):
                raise ValueError("compressed RLE ends inside a run length")
            c = counts[i] - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("compressed RLE has a negative run length")
        runs.append(value)
    return sum(runs)


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
