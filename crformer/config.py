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
from crformer.ops.attention import BACKENDS

DEFAULTS: dict[str, Any] = {
    "data": {
        "dataset": "synthetic",        # refcoco | refcoco+ | refcocog | synthetic | any REFER folder
        "root": None,                  # REFER root; synthetic: generated into cache_dir when null
        "split_by": "unc",             # unc | umd | google
        "train_split": "train",
        "val_splits": ["val_easy", "val_hard"],  # evaluated every epoch; best.pt is chosen on them
        "test_splits": [],             # read once, by the final report from best.pt (never for selection)
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
        "lrm_input": "calibrated",     # LRM reads: calibrated (last layer's output) | pre_calibration (before it)
        "attn_backend": "auto",        # auto or a name in crformer.ops.BACKENDS (reference, sdpa, triton...)
        "fold_decoder_attention": False,  # same function, projections folded into the queries (docs/DESIGN.md §3)
        "grad_checkpointing": False,   # recompute Swin stages and decoder layers in backward: less memory
    },
    "loss": {
        "aux_weight": 0.5,             # weight of each auxiliary decoder-layer mask loss
        "dice_weight": 1.0,
        "rec_weight": 0.1,             # λ, reconstruction loss
        "rec_sentence_weight": 0.0,    # optional sentence-level term of L_rec
    },
    "train": {
        "epochs": 7,
        "batch_size": 32,              # global batch = micro-batch × grad_accum × DDP ranks
        "grad_accum": 1,               # micro-batches per optimizer step (same update as the whole batch)
        "compile": "none",             # none | default | max-autotune: torch.compile of model + loss
        "cuda_graphs": False,          # CUDA only: replay the compiled step from CUDA graphs
        "lr": 1e-3,
        "backbone_lr": None,           # pretrained Swin weights (not the new VLF modules); null: lr
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
        "compile": "none",             # evaluate / predict / Segmenter: none | default | max-autotune
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
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
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
    validate_config(cfg)
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
    validate_config(out)
    return out


# ---------------------------------------------------------------------------------------------- checks
# Each key of DEFAULTS has a rule: (what the value must be, test). Values are checked when a config is
# made, before data, model or output folder exist, so a bad value never costs a minute of work.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN fails


def _int(lo: int, hi: int | None = None):
    what = f"an integer ≥ {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return what, lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi)


def _num(lo: float, strict: bool = False, hi: float | None = None):
    what = f"a number {'>' if strict else '≥'} {lo:g}" + (f" and < {hi:g}" if hi is not None else "")
    return what, lambda v: (_is_num(v) and (v > lo if strict else v >= lo) and (hi is None or v < hi))


def _one_of(*choices):
    return "one of " + ", ".join(map(str, choices)), lambda v: v in choices and not isinstance(v, bool)


def _optional(rule):
    what, test = rule
    return f"null or {what}", lambda v: v is None or test(v)


def _list_of(rule, min_len: int = 1):
    what, test = rule
    return f"a list of at least {min_len}, each {what}", \
        lambda v: isinstance(v, list) and len(v) >= min_len and all(test(x) for x in v)


_BOOL = ("true or false", lambda v: isinstance(v, bool))
_NAME = ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "" and v.strip() == v)
_PATH = ("a non-empty path", lambda v: isinstance(v, str) and v.strip() != "")

RULES: dict[str, tuple] = {
    "data.dataset": _NAME, "data.root": _optional(_PATH), "data.split_by": _NAME, "data.train_split": _NAME,
    "data.val_splits": _list_of(_NAME), "data.test_splits": _list_of(_NAME, 0),
    "data.image_size": ("a multiple of 32, at least 32 (Swin's coarsest stage has stride 32)",
                        lambda v: _is_int(v) and v >= 32 and v % 32 == 0),
    "data.max_tokens": _int(3, 512), "data.image_dir": _optional(_PATH), "data.cache_dir": _PATH,
    "data.preload": _BOOL, "data.num_workers": _int(0),
    "data.synthetic.seed": _int(0), "data.synthetic.size": _int(16), "data.synthetic.train_images": _int(1),
    "data.synthetic.eval_samples": _int(1),
    "model.text_encoder": _PATH, "model.text_finetune": _BOOL, "model.text_trainable_layers": _int(-1),
    "model.backbone.name": _NAME, "model.backbone.embed_dim": _optional(_int(1)),
    "model.backbone.depths": _optional(_list_of(_int(1), 4)), "model.backbone.num_heads": _optional(_list_of(_int(1), 4)),
    "model.backbone.window_size": _optional(_int(1)), "model.backbone.patch_size": _optional(_int(1)),
    "model.backbone.drop_path_rate": _optional(_num(0, hi=1)), "model.backbone.weights": _optional(_PATH),
    "model.vlf_heads": _int(1), "model.d_model": _int(1), "model.num_queries": _int(1),
    "model.num_decoder_layers": _int(1), "model.num_heads": _int(1), "model.ffn_dim": _int(1),
    "model.memory_strides": _list_of(_one_of(4, 8, 16, 32)), "model.mask_stride": _one_of(1, 2, 4),
    "model.calibration": _BOOL, "model.lrm": _BOOL,
    "model.lrm_input": _one_of("calibrated", "pre_calibration"), "model.attn_backend": _one_of("auto", *BACKENDS),
    "model.fold_decoder_attention": _BOOL, "model.grad_checkpointing": _BOOL,
    "loss.aux_weight": _num(0), "loss.dice_weight": _num(0), "loss.rec_weight": _num(0),
    "loss.rec_sentence_weight": _num(0),
    "train.epochs": _int(1), "train.batch_size": _int(1), "train.grad_accum": _int(1),
    "train.compile": _one_of("none", "default", "max-autotune"), "train.cuda_graphs": _BOOL,
    "train.lr": _num(0, strict=True),
    "train.backbone_lr": _optional(_num(0, strict=True)), "train.text_lr": _num(0), "train.weight_decay": _num(0),
    "train.warmup_iters": _int(0), "train.poly_power": _num(0), "train.grad_clip": _num(0),
    "train.amp": _one_of("auto", "bf16", "none"), "train.seed": _int(0), "train.out_dir": _PATH,
    "train.log_every": _int(1), "train.num_threads": _int(0), "train.max_steps": _int(0),
    "train.checkpoint_every": _int(0),
    "eval.protocol": _one_of("original", "lavt"), "eval.batch_size": _int(1), "eval.language_check": _BOOL,
    "eval.compile": _one_of("none", "default", "max-autotune"),
}


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def validate_config(cfg: dict) -> None:
    """Type and range of every value (:data:`RULES`); the first bad one is a UserError naming the
    key, what it must be and what it got."""
    for key, value in _leaves(cfg):
        what, ok = RULES[key]
        if not ok(value):
            raise UserError(f"config {key} must be {what}; got {value!r}")
    d = cfg["data"]
    overlap = sorted(set(d["val_splits"]) & set(d["test_splits"]) | {d["train_split"]} & set(d["test_splits"]))
    if overlap:
        raise UserError(f"config data.test_splits must not also be a training or selection split: {overlap[0]!r}")
    m = cfg["model"]
    if m["d_model"] % m["num_heads"]:
        raise UserError(f"config model.d_model={m['d_model']} must be divisible by model.num_heads={m['num_heads']}")
