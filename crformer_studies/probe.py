"""The language-fidelity probe of the study (:mod:`crformer_studies.ablation`).

:func:`probe_layers`: for each layer ℓ (0 = the QGM's queries, 1…N_d = the decoder layers) the
queries are mean-pooled into one D-vector per sample, in two states of every decoder layer: after
its FFN, before the calibration attention over the original words (``pre``), and after the
calibration (``calibrated``, the layer's output), so the probe separates what the decoder keeps
from what the calibration re-injects. A plain decoder has one state (its output); it is reported
once. Linear read-outs are fitted on the validation splits and scored on the test splits (never the
same sentences): a multinomial logistic regression for the colour word, the shape word and the
spatial word ("leftmost", "left of", …) of the sentence (each with a ``none`` class), and a ridge
regression to the frozen text encoder's mean-pooled sentence feature (scored by R²). If calibration
keeps the language alive, these stay high with depth; if a plain decoder lets it fade, they drop.
"""

from __future__ import annotations

import torch

from crformer.data.dataset import Collate, RefDataset
from crformer.data.synthetic import COLORS, RELATIONS, SHAPES, SUPERLATIVES
from crformer.engine import autocast_context
from crformer.ops import masked_pool


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
