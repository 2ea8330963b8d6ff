"""Configuration: nested defaults, a YAML file on top, then ``key=value`` overrides.

Every key a config file or override names must exist in :data:`DEFAULTS` (an unknown key is a
:class:`~crformer.errors.UserError` naming it), so a typo never silently trains the wrong model.
Values given on the command line are parsed as YAML scalars (``model.num_queries=1``,
``model.calibration=false``, ``model.backbone.depths=[2,2,2,2]``).
"""

from __future__ import annotations

import copy
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from crformer.errors import UserError
from crformer.ops.attention import BACKENDS

DEFAULTS: dict[str, Any] = {
    "data": {
        "format": "refer",             # refer (REFER folder) | hf-parquet (a Hugging Face parquet release)
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
        "one_attr_fraction": 1.0,      # synthetic: share of the one-attribute-only objects each epoch trains on
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
        "position_frequencies": 3,     # pixel decoder: sin/cos coordinate channels at 2^k·π, k < F, beside x/y
        "value_positions": False,      # decoder cross-attention: the memory's sine positions in the values too (paper: keys only)
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
        "query_weight": 0.0,           # optional: the best single query's mask loss (models.losses.best_query_loss)
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
        "lr_hold": 0.5714,             # fraction of the run at the peak lr before the poly decay starts (4 of 7 epochs)
        "grad_clip": 1.0,
        "amp": "auto",                 # auto (bf16 where the device has bf16 kernels: CUDA, AVX-512/AMX CPUs) | bf16 | none
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
        "amp": "auto",                 # inference precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | none
    },
}


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise UserError(f"unknown config key {quote(path)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config key '{path}' is a section; got {quote(value)}")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value


def quote(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error lines stay one short line whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


#: A config file larger than this is not a config (the defaults fit in 4 KiB).
MAX_CONFIG_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """YAML for configs: anchors and aliases are refused (nested aliases expand a few hundred bytes
    into gigabytes), and so is a key given twice in one mapping (YAML would keep the last silently)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError(f"anchors and aliases are not allowed in configs (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(f"key {quote(key)} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse config YAML with :class:`_StrictLoader`; errors are ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> dict:
    """``a.b.c=value`` → ``{'a': {'b': {'c': value}}}`` with the value parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override must look like key=value, got {quote(text)}")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw else None
    except yaml.YAMLError as e:
        raise UserError(f"override {quote(text)}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
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


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML config file; UserError if it is missing, not a regular file (a FIFO would
    block), too large, not UTF-8, not valid strict YAML (:class:`_StrictLoader`) or not a mapping."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise UserError(f"config file not found: {p}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"config file {p} is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {p} is {st.st_size} bytes; a config is at most {MAX_CONFIG_BYTES}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror or e}") from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at top level")
    return data


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults ← YAML file ``path`` ← overrides; returns a fresh nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        _merge(cfg, read_config_file(path))
    for o in overrides:
        _merge(cfg, parse_override(o))
    validate_config(cfg)
    return cfg


#: Keys that checkpoints written before them lack, with the value that reproduces how those checkpoints
#: were trained (the default has changed since: the key's arrival, or a later change of the default).
PRE_KEY_VALUES: dict = {
    ("model", "mask_stride"): 4,
    ("model", "position_frequencies"): 0,
    ("train", "lr_hold"): 0.0,
}


#: Where a run writes: never taken from a checkpoint's config (a file someone handed over must not
#: choose where files land); the defaults, the folder given by the caller, or the user's overrides.
WRITE_PATH_KEYS = (("train", "out_dir"), ("data", "cache_dir"))
#: How much data a run generates: a checkpoint's value above the default is used only when the user
#: passes it again (a checkpoint could otherwise ask for hours of generation).
GENERATED_SIZE_KEYS = (("data", "synthetic", "train_images"), ("data", "synthetic", "eval_samples"))


def _get(cfg: dict, keys: tuple) -> Any:
    for k in keys:
        cfg = cfg.get(k, {}) if isinstance(cfg, dict) else {}
    return cfg


def merge_config(cfg: dict, overrides: list[str] | tuple = (), out_dir: str | None = None) -> dict:
    """The config of a checkpoint, ``cfg``, made safe to run: keys it lacks take the current defaults
    (except :data:`PRE_KEY_VALUES`, which rebuild the model as it was before the key existed), the
    folders it would write to (:data:`WRITE_PATH_KEYS`) are the defaults, or ``out_dir`` for
    ``train.out_dir``, generated-data sizes above the defaults (:data:`GENERATED_SIZE_KEYS`) must be
    passed again, and ``key=value`` overrides apply last."""
    out = copy.deepcopy(DEFAULTS)
    for (section, key), value in PRE_KEY_VALUES.items():
        if key not in cfg.get(section, {}):
            out[section][key] = value
    _merge(out, copy.deepcopy(cfg))
    for section, key in WRITE_PATH_KEYS:
        out[section][key] = DEFAULTS[section][key]
    if out_dir is not None:
        out["train"]["out_dir"] = str(out_dir)
    given = [parse_override(o) for o in overrides]
    for o in given:
        _merge(out, o)
    for keys in GENERATED_SIZE_KEYS:
        value, default = _get(out, keys), _get(DEFAULTS, keys)
        passed = any(_get(o, keys[:-1]) and keys[-1] in _get(o, keys[:-1]) for o in given)
        if _is_num(value) and value > default and not passed:
            name = ".".join(keys)
            raise UserError(f"the checkpoint's config asks for {name}={quote(value)} (default {default}); pass "
                            f"{name}={quote(value)} to generate that many")
    validate_config(out)
    return out


# ---------------------------------------------------------------------------------------------- checks
# Each key of DEFAULTS has a rule: (what the value must be, test). Values are checked when a config is
# made, before data, model or output folder exist, so a bad value never costs a minute of work.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: The bound of an integer setting that has no smaller one of its own (a count, a size, a seed).
INT_MAX = 2**31 - 1


def _int(lo: int, hi: int = INT_MAX):
    what = f"an integer ≥ {lo}" if hi == INT_MAX else f"an integer in [{lo}, {hi}]"
    return what, lambda v: _is_int(v) and lo <= v <= hi


def _num(lo: float, strict: bool = False, hi: float | None = None, hi_closed: bool = False):
    what = f"a number {'>' if strict else '≥'} {lo:g}"
    if hi is not None:
        what += f" and {'≤' if hi_closed else '<'} {hi:g}"
    return what, lambda v: (_is_num(v) and (v > lo if strict else v >= lo)
                            and (hi is None or (v <= hi if hi_closed else v < hi)))


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
_PATH = ("a non-empty path of at most 4096 characters, each part at most 255",
         lambda v: isinstance(v, str) and v.strip() != "" and len(v) <= 4096
         and all(len(part) <= 255 for part in v.split("/")))

RULES: dict[str, tuple] = {
    "data.format": _one_of("refer", "hf-parquet"),
    "data.dataset": _NAME, "data.root": _optional(_PATH), "data.split_by": _NAME, "data.train_split": _NAME,
    "data.val_splits": _list_of(_NAME), "data.test_splits": _list_of(_NAME, 0),
    "data.image_size": ("a multiple of 32 in [32, 4096] (Swin's coarsest stage has stride 32)",
                        lambda v: _is_int(v) and 32 <= v <= 4096 and v % 32 == 0),
    "data.max_tokens": _int(3, 512), "data.image_dir": _optional(_PATH), "data.cache_dir": _PATH,
    "data.preload": _BOOL, "data.one_attr_fraction": _num(0, hi=1, hi_closed=True), "data.num_workers": _int(0),
    # Generated data: bounded so that no config (a checkpoint's included) asks for days of generation.
    "data.synthetic.seed": _int(0), "data.synthetic.size": _int(16, 1024),
    "data.synthetic.train_images": _int(1, 1_000_000), "data.synthetic.eval_samples": _int(1, 100_000),
    "model.text_encoder": _PATH, "model.text_finetune": _BOOL, "model.text_trainable_layers": _int(-1),
    "model.backbone.name": _NAME, "model.backbone.embed_dim": _optional(_int(1)),
    "model.backbone.depths": _optional(_list_of(_int(1), 4)), "model.backbone.num_heads": _optional(_list_of(_int(1), 4)),
    "model.backbone.window_size": _optional(_int(1)), "model.backbone.patch_size": _optional(_int(1)),
    "model.backbone.drop_path_rate": _optional(_num(0, hi=1)), "model.backbone.weights": _optional(_PATH),
    "model.vlf_heads": _int(1), "model.d_model": _int(1), "model.num_queries": _int(1),
    "model.num_decoder_layers": _int(1), "model.num_heads": _int(1), "model.ffn_dim": _int(1),
    "model.memory_strides": _list_of(_one_of(4, 8, 16, 32)), "model.mask_stride": _one_of(1, 2, 4),
    "model.position_frequencies": _int(0, 8), "model.value_positions": _BOOL,
    "model.calibration": _BOOL, "model.lrm": _BOOL,
    "model.lrm_input": _one_of("calibrated", "pre_calibration"), "model.attn_backend": _one_of("auto", *BACKENDS),
    "model.fold_decoder_attention": _BOOL, "model.grad_checkpointing": _BOOL,
    "loss.aux_weight": _num(0), "loss.dice_weight": _num(0), "loss.rec_weight": _num(0),
    "loss.rec_sentence_weight": _num(0), "loss.query_weight": _num(0),
    "train.epochs": _int(1), "train.batch_size": _int(1), "train.grad_accum": _int(1),
    "train.compile": _one_of("none", "default", "max-autotune"), "train.cuda_graphs": _BOOL,
    "train.lr": _num(0, strict=True),
    "train.backbone_lr": _optional(_num(0, strict=True)), "train.text_lr": _num(0), "train.weight_decay": _num(0),
    "train.warmup_iters": _int(0), "train.poly_power": _num(0), "train.lr_hold": _num(0, hi=1),
    "train.grad_clip": _num(0),
    "train.amp": _one_of("auto", "bf16", "none"), "train.seed": _int(0), "train.out_dir": _PATH,
    "train.log_every": _int(1), "train.num_threads": _int(0), "train.max_steps": _int(0),
    "train.checkpoint_every": _int(0),
    "eval.protocol": _one_of("original", "lavt"), "eval.batch_size": _int(1), "eval.language_check": _BOOL,
    "eval.compile": _one_of("none", "default", "max-autotune"), "eval.amp": _one_of("auto", "bf16", "none"),
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
            raise UserError(f"config {key} must be {what}; got {quote(value)}")
    d = cfg["data"]
    overlap = sorted(set(d["val_splits"]) & set(d["test_splits"]) | {d["train_split"]} & set(d["test_splits"]))
    if overlap:
        raise UserError(f"config data.test_splits must not also be a training or selection split: {overlap[0]!r}")
    m = cfg["model"]
    if m["d_model"] % m["num_heads"]:
        raise UserError(f"config model.d_model={m['d_model']} must be divisible by model.num_heads={m['num_heads']}")
