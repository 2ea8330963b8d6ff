"""Language-fidelity study: the paper's ablations on the synthetic benchmark, with a per-layer probe.

``python -m crformer.ablate`` trains every variant below for every seed (a small, fast setting:
:data:`STUDY`), evaluates each on the easy and hard validation splits, probes how much of the
sentence the queries of each decoder layer still carry, and writes into ``--out``
(default ``docs/ablations``): one JSON per run under ``runs/``, ``results.json`` (the aggregate),
``tables.md`` and the plots ``metrics.png``, ``curves.png`` (val mIoU after every epoch) and
``probe.png``. Finished runs are skipped, so an interrupted study continues where it stopped;
``--report-only`` rebuilds tables and plots from the run files alone.
The training machinery (:class:`Run`, :func:`unfinished`, :func:`train_runs`) also serves the seed
sweep of the default run, :mod:`crformer.sweep`.

The probe (:func:`probe_layers`): for each layer ℓ (0 = the QGM's queries, 1…N_d = the decoder
layers) the queries are mean-pooled into one D-vector per sample, in two states of every decoder
layer: after its FFN, before the calibration attention over the original words (``pre``), and after
the calibration (``calibrated``, the layer's output), so the probe separates what the decoder keeps
from what the calibration re-injects. A plain decoder has one state (its output); it is reported
once. Linear read-outs are fitted on the
validation splits and scored on the test splits (never the same sentences): a multinomial logistic
regression for the colour word, the shape word and the spatial word ("leftmost", "left of", …) of
the sentence (each with a ``none`` class), and a ridge regression to the frozen text encoder's
mean-pooled sentence feature (scored by R²). If calibration keeps the language alive,
these stay high with depth; if a plain decoder lets it fade, they drop.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crformer.config import load_config
from crformer.data.dataset import Collate, RefDataset
from crformer.data.synthetic import COLORS, RELATIONS, SHAPES, SUPERLATIVES
from crformer.engine import autocast_context, evaluate_split
from crformer.errors import UserError
from crformer.ops import masked_pool

#: Variant name → config overrides. ``crformer-nq16`` is the full model. ``plain`` (N_q = 1, as in
#: the earlier studies) changes N_q too; ``plain-nq16`` is the plain decoder alone. ``lrm-pre-calibration``
#: is the full model with the LRM reading the last layer before its calibration.
VARIANTS: dict = {
    "crformer-nq16": ["model.num_queries=16"],
    "crformer-nq4": ["model.num_queries=4"],
    "crformer-nq1": ["model.num_queries=1"],
    "no-calibration": ["model.num_queries=16", "model.calibration=false"],
    "no-lrm": ["model.num_queries=16", "model.lrm=false"],
    "lrm-pre-calibration": ["model.num_queries=16", "model.lrm_input=pre_calibration"],
    "plain-nq16": ["model.num_queries=16", "model.calibration=false", "model.lrm=false"],
    "plain": ["model.num_queries=1", "model.calibration=false", "model.lrm=false"],
}

#: The study's setting on top of the default config: the default model (64² images), 2,000 training
#: scenes instead of 3,000 and 6 epochs (1,044 steps of batch 32, 3× the 348 of the first studies),
#: two runs at a time, one thread each (small CPU ops scale poorly across threads, and one thread
#: makes a run's numbers independent of the machine's core count).
STUDY: list = [
    "data.synthetic.train_images=2000",
    "train.epochs=6",
    "train.num_threads=1",
    "eval.language_check=false",
]

#: The probed states of a decoder layer (``probe[state]``): after calibration (the layer's output) and
#: after the FFN, before calibration. A plain decoder has only the first.
PROBE_STATES = ("calibrated", "pre")
PROBE_STATE_LABELS = {"calibrated": "after calibration (output)", "pre": "after FFN, before calibration",
                      "plain": "output (no calibration: one state)"}

PROBE_WORDS = {
    "colour": list(COLORS),
    "shape": list(SHAPES),
    "spatial": list(SUPERLATIVES) + list(RELATIONS),
}
METRIC_SPLITS = ("val_easy", "val_hard")
PROBE_FIT_SPLITS = ("val_easy", "val_hard")
PROBE_TEST_SPLITS = ("test_easy", "test_hard")


def word_label(sentence: str, words: list) -> int:
    """Index of the first of ``words`` in ``sentence`` (whole words), or ``len(words)`` (= none)."""
    padded = f" {sentence.lower()} "
    hits = [(padded.find(f" {w} "), i) for i, w in enumerate(words) if f" {w} " in padded]
    return min(hits)[1] if hits else len(words)


def _state_modules(model) -> dict:
    """``{state: [module whose output is that state, per layer]}`` (layer 0 = the QGM): the calibration
    sublayer's output is the layer's output, the FFN's the state before calibration."""
    layers = model.decoder.layers
    if any(layer.calibration is None for layer in layers):
        return {"calibrated": [model.qgm] + [layer.ffn for layer in layers]}
    return {"calibrated": [model.qgm] + [layer.calibration for layer in layers],
            "pre": [model.qgm] + [layer.ffn for layer in layers]}


@torch.no_grad()
def layer_features(model, refer, splits, cfg: dict, tokenizer, device) -> tuple:
    """Mean-pooled queries of every layer, in every probed state, for all samples of ``splits``.

    Returns ``(feats, sentence, labels)``: feats {state: (N_d+1)×n×D} (layer 0 = QGM; ``pre`` only
    for a calibrated decoder), sentence n×C_l (the text encoder's mean-pooled words), labels
    {probe: n} word-class indices.
    """
    modules = _state_modules(model)
    captured: dict = {}

    def grab(key):
        return lambda m, i, o: captured.__setitem__(key, o.float().mean(1))

    hooks = [mod.register_forward_hook(grab((state, l)))
             for state, mods in modules.items() for l, mod in enumerate(mods)]
    was_training = model.training
    model.eval()
    per_layer = {key: [] for key in ((state, l) for state, mods in modules.items() for l in range(len(mods)))}
    sentences, labels = [], {k: [] for k in PROBE_WORDS}
    try:
        for split in splits:
            ds = RefDataset(refer, split, cfg["data"]["image_size"], train=False, preload=cfg["data"]["preload"])
            loader = torch.utils.data.DataLoader(ds, batch_size=cfg["eval"]["batch_size"], collate_fn=Collate(tokenizer))
            for batch in loader:
                captured.clear()
                batch = batch.to(device)
                ids, am = batch.input_ids, batch.attention_mask
                with autocast_context(device, cfg["eval"]["amp"]):
                    model(batch.images, ids, am)
                for key, store in per_layer.items():
                    store.append(captured[key].cpu())
                lang = model.text_encoder(ids, am.bool()).float()
                sentences.append(masked_pool(lang, am.bool()).cpu())
                for i in batch.index.tolist():
                    for name, words in PROBE_WORDS.items():
                        labels[name].append(word_label(ds.samples[i].sentence, words))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    feats = {state: torch.stack([torch.cat(per_layer[(state, l)]) for l in range(len(mods))]).double()
             for state, mods in modules.items()}
    return feats, torch.cat(sentences).double(), {k: torch.tensor(v) for k, v in labels.items()}


def _standardise(fit: torch.Tensor, test: torch.Tensor) -> tuple:
    mu, sd = fit.mean(0), fit.std(0).clamp_min(1e-6)
    return (fit - mu) / sd, (test - mu) / sd


def linear_probe_accuracy(x_fit, y_fit, x_test, y_test, num_classes: int, l2: float = 1e-2) -> float:
    """Multinomial logistic regression (L-BFGS, L2 ``l2``) fitted on (x_fit, y_fit); test accuracy."""
    x_fit, x_test = _standardise(x_fit, x_test)
    w = torch.zeros(x_fit.shape[1] + 1, num_classes, dtype=x_fit.dtype, requires_grad=True)
    ones = lambda x: torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # noqa: E731
    a_fit, a_test = ones(x_fit), ones(x_test)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a_fit @ w, y_fit) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(((a_test @ w).argmax(1) == y_test).double().mean())


def ridge_r2(x_fit, t_fit, x_test, t_test, l2: float = 10.0) -> float:
    """Ridge regression x → t fitted on the fit set; R² on the test set, 1 − Σ‖t − pred‖² / Σ‖t − t̄_fit‖²
    (1 = the sentence feature recovered exactly, 0 = no better than always predicting the mean
    sentence; cosine similarity is ≈ 0.99 for every layer of every variant on these short, similar
    sentences, so R² is the measure with room to move)."""
    x_fit, x_test = _standardise(x_fit, x_test)
    mu = t_fit.mean(0)
    a = x_fit.T @ x_fit + l2 * torch.eye(x_fit.shape[1], dtype=x_fit.dtype)
    w = torch.linalg.solve(a, x_fit.T @ (t_fit - mu))
    pred = x_test @ w + mu
    return float(1 - ((t_test - pred) ** 2).sum() / ((t_test - mu) ** 2).sum())


def _probe_scores(f_fit, s_fit, y_fit, f_test, s_test, y_test) -> dict:
    """``{"colour": [acc per layer], "shape": …, "spatial": …, "sentence_r2": […]}`` for features
    (N_d+1)×n×D of one state."""
    out = {name: [linear_probe_accuracy(f_fit[l], y_fit[name], f_test[l], y_test[name], len(words) + 1)
                  for l in range(len(f_fit))]
           for name, words in PROBE_WORDS.items()}
    out["sentence_r2"] = [ridge_r2(f_fit[l], s_fit, f_test[l], s_test) for l in range(len(f_fit))]
    return out


def probe_layers(model, refer, cfg: dict, tokenizer, device) -> dict:
    """Per-layer probe scores of every state: ``{"calibrated": {"colour": [acc per layer], "shape": …,
    "spatial": …, "sentence_r2": […]}, "pre": {…} (calibrated decoders only), "calibration": bool,
    "majority": {probe: test accuracy of the majority class}}``."""
    f_fit, s_fit, y_fit = layer_features(model, refer, PROBE_FIT_SPLITS, cfg, tokenizer, device)
    f_test, s_test, y_test = layer_features(model, refer, PROBE_TEST_SPLITS, cfg, tokenizer, device)
    out: dict = {state: _probe_scores(f_fit[state], s_fit, y_fit, f_test[state], s_test, y_test) for state in f_fit}
    out["calibration"] = "pre" in f_fit
    out["majority"] = {}
    for name, words in PROBE_WORDS.items():
        majority = torch.bincount(y_fit[name], minlength=len(words) + 1).argmax()
        out["majority"][name] = float((y_test[name] == majority).double().mean())
    return out


@dataclass
class Run:
    """One training run of the study or of the seed sweep (:mod:`crformer.sweep`).

    ``name``: its checkpoint folder under the work dir and its run file's stem; ``title``: how the
    progress lines call it; ``overrides``: ``key=value`` on top of the default config (the seed
    aside), recorded in the run file, which is retrained when they change; ``labels``: extra fields
    of the run file (the study's variant, the sweep's thread count); ``probe``: run
    :func:`probe_layers` on the final model.
    """

    name: str
    title: str
    seed: int
    overrides: list
    labels: dict = field(default_factory=dict)
    probe: bool = False


def train_and_measure(run: Run, work_dir: Path) -> dict:
    """Train ``run`` (checkpoints and log.jsonl in ``work_dir/run.name``); its run file's content: the
    final model's val metrics (easy/hard, overall and by kind, and the language check when
    ``eval.language_check`` is on), the trainer's per-epoch history, the probe if asked, timing."""
    from crformer.train import Trainer

    cfg = load_config(None, run.overrides + [f"train.seed={run.seed}", f"train.out_dir={work_dir / run.name}"])
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.fit()
    model, device = trainer.model, trainer.device
    metrics = {}
    for split in METRIC_SPLITS:
        r = evaluate_split(model, trainer.refer, split, cfg, trainer.tokenizer, device,
                           language_check=cfg["eval"]["language_check"])
        metrics[split] = {key: r[key] for key in ("overall", "by_kind", "language_check") if key in r}
    result = {**run.labels, "seed": run.seed, "overrides": run.overrides, "metrics": metrics}
    if run.probe:
        result["probe"] = probe_layers(model, trainer.refer, cfg, trainer.tokenizer, device)
    return {**result, "seconds": round(time.perf_counter() - start, 1), "steps": trainer.step,
            "history": trainer.history}


def run_and_save(run: Run, work_dir: str, path: str) -> dict:
    """:func:`train_and_measure`, its result written atomically to ``path`` (a worker-process entry point)."""
    from crformer.cli import quiet_libraries

    quiet_libraries()
    result = train_and_measure(run, Path(work_dir))
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def unfinished(runs: list, runs_dir: Path, force: bool = False) -> list:
    """The runs of ``runs`` to train: those without a run file ``runs_dir/<name>.json``, those whose
    file was made with other overrides, and with ``force`` all; says which are skipped and why."""
    todo = []
    for run in runs:
        path = runs_dir / f"{run.name}.json"
        if path.is_file() and not force:
            if json.loads(path.read_text()).get("overrides") == run.overrides:
                print(f"{run.title}: done already ({path})", flush=True)
                continue
            print(f"{run.title}: {path} was made with another setting; retraining", flush=True)
        todo.append(run)
    return todo


@contextlib.contextmanager
def _workers_environment(**values: str):
    """Set environment variables while worker processes start, which inherit them, and restore this
    process's afterwards. ``TQDM_DISABLE``: parallel runs' progress bars would interleave (the parent
    reports); tqdm reads it when it is imported, which a worker does before it takes a task."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def train_runs(runs: list, runs_dir: Path, work_dir: str, jobs: int) -> None:
    """Train ``runs``, ``jobs`` at a time, each in a spawned worker process (no state inherited from
    this one; a worker may train several runs in turn, each seeding itself and setting its thread
    count), each result written to ``runs_dir/<name>.json`` as soon as it finishes, so an interrupted
    study or sweep resumes with :func:`unfinished`."""
    if not runs:
        return
    ctx = multiprocessing.get_context("spawn")
    with _workers_environment(TQDM_DISABLE="1"), \
            concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_and_save, run, work_dir, str(runs_dir / f"{run.name}.json")): run for run in runs}
        for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            result = fut.result()
            m = result["metrics"]
            print(f"[{n}/{len(runs)}] {futures[fut].title}: val mIoU easy "
                  f"{100 * m['val_easy']['overall']['mIoU']:.2f}  hard {100 * m['val_hard']['overall']['mIoU']:.2f}"
                  f"  ({result['seconds']:.0f} s)", flush=True)


def study_run(variant: str, seed: int, overrides: list) -> Run:
    """The study's run of ``variant`` with ``seed``: :data:`STUDY`, the variant's overrides, then the user's."""
    return Run(f"{variant}-s{seed}", f"{variant} seed {seed}", seed, STUDY + VARIANTS[variant] + list(overrides),
               labels={"variant": variant}, probe=True)


def _mean_std(values: list) -> tuple:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


PROBES = list(PROBE_WORDS) + ["sentence_r2"]


def probe_states(run: dict) -> dict:
    """``{state: {probe: [score per layer]}}`` of a run file; files written before the probe read two
    states hold the layer outputs (the calibrated state) at the top level."""
    probe = run["probe"]
    if "calibrated" not in probe:
        return {"calibrated": {name: probe[name] for name in PROBES}}
    return {state: probe[state] for state in PROBE_STATES if state in probe}


def aggregate(runs: list) -> dict:
    """Mean ± std over seeds of every reported number, per variant (in VARIANTS order); the probe per
    state (``row["probe"][state][probe]`` = [(mean, std) per layer])."""
    out: dict = {}
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        row: dict = {"seeds": [r["seed"] for r in rs], "metrics": {}, "probe": {}}
        for split in METRIC_SPLITS:
            for key in ("oIoU", "mIoU"):
                row["metrics"][f"{split}/{key}"] = _mean_std([r["metrics"][split]["overall"][key] for r in rs])
            for kind in rs[0]["metrics"][split]["by_kind"]:
                if len(rs[0]["metrics"][split]["by_kind"]) > 1:
                    row["metrics"][f"{split}/{kind}/mIoU"] = _mean_std(
                        [r["metrics"][split]["by_kind"][kind]["mIoU"] for r in rs])
        states = [probe_states(r) for r in rs]
        for state in [s for s in PROBE_STATES if all(s in st for st in states)]:
            row["probe"][state] = {}
            for name in PROBES:
                per_seed = np.asarray([st[state][name] for st in states], dtype=float)  # seeds × layers
                row["probe"][state][name] = [_mean_std(per_seed[:, l]) for l in range(per_seed.shape[1])]
        if all("history" in r for r in rs):  # val mIoU after every epoch: when each variant learns
            row["curve"] = {"steps": [h["step"] for h in rs[0]["history"]]}
            for split in METRIC_SPLITS:
                per_seed = np.asarray([[h["val"][split]["mIoU"] for h in r["history"]] for r in rs], dtype=float)
                row["curve"][split] = [_mean_std(per_seed[:, e]) for e in range(per_seed.shape[1])]
        row["calibration"] = "model.calibration=false" not in rs[0]["overrides"]
        row["majority"] = rs[0]["probe"]["majority"]
        row["minutes_per_run"] = float(np.mean([r["seconds"] for r in rs])) / 60
        out[variant] = row
    return out


def _pm(ms: tuple, scale: float = 100.0) -> str:
    return f"{scale * ms[0]:.1f} ± {scale * ms[1]:.1f}"


def tables_markdown(agg: dict) -> str:
    """The metric table and the per-layer probe table, as markdown."""
    keys = list(next(iter(agg.values()))["metrics"])
    lines = ["Validation metrics (%, mean ± std over the seeds):", "",
             "| variant | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for v, row in agg.items():
        lines.append(f"| {v} | {len(row['seeds'])} | " + " | ".join(_pm(row["metrics"][k]) for k in keys) + " |")
    lines += ["", "Per-layer probe on the test splits (layer 0 = QGM queries; accuracy % / R² × 100, mean ± std "
              "over the seeds). Two states of each decoder layer: " + "; ".join(
                  f"`{PROBE_STATE_LABELS[s]}`" for s in PROBE_STATES) + ". A plain decoder has one state, its "
              f"output (`{PROBE_STATE_LABELS['plain']}`).", ""]
    lines.append("| variant | layer | state | " + " | ".join(PROBES) + " |")
    lines.append("|---|---|---|" + "---|" * len(PROBES))
    for v, row in agg.items():
        states = [s for s in PROBE_STATES if s in row["probe"]]
        for layer in range(len(row["probe"]["calibrated"]["colour"])):
            for state in states[:1] if layer == 0 else states:
                label = ("QGM queries" if layer == 0 else
                         PROBE_STATE_LABELS["plain" if not row["calibration"] else state])
                lines.append(f"| {v} | {layer} | {label} | " +
                             " | ".join(_pm(row["probe"][state][p][layer]) for p in PROBES) + " |")
    majority = next(iter(agg.values()))["majority"]
    lines += ["", "Majority-class accuracy of each word probe: " +
              ", ".join(f"{k} {100 * v:.1f}" for k, v in majority.items()) + "."]
    return "\n".join(lines) + "\n"


#: The study's contrasts, (what is tested, A, B): each claim as one difference A − B. At N_q = 16
#: calibration × LRM is a 2 × 2 design, so each of the two is tested with and without the other.
CONTRASTS = [
    ("calibration, LRM on", "crformer-nq16", "no-calibration"),
    ("calibration, LRM off", "no-lrm", "plain-nq16"),
    ("reconstruction loss (LRM), calibration on", "crformer-nq16", "no-lrm"),
    ("reconstruction loss (LRM), calibration off", "no-calibration", "plain-nq16"),
    ("both (full vs plain decoder, N_q = 16)", "crformer-nq16", "plain-nq16"),
    ("LRM reading the state before calibration", "lrm-pre-calibration", "crformer-nq16"),
    ("N_q = 16 vs 1", "crformer-nq16", "crformer-nq1"),
    ("N_q = 16 vs 4", "crformer-nq16", "crformer-nq4"),
    ("plain decoder, N_q = 16 vs 1", "plain-nq16", "plain"),
]


def _own_state(row: dict) -> str:
    """The state that shows what the decoder layers themselves keep: before calibration when there
    is one, else (plain decoder) the output."""
    return "pre" if "pre" in row["probe"] else "calibrated"


def _difference(a: tuple, na: int, b: tuple, nb: int) -> str:
    """A − B in points, ± the standard error of a difference of two means over seeds."""
    d, se = a[0] - b[0], (a[1] ** 2 / na + b[1] ** 2 / nb) ** 0.5
    return f"{100 * d:+.1f} ± {100 * se:.1f}"


def contrasts_markdown(agg: dict) -> str:
    """One row per contrast of :data:`CONTRASTS` whose two variants both ran: the difference of the
    seed means (A − B, points) ± its standard error, for the val mIoU of both splits and the last
    layer's sentence R² and spatial-word probe, in the decoder's own state and in its output."""
    cols = ["val_easy mIoU", "val_hard mIoU", "last layer R², own", "last layer spatial, own",
            "last layer R², output"]
    lines = ["Contrasts (A − B in points, ± standard error of the difference of the seed means; *own* = "
             "after the FFN, before calibration, or a plain decoder's output; *output* = after calibration):",
             "", "| contrast | A | B | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for what, a, b in CONTRASTS:
        if a not in agg or b not in agg:
            continue
        ra, rb = agg[a], agg[b]
        na, nb = len(ra["seeds"]), len(rb["seeds"])
        cells = [_difference(ra["metrics"][f"{s}/mIoU"], na, rb["metrics"][f"{s}/mIoU"], nb) for s in METRIC_SPLITS]
        for name, state in (("sentence_r2", None), ("spatial", None), ("sentence_r2", "calibrated")):
            sa, sb = state or _own_state(ra), state or _own_state(rb)
            cells.append(_difference(ra["probe"][sa][name][-1], na, rb["probe"][sb][name][-1], nb))
        lines.append(f"| {what} | {a} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, out: Path) -> None:
    """``metrics.png`` (val mIoU/oIoU per variant, error bars = std over seeds), ``curves.png`` (val
    mIoU after every epoch, when every run file has its history) and ``probe.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(agg)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.38
    for ax, key in zip(axes, ("mIoU", "oIoU")):
        for j, split in enumerate(METRIC_SPLITS):
            ms = [agg[v]["metrics"][f"{split}/{key}"] for v in variants]
            ax.bar(np.arange(len(variants)) + (j - 0.5) * width, [100 * m for m, _ in ms], width,
                   yerr=[100 * s for _, s in ms], capsize=3, label=split)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_title(f"val {key} (%), mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)

    if all("curve" in agg[v] for v in variants):
        fig, axes = plt.subplots(1, len(METRIC_SPLITS), figsize=(11, 4), sharey=True)
        for ax, split in zip(axes, METRIC_SPLITS):
            for j, v in enumerate(variants):
                ms = agg[v]["curve"][split]
                ax.errorbar(np.asarray(agg[v]["curve"]["steps"]) + 6 * (j - len(variants) / 2),
                            [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="o", capsize=2, label=v)
            ax.set_title(f"{split} mIoU (%) after each epoch, mean ± std over seeds", fontsize=9)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(PROBES), figsize=(4.4 * len(PROBES), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes, PROBES):
        for j, v in enumerate(variants):
            for state in [s for s in PROBE_STATES if s in agg[v]["probe"]]:
                ms = agg[v]["probe"][state][name]
                ax.errorbar(np.arange(len(ms)) + 0.04 * (j - len(variants) / 2), [100 * m for m, _ in ms],
                            yerr=[100 * s for _, s in ms], marker="o" if state == "calibrated" else "x",
                            ls="-" if state == "calibrated" else "--", color=colours[j % len(colours)],
                            capsize=2, label=v if state == "calibrated" else f"{v} (before calibration)")
        if name in agg[variants[0]]["majority"]:
            ax.axhline(100 * agg[variants[0]]["majority"][name], color="grey", ls=":", label="majority class")
        ax.set_title(f"{name} word probe (test acc. %)" if name != "sentence_r2"
                     else "sentence feature read-out (R² × 100)", fontsize=9)
        ax.set_xlabel("layer (0 = QGM); bars: std over seeds")
        ax.set_xticks(range(len(agg[variants[0]]["probe"]["calibrated"][name])))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("solid: layer output (after calibration; plain decoders: their only state), "
                 "dashed: after the FFN, before calibration", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=120)
    plt.close(fig)


def report(out: Path) -> dict:
    """Aggregate every run file under ``out/runs`` into results.json, tables.md and the plots."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not runs:
        raise UserError(f"no finished runs under {out / 'runs'}")
    agg = aggregate(runs)
    (out / "results.json").write_text(json.dumps(agg, indent=1))
    (out / "tables.md").write_text(tables_markdown(agg) + "\n" + contrasts_markdown(agg))
    plot(agg, out)
    return agg


def reprobe(out: Path, work_dir: Path) -> None:
    """Recompute the probe of every finished run from its final checkpoint (``work_dir/<run>/last.pt``,
    the model the run probed), e.g. after the probe changed; the metrics are kept."""
    from crformer.api import Segmenter
    from crformer.data import open_refer

    for path in sorted((out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        ckpt = work_dir / f"{run['variant']}-s{run['seed']}" / "last.pt"
        if not ckpt.is_file():
            raise UserError(f"no checkpoint {ckpt} for {path.name}: retrain it with --force")
        seg = Segmenter.from_checkpoint(ckpt, "cpu")
        if seg.cfg["train"]["num_threads"]:
            torch.set_num_threads(seg.cfg["train"]["num_threads"])
        run["probe"] = probe_layers(seg.model, open_refer(seg.cfg), seg.cfg, seg.tokenizer, seg.device)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(path)
        print(f"re-probed {path.name}", flush=True)


def int_list(text: str) -> list:
    """``--seeds 0,1,2`` → [0, 1, 2]."""
    return [int(t) for t in text.split(",")]


def _variant_list(text: str) -> list:
    names = text.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return names


def main(argv=None) -> None:
    from crformer.cli import quiet_libraries

    p = argparse.ArgumentParser(prog="python -m crformer.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/ablations", help="results folder (run files, tables, plots)")
    p.add_argument("--work-dir", default="runs/ablation", help="checkpoints and logs of the runs")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time (default 2)")
    p.add_argument("--force", action="store_true", help="retrain runs that already have a result file")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from run files")
    p.add_argument("--reprobe", action="store_true",
                   help="recompute the probes of finished runs from their checkpoints in --work-dir, then report")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on top of the study's")
    a = p.parse_args(argv)
    quiet_libraries()
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if a.reprobe:
        reprobe(out, Path(a.work_dir))
    elif not a.report_only:
        runs = [study_run(variant, seed, a.overrides) for variant in a.variants for seed in a.seeds]
        train_runs(unfinished(runs, out / "runs", a.force), out / "runs", a.work_dir, a.jobs)
    agg = report(out)
    print(tables_markdown(agg) + "\n" + contrasts_markdown(agg))
    print(f"wrote {out / 'results.json'}, {out / 'tables.md'} and the plots in {out}")


if __name__ == "__main__":
    from crformer.process import run

    run(main)
