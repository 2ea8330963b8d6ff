"""Synthetic referring-segmentation benchmark, written in the REFER layout (docs/DESIGN.md §4).

Scenes hold 2–6 non-overlapping shapes (circle, square, triangle, star) of a few colours and two
sizes. Each scene draws its colours and shapes from a small per-scene palette so distractors share
attributes with the target and the whole sentence is needed. Sentence kinds:

- ``one-attr``    the target is unique by one word ("the red shape", "the star") — the easy split;
- ``two-attr``    no single word is unique, two are ("the small red shape", "the blue square");
- ``superlative`` the extreme of a group along an axis ("the leftmost circle");
- ``relational``  a group member singled out by a relation to a unique reference
                  ("the square above the green circle").

Splits: ``train`` (all four kinds), ``val_easy``/``test_easy`` (one-attr), ``val_hard``/``test_hard``
(two-attr, superlative and relational in equal shares, by quota: left alone, superlatives dominate).
Every eval image has at least two referred objects, so a sentence can be swapped for another object's
sentence in the same image (the language check).

Usage: ``python -m crformer.data.synthetic --out DIR --seed 0``; the default config calls
:func:`ensure_synthetic`, which generates into a cache folder on first use.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from crformer.data.refer import write_refer
from crformer.errors import UserError

DATASET = "synthetic"
SPLIT_BY = "unc"
COLORS = {
    "red": (215, 45, 40),
    "green": (40, 170, 60),
    "blue": (45, 90, 225),
    "yellow": (225, 205, 40),
    "purple": (150, 60, 195),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
ONE_ATTR = "one-attr"
HARD_KINDS = ("two-attr", "superlative", "relational")
TRAIN_KINDS = (ONE_ATTR,) + HARD_KINDS
# Superlative axis → (word, key giving the extreme as the minimum).
SUPERLATIVES = {
    "leftmost": lambda o: o.cx,
    "rightmost": lambda o: -o.cx,
    "topmost": lambda o: o.cy,
    "bottommost": lambda o: -o.cy,
}
# Relation word → predicate(candidate, reference) with a margin so "left of" is unambiguous.
RELATIONS = {
    "left of": lambda a, b, m: a.cx < b.cx - m,
    "right of": lambda a, b, m: a.cx > b.cx + m,
    "above": lambda a, b, m: a.cy < b.cy - m,
    "below": lambda a, b, m: a.cy > b.cy + m,
}


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float

    def attr(self, name: str) -> str:
        return getattr(self, name)


def _phrase(desc: dict) -> str:
    """Noun phrase for a descriptor like {'size': 'small', 'color': 'red'} → 'the small red shape'."""
    words = [desc[k] for k in ("size", "color") if k in desc]
    words.append(desc.get("shape", "shape"))
    return "the " + " ".join(words)


def _matches(obj: Obj, desc: dict) -> bool:
    return all(obj.attr(k) == v for k, v in desc.items())


def _descs(obj: Obj, n: int):
    for keys in combinations(("size", "color", "shape"), n):
        yield {k: obj.attr(k) for k in keys}


def _unique_descs(target: Obj, objs: list, n: int) -> list:
    return [d for d in _descs(target, n) if sum(_matches(o, d) for o in objs) == 1]


def describe(target: Obj, objs: list, kind: str, rng: np.random.Generator, margin: float) -> Optional[str]:
    """A sentence of ``kind`` that refers to ``target`` alone among ``objs``, or None if impossible."""
    one = _unique_descs(target, objs, 1)
    if kind == ONE_ATTR:
        return _phrase(one[rng.integers(len(one))]) if one else None
    if one:  # hard kinds must not be solvable from a single word
        return None
    if kind == "two-attr":
        two = _unique_descs(target, objs, 2)
        return _phrase(two[rng.integers(len(two))]) if two else None
    groups = [d for d in _descs(target, 1) if sum(_matches(o, d) for o in objs) >= 2]
    rng.shuffle(groups)
    if kind == "superlative":
        words = list(SUPERLATIVES)
        rng.shuffle(words)
        for d in groups:
            group = [o for o in objs if _matches(o, d)]
            for w in words:
                key = SUPERLATIVES[w]
                ranked = sorted(group, key=key)
                if ranked[0] is target and key(ranked[1]) - key(target) > margin:
                    return _phrase(d).replace("the ", f"the {w} ", 1)
        return None
    if kind == "relational":
        refs = [o for o in objs if o is not target]
        rng.shuffle(refs)
        rels = list(RELATIONS)
        rng.shuffle(rels)
        for d in groups:
            group = [o for o in objs if _matches(o, d)]
            for ref in refs:
                if ref in group:
                    continue
                ref_descs = _unique_descs(ref, objs, 1) + _unique_descs(ref, objs, 2)
                if not ref_descs:
                    continue
                for rel in rels:
                    hits = [o for o in group if RELATIONS[rel](o, ref, margin)]
                    if hits == [target]:
                        ref_desc = ref_descs[rng.integers(len(ref_descs))]
                        return f"{_phrase(d)} {rel} {_phrase(ref_desc)}"
        return None
    raise ValueError(f"unknown sentence kind {kind!r}")


def _scene(rng: np.random.Generator, size: int) -> list:
    n = int(rng.integers(2, 7))
    palette_colors = rng.choice(list(COLORS), size=int(rng.integers(2, 4)), replace=False)
    palette_shapes = rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False)
    r_small, r_large = 0.08 * size, 0.14 * size
    objs: list[Obj] = []
    for _ in range(200):
        if len(objs) == n:
            break
        sz = SIZES[int(rng.integers(2))]
        r = (r_small if sz == "small" else r_large) * rng.uniform(0.9, 1.1)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 0.04 * size for o in objs):
            objs.append(Obj(str(rng.choice(palette_shapes)), str(rng.choice(palette_colors)), sz, cx, cy, r))
    return objs


def _polygon(o: Obj) -> list:
    if o.shape == "square":
        h = o.r * 0.82
        return [(o.cx - h, o.cy - h), (o.cx + h, o.cy - h), (o.cx + h, o.cy + h), (o.cx - h, o.cy + h)]
    if o.shape == "triangle":
        return [(o.cx + o.r * math.cos(a), o.cy + o.r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if o.shape == "star":
        pts = []
        for i in range(10):
            rad = o.r if i % 2 == 0 else o.r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((o.cx + rad * math.cos(a), o.cy + rad * math.sin(a)))
        return pts
    raise ValueError(o.shape)


def _render(objs: list, size: int, rng: np.random.Generator):
    base = rng.integers(20, 70)
    img = np.clip(base + rng.normal(0, 6, size=(size, size, 3)), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    masks = []
    for o in objs:
        m = Image.new("L", (size, size), 0)
        md = ImageDraw.Draw(m)
        color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[o.color])
        if o.shape == "circle":
            box = (o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r)
            draw.ellipse(box, fill=color)
            md.ellipse(box, fill=1)
        else:
            poly = _polygon(o)
            draw.polygon(poly, fill=color)
            md.polygon(poly, fill=1)
        masks.append(np.asarray(m, dtype=np.uint8))
    return canvas, masks


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _choose_referred(objs: list, kinds: list, wanted: int, max_refs: int, rng, margin: float) -> list:
    """Up to ``max_refs`` objects of a scene (in random order) with up to ``wanted`` sentences each,
    of the ``kinds`` tried in order: ``[(object index, [(sentence, kind), ...]), ...]``."""
    chosen = []
    for idx in rng.permutation(len(objs)):
        sents = []
        for kind in kinds:
            s = describe(objs[idx], objs, kind, rng, margin)
            if s is not None:
                sents.append((s, kind))
                if len(sents) == wanted:
                    break
        if sents:
            chosen.append((int(idx), sents))
        if len(chosen) == max_refs:
            break
    return chosen


def _annotations(objs: list, masks: list, image_id: int, first_id: int) -> list:
    """COCO annotations (RLE, area, box, category) of a scene's objects, ids from ``first_id``."""
    anns = []
    for k, (o, m) in enumerate(zip(objs, masks)):
        ys, xs = np.nonzero(m)
        anns.append({
            "id": first_id + k, "image_id": image_id, "segmentation": _rle(m), "area": int(m.sum()),
            "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
            "iscrowd": 0, "category_id": SHAPES.index(o.shape) + 1,
        })
    return anns


def generate(out: str | os.PathLike, seed: int = 0, size: int = 96, train_images: int = 3000,
             eval_samples: int = 300) -> Path:
    """Write the synthetic dataset under ``out`` in the REFER layout; returns ``out``.

    ``out/images/synthetic/*.png``, ``out/synthetic/instances.json``, ``out/synthetic/refs(unc).p``.
    ``eval_samples`` is the number of sentences in each eval split (val/test × easy/hard).
    """
    out = Path(out)
    img_dir = out / "images" / DATASET
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    margin = 0.06 * size
    images, annotations, refs = [], [], []
    for split, kinds in [("train", TRAIN_KINDS), ("val_easy", (ONE_ATTR,)), ("val_hard", HARD_KINDS),
                         ("test_easy", (ONE_ATTR,)), ("test_hard", HARD_KINDS)]:
        is_train = split == "train"
        # Eval splits are filled by exact per-kind quotas: left alone, superlatives would dominate.
        quota = {k: eval_samples // len(kinds) for k in kinds}
        made = 0
        while (made < train_images) if is_train else any(quota.values()):
            objs = _scene(rng, size)
            if is_train:
                kind_cycle = [kinds[(made + i) % len(kinds)] for i in range(len(kinds))]
                wanted, max_refs = 2, 3
            else:
                due = max(quota, key=quota.get)
                kind_cycle, wanted, max_refs = [due], 1, min(3, quota[due])
            chosen = _choose_referred(objs, kind_cycle, wanted, max_refs, rng, margin)
            # Two referred objects per image at least, so sentences can be swapped (language check).
            if len(chosen) < min(2, max_refs):
                continue
            if not is_train:
                quota[kind_cycle[0]] -= len(chosen)
            image_id = len(images) + 1
            canvas, masks = _render(objs, size, rng)
            file_name = f"{image_id:06d}.png"
            canvas.save(img_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            anns = _annotations(objs, masks, image_id, len(annotations) + 1)
            annotations.extend(anns)
            for idx, sents in chosen:
                sentences = [{"raw": s, "sent": s, "tokens": s.split(), "kind": kind} for s, kind in sents]
                refs.append({"ref_id": len(refs) + 1, "ann_id": anns[idx]["id"], "image_id": image_id, "split": split,
                             "file_name": file_name, "category_id": SHAPES.index(objs[idx].shape) + 1,
                             "sentences": sentences})
            made += 1
    sent_id = 0
    for r in refs:
        for s in r["sentences"]:
            sent_id += 1
            s["sent_id"] = sent_id
        r["sent_ids"] = [s["sent_id"] for s in r["sentences"]]
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    write_refer(out, DATASET, SPLIT_BY, refs,
                {"images": images, "annotations": annotations, "categories": categories})
    return out


def ensure_synthetic(cache_dir: str | os.PathLike, seed: int = 0, size: int = 96, train_images: int = 3000,
                     eval_samples: int = 300) -> Path:
    """Return the root of the synthetic dataset with these parameters, generating it on first use.

    Generation writes to a temporary folder that is renamed into place, so an interrupted run never
    leaves a half-written dataset behind the name that later runs read.
    """
    params = dict(seed=seed, size=size, train_images=train_images, eval_samples=eval_samples, version=1)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / f"synthetic-{key}"
    if (root / DATASET / f"refs({SPLIT_BY}).p").exists():
        return root
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=cache_dir))
    except OSError as e:
        raise UserError(f"cannot write the synthetic dataset into data.cache_dir {cache_dir}: {e.strerror or e}") from None
    try:
        generate(tmp, seed=seed, size=size, train_images=train_images, eval_samples=eval_samples)
        (tmp / "params.json").write_text(json.dumps(params, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. the disk filled up while generating
            raise UserError(f"cannot write the synthetic dataset into data.cache_dir {cache_dir}: "
                            f"{'disk full' if e.errno == errno.ENOSPC else e.strerror or e}") from None
        raise
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output root (REFER layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--eval-samples", type=int, default=300, help="sentences per eval split")
    a = p.parse_args(argv)
    root = generate(a.out, a.seed, a.size, a.train_images, a.eval_samples)
    print(f"wrote synthetic REFER dataset to {root}")


if __name__ == "__main__":
    main()
