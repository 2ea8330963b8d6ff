"""Configuration: nested defaults, a YAML file on top, then ``key=value`` overrides.

Every key a config file or override names must exist in :data:`DEFAULTS` (an unknown key is a
:class:`~crformer.errors.UserError` naming it), so a typo never silently trains the wrong model.
Values given on the command line are parsed as YAML scalars (``model.num_queries=1``,
``model.calibration=false``, ``model.backbone.depths=[2,2,2,2]``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from crformer.errors import UserError

DEFAULTS: dict[str, Any] = {
    "data": {
        "dataset": "synthetic",        # refcoco | refcoco+ | refcocog | synthetic | any REFER folder
        "root": None,                  # REFER root; synthetic: generated into cache_dir when null
        "split_by": "unc",             # unc | umd | google
        "train_split": "train",
        "val_splits": ["val_easy", "val_hard"],
        "image_size": 64,              # images resized to S×S
        "max_tokens": 20,              # sentences padded/truncated to this many tokens
        "image_dir": None,             # default: REFER convention for the dataset
        "cache_dir": "~/.cache/crformer",
        "preload": True,               # decode and resize all images once (small datasets)
        "num_workers": 0,
        "synthetic": {"seed": 0, "size": 64, "train_images": 3000, "eval_samples": 300},
    },
    "model": {
        "text_encoder": "minilm",      # a local HF BERT-family folder, or "minilm" (the embedded one)
        "text_finetune": False,        # False: frozen encoder, each unique sentence encoded once
        "text_trainable_layers": -1,   # when fine-tuning: train the last k layers (-1 = all)
        "backbone": {
            "name": "swin_tiny_patch4_window7_224",  # any timm Swin; the fields below override it
            "embed_dim": 48,
            "depths": [2, 2, 2, 2],
            "num_heads": [2, 4, 8, 16],
            "window_size": 4,
            "patch_size": 4,
            "drop_path_rate": 0.1,
            "weights": None,           # local checkpoint file (timm's filter maps key names)
        },
        "vlf_heads": 1,
        "d_model": 128,                # D (paper configs: 256)
        "num_queries": 16,             # N_q
        "num_decoder_layers": 3,       # N_d
        "num_heads": 4,
        "ffn_dim": 512,
        "memory_strides": [32, 16, 8],  # decoder memories, coarse first, cycled by the layers
        "mask_stride": 2,              # 4: masks at the finest backbone level (paper); 2/1: + image stem
        "calibration": True,           # False: a plain decoder (ablation)
        "lrm": True,                   # Language Reconstruction Module (training only)
        "attn_backend": "auto",        # auto | reference | sdpa | triton | xformers
        "fold_decoder_attention": False,  # same function, projections folded into the queries (§3)
    },
    "loss": {
        "aux_weight": 0.5,             # weight of each auxiliary decoder-layer mask loss
        "dice_weight": 1.0,
        "rec_weight": 0.1,             # λ, reconstruction loss
        "rec_sentence_weight": 0.0,    # optional sentence-level term of L_rec
    },
    "train": {
        "epochs": 5,
        "batch_size": 32,              # global batch (split over DDP ranks)
        "lr": 1e-3,
        "backbone_lr": None,           # null: same as lr
        "text_lr": 1e-5,
        "weight_decay": 1e-2,
        "warmup_iters": 100,
        "poly_power": 0.9,
        "grad_clip": 1.0,
        "amp": "bf16",                 # auto (bf16 on CUDA only) | bf16 | none
        "seed": 0,
        "out_dir": "runs/default",
        "log_every": 20,
        "num_threads": 0,              # CPU threads (0: torch default)
        "max_steps": 0,                # stop (with a resumable checkpoint) after this many steps; 0 = all
        "checkpoint_every": 0,         # also write last.pt every N steps (0 = at epoch ends only)
    },
    "eval": {
        "protocol": "original",        # original (prediction at image size) | lavt (also S×S)
        "batch_size": 64,
        "language_check": True,        # swap each sentence for another object's in the same image
    },
}


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise UserError(f"unknown config key '{path}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config key '{path}' is a section; got {value!r}")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value


def parse_override(text: str) -> dict:
    """``a.b.c=value`` → ``{'a': {'b': {'c': value}}}`` with the value parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override must look like key=value, got '{text}'")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; the user meant a number
        try:
            value = float(value)
        except ValueError:
            pass
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults ← YAML file ``path`` ← overrides; returns a fresh nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must hold a mapping at top level")
        _merge(cfg, data)
    for o in overrides:
        _merge(cfg, parse_override(o))
    return cfg


#: Keys added after checkpoints already existed, with the value that reproduces the model those
#: checkpoints were trained with (their default changed when the key arrived).
PRE_KEY_VALUES: dict = {("model", "mask_stride"): 4}


def merge_config(cfg: dict, overrides: list[str] | tuple = ()) -> dict:
    """A copy of ``cfg`` (e.g. from a checkpoint) with ``key=value`` overrides applied. Keys the saved
    config lacks take the current defaults, except :data:`PRE_KEY_VALUES`, which take the value
    that rebuilds the model as it was before the key existed."""
    out = copy.deepcopy(DEFAULTS)
    for (section, key), value in PRE_KEY_VALUES.items():
        if key not in cfg.get(section, {}):
            out[section][key] = value
    _merge(out, copy.deepcopy(cfg))
    for o in overrides:
        _merge(out, parse_override(o))
    return out
