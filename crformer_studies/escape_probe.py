"""Inside one training run: what changes when the hard split leaves its plateau (issue 21, item 1).

``python -m crformer_studies.escape_probe --out DIR [--every 20] [key=value ...]`` trains the default
config (plus overrides) as ``python -m crformer.train`` does and writes ``DIR/probe.jsonl``. The probe
only reads — forward hooks, gradient norms, and one extra evaluation per epoch with the random state
saved and restored — so the run is the plain run (its ``log.jsonl`` in ``DIR/run`` shows the same
val numbers as ``crformer.train`` with the same config, seed and threads). Records:

- every ``--every`` steps (``"step"``): per sentence kind of the batch, the mean entropy (nats) of the
  mask head's softmax over the queries (final layer) and its largest weight; the mean entropy of the
  QGM's spatial softmaxes (over the stride-32 cells); how different the N_q queries are — the spread
  across a sample's queries over the spread across samples (std over queries / std over samples of
  the query mean, both averaged over the D channels), for the QGM's queries and the last decoder
  layer's; the gradient norm of each top-level module before clipping; the loss terms.
- after every epoch (``"epoch"``): for val_hard's superlative and relational sentences, where the
  predicted mask lies — its share of pixels on the target, on the other members of the group the
  sentence's noun phrase names ("the leftmost **circle**": the circles), and elsewhere — and what each
  prediction is: the target (IoU ≥ 0.5), another group member (IoU ≥ 0.5 with one), spread over the
  group (most of its pixels on the group, no member at IoU ≥ 0.5), or other.

The plateau's reading in benchmarks/NOTES.md ("Why the hard split plateaus", items 1 and 5) predicts
spread masks and flat softmaxes before the escape, committed masks and sharper softmaxes after it.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crformer.cli import config_args, parser, quiet_libraries
from crformer.config import load_config
from crformer.data.dataset import Collate, RefDataset
from crformer.data.synthetic import COLORS, RELATIONS, SHAPES, SIZES, SUPERLATIVES
from crformer.engine import predict_logits, upsample_mask
from crformer.metrics import intersection_union
from crformer.process import run

SPATIAL_KINDS = ("superlative", "relational")
#: Area of each rendered shape over r² (data/synthetic.py's polygons): the size word from an object's area.
AREA_PER_R2 = {"circle": math.pi, "square": (2 * 0.82) ** 2, "triangle": 3 * math.sqrt(3) / 4,
               "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5)}
#: Between the generator's small (0.08·S) and large (0.14·S) radius.
SMALL_BELOW = 0.11
#: What :func:`where_masks_lie` reports per kind (besides ``n``).
WHERE_KEYS = ("group size", "target in its group", "share on target", "share on other members",
              "is target", "is another member", "spread over group", "other")


def group_word(sentence: str) -> str:
    """The one word of a spatial sentence's noun phrase that names its group: "the leftmost circle" →
    circle, "the red shape left of the star" → red, "the topmost small shape" → small."""
    words = sentence.split()
    for rel in RELATIONS:
        if f" {rel} " in f" {sentence} ":
            words = sentence.split(f" {rel} ")[0].split()
            break
    words = [w for w in words[1:] if w not in SUPERLATIVES]  # drop "the" and the superlative
    return words[-1] if words[-1] in SHAPES else words[0]


def object_words(refer, image_id: int, anns: list, size: int) -> dict:
    """``{ann_id: (mask, {shape, colour, size word})}`` of an image's objects (``anns``, its annotations):
    the shape from the category, the colour nearest the mean pixel, the size from the area."""
    pixels = np.asarray(Image.open(refer.image_path(image_id)).convert("RGB"), dtype=np.float64)
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    out = {}
    for ann in anns:
        mask = refer.mask(ann)
        shape = refer.categories[int(ann["category_id"])]["name"]
        colour = list(COLORS)[int(np.argmin(((palette - pixels[mask].mean(0)) ** 2).sum(1)))]
        radius = math.sqrt(mask.sum() / AREA_PER_R2[shape])
        out[int(ann["id"])] = (mask, {shape, colour, SIZES[0] if radius < SMALL_BELOW * size else SIZES[1]})
    return out


def where_masks_lie(model, refer, cfg: dict, tokenizer) -> dict:
    """Per spatial kind of val_hard: the mean share of predicted pixels on the target / the other group
    members / elsewhere, and the fractions of predictions that are the target, another member, spread
    over the group, or other (see the module docstring); ``n`` and the mean group size."""
    ds = RefDataset(refer, "val_hard", cfg["data"]["image_size"], train=False, preload=cfg["data"]["preload"])
    idx = [i for i, s in enumerate(ds.samples) if s.kind in SPATIAL_KINDS]
    collate, acc = Collate(tokenizer), defaultdict(lambda: defaultdict(float))
    anns_by_image, objects = defaultdict(list), {}
    for ann in refer.anns.values():
        anns_by_image[int(ann["image_id"])].append(ann)
    for start in range(0, len(idx), cfg["eval"]["batch_size"]):
        batch = collate([ds[i] for i in idx[start:start + cfg["eval"]["batch_size"]]])
        logits = predict_logits(model, batch.images, batch.input_ids, batch.attention_mask, cfg["eval"]["amp"])
        for b, i in enumerate(batch.index.tolist()):
            s = ds.samples[i]
            if s.image_id not in objects:
                objects[s.image_id] = object_words(refer, s.image_id, anns_by_image[s.image_id], s.width)
            word = group_word(s.sentence)
            group = {a: m for a, (m, words) in objects[s.image_id].items() if word in words}
            target = refer.mask(s)
            others = [m for a, m in group.items() if a != s.ann_id]
            pred = upsample_mask(logits[b], target.shape)
            area = max(int(pred.sum()), 1)
            on_others = np.logical_or.reduce(others) if others else np.zeros_like(target)
            a = acc[s.kind]
            a["n"] += 1
            a["group size"] += len(group)
            a["target in its group"] += s.ann_id in group
            a["share on target"] += (pred & target).sum() / area
            a["share on other members"] += (pred & on_others).sum() / area
            ious = [i / max(u, 1) for i, u in (intersection_union(pred, m) for m in [target] + others)]
            if ious[0] >= 0.5:
                outcome = "is target"
            elif max(ious[1:], default=0) >= 0.5:
                outcome = "is another member"
            elif (pred & (target | on_others)).sum() / area >= 0.5:
                outcome = "spread over group"
            else:
                outcome = "other"
            a[outcome] += 1
    return {kind: {k: round(a[k] / a["n"], 4) if k != "n" else int(a[k]) for k in ("n",) + WHERE_KEYS}
            for kind, a in acc.items()}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the distributions along the last dim."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


class EscapeProbe:
    """Attaches to a :class:`~crformer.train.Trainer` and writes the records of the module docstring."""

    def __init__(self, trainer, path: Path, every: int):
        self.trainer, self.path, self.every = trainer, path, every
        self.recording, self.sq, self.spread = False, defaultdict(float), {}
        self.query_softmax, self.qgm_softmax = None, None
        model = trainer.model
        model.mask_head.confidence.register_forward_hook(self._on_confidence)
        model.qgm.spatial.register_forward_hook(self._on_qgm_maps)
        model.qgm.register_forward_hook(self._on_queries("qgm"))
        model.decoder.register_forward_hook(self._on_queries("decoder", last=True))
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._grad_hook(name.split(".")[0]))
        self._train_step, trainer.train_step = trainer.train_step, self.train_step
        self._log, trainer.log = trainer.log, self.log

    def _grad_hook(self, module: str):
        def hook(p):
            if self.recording:
                self.sq[module] += float(p.grad.detach().double().pow(2).sum())
        return hook

    def _on_confidence(self, module, inputs, output):
        if self.recording and self.query_softmax is None:  # the first call of a step: the final layer
            self.query_softmax = output.detach().float().squeeze(-1).softmax(dim=1)

    def _on_qgm_maps(self, module, inputs, output):
        if self.recording:
            self.qgm_softmax = output.detach().float().flatten(2).softmax(dim=-1)

    def _on_queries(self, name: str, last: bool = False):
        def hook(module, inputs, output):
            if self.recording:
                q = (output[0][-1] if last else output).detach().float()  # B×N_q×D
                self.spread[name] = float(q.std(1).mean() / q.mean(1).std(0).mean())
        return hook

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(self, batch):
        self.recording = (self.trainer.step + 1) % self.every == 0
        if not self.recording:
            return self._train_step(batch)
        self.sq.clear()
        self.query_softmax = self.qgm_softmax = None
        terms = self._train_step(batch)
        self.recording = False
        w, maps = self.query_softmax, self.qgm_softmax
        entropy, qgm_entropy = _entropy(w), _entropy(maps).mean(1)
        kinds = [self.trainer.train_set.samples[i].kind for i in batch.index.tolist()]
        by_kind = {}
        for kind in sorted(set(kinds)):
            sel = torch.tensor([k == kind for k in kinds])
            by_kind[kind] = {"n": int(sel.sum()), "query entropy": round(float(entropy[sel].mean()), 4),
                             "top query weight": round(float(w[sel].max(1).values.mean()), 4),
                             "qgm entropy": round(float(qgm_entropy[sel].mean()), 4)}
        self._write({"step": self.trainer.step, "by_kind": by_kind, "loss": terms,
                     "query spread": {k: float(f"{v:.4g}") for k, v in self.spread.items()},
                     "grad_norm": {k: float(f"{math.sqrt(v):.4g}") for k, v in sorted(self.sq.items())}})
        return terms

    def log(self, record: dict) -> None:
        self._log(record)
        if "val" not in record:
            return
        tr, states = self.trainer, (torch.get_rng_state(), np.random.get_state(), random.getstate())
        was_training = tr.model.training
        tr.model.eval()
        try:
            with torch.no_grad():
                where = where_masks_lie(tr.model, tr.refer, tr.cfg, tr.tokenizer)
        finally:
            tr.model.train(was_training)
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
        self._write({"epoch": record["epoch"], "val_hard": record["val"]["val_hard"],
                     "val_by_kind": record["val_by_kind"]["val_hard"], "where masks lie": where})


def main(argv=None) -> None:
    p = parser("python -m crformer_studies.escape_probe", __doc__)
    p.add_argument("--out", required=True, help="folder for probe.jsonl and the run (run/)")
    p.add_argument("--every", type=int, default=20, help="record every N steps (default 20)")
    config_args(p)
    a = p.parse_args(argv)
    quiet_libraries()
    from crformer.train import Trainer

    out = Path(a.out)
    cfg = load_config(a.config, a.overrides + [f"train.out_dir={out / 'run'}"])
    trainer = Trainer(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.jsonl").unlink(missing_ok=True)
    EscapeProbe(trainer, out / "probe.jsonl", a.every)
    trainer.fit()


if __name__ == "__main__":
    run(main)
