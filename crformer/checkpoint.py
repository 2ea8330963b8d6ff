"""Checkpoints: atomic writes, data-only loading, and enough metadata to evaluate/predict without a
config file.

Loading never runs code: every ``.pt``/``.pth`` file (checkpoints, backbone weights) goes through
:func:`load_tensor_file`, i.e. ``torch.load(weights_only=True)``, which rebuilds tensors and plain
Python data only. What a checkpoint stores is chosen to fit that: RNG states are tensors, ints and
tuples (see :func:`rng_state`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

import crformer
from crformer.errors import UserError, first_line
from crformer.files import TEMP_PATTERN, atomic_write, regular_file


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{crformer.__version__}+{sha}" if sha else crformer.__version__


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` through :func:`~crformer.files.atomic_write`: a kill mid-save
    leaves the previous file intact; a full disk or an unwritable folder is a UserError."""
    with atomic_write(path, "checkpoint") as f:
        torch.save(obj, f)


def tensor_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors in ``state`` (key order): stored
    with a checkpoint and checked on load, so a flipped or truncated tensor is an error, not a score."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """:func:`save_atomic` of a checkpoint with the digest of its model tensors (``model_digest``)."""
    save_atomic({**payload, "model_digest": tensor_digest(payload["model"])}, path)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that a killed :func:`save_atomic` (``kill -9``, power loss) left in
    ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and TEMP_PATTERN.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


#: Checkpoints written before RNG states were stored as tensors hold numpy's Mersenne-Twister state
#: as an ndarray: these globals rebuild a plain array (no other class, no code), so they stay loadable.
_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
_LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
                         (_reconstruct, "numpy.core.multiarray._reconstruct"),
                         (_reconstruct, "numpy._core.multiarray._reconstruct")]


def load_tensor_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` to CPU: tensors and plain Python data only.

    A file whose pickle needs any other global (a class, ``os.system``...) is refused with a
    UserError naming that global, before anything in it runs. ``what`` names the file in messages
    ("checkpoint", "backbone weights")."""
    p = regular_file(path, what)
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS), warnings.catch_warnings():
            # torch warns about any pickle protocol but 2 before it reads a byte; the reader below refuses
            # whatever it cannot load as data, so the warning would only be a second line before our error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise UserError(f"refusing to load {what} {p}: it asks for the Python object {found.group(1)}, and "
                            "only tensors and plain data are loaded (a file that needs code can run code)") from None
        reason = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(e), re.S)
        if reason:  # torch's own first line is advice about torch.load's defaults, not what is wrong
            raise UserError(f"cannot read {what} {p}: not a file that torch.save wrote with tensors and plain data "
                            f"only ({' '.join(reason.group(1).split())})") from None
        raise UserError(f"cannot read {what} {p}: {first_line(e)}") from None
    except Exception as e:  # truncated, not a torch file, wrong format
        raise UserError(f"cannot read {what} {p}: {first_line(e)}") from None


#: What ``--resume`` needs beyond the weights: (entry, what it must be, test).
_RESUME_ENTRIES = (
    ("optimizer", "a dict", lambda v: isinstance(v, dict)),
    ("scheduler", "a dict", lambda v: isinstance(v, dict)),
    ("step", "an integer ≥ 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    ("best", "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    ("rng", "a non-empty list of RNG states", lambda v: isinstance(v, list) and v and all(isinstance(x, dict)
                                                                                          for x in v)),
)


def load_checkpoint(path: str | os.PathLike, resume: bool = False) -> dict:
    """Load a checkpoint to CPU (data only, see :func:`load_tensor_file`) and check it before it is
    used: UserError if missing, unreadable, unsafe, not a CRFormer checkpoint, corrupted (its tensors
    do not match the digest written with them), holding non-finite weights, or — with ``resume`` —
    lacking what continuing a run needs."""
    p = Path(path).expanduser()
    ckpt = load_tensor_file(p, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{p} is not a CRFormer checkpoint (no model/config entries)")
    model, config = ckpt["model"], ckpt["config"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise UserError(f"checkpoint {p}: 'model' is not a mapping of names to tensors")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise UserError(f"checkpoint {p}: 'config' is not a config (a mapping of sections)")
    stored = ckpt.get("model_digest")
    if stored is not None and stored != tensor_digest(model):
        raise UserError(f"checkpoint {p} is corrupted: its weights do not match the digest written with them")
    bad = next((k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"checkpoint {p} holds non-finite weights (NaN or inf) in {bad}; a diverged run cannot "
                        "give meaningful masks")
    if resume:
        for entry, what, ok in _RESUME_ENTRIES:
            if entry not in ckpt:
                raise UserError(f"checkpoint {p} cannot be resumed: it has no {entry!r} entry (evaluate and predict "
                                "still load it)")
            if not ok(ckpt[entry]):
                raise UserError(f"checkpoint {p} cannot be resumed: {entry!r} must be {what}")
    return ckpt


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors, ints and tuples: loadable with
    ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the older layout whose numpy state is numpy's own tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
                    np_state["gauss"])
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: torch.nn.Module) -> dict:
    """State dict without a frozen text encoder (it is reloaded from its folder by reference)."""
    sd = model.state_dict()
    if not getattr(model.text_encoder, "finetune", True):
        sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    return sd


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a checkpoint's model state; a checkpoint of another model size or variant is a
    UserError naming the first differing shapes or keys."""
    own = model.state_dict()
    differ = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if differ:
        raise UserError(f"checkpoint does not fit the configured model ({len(differ)} shapes differ, checkpoint vs "
                        f"model: {'; '.join(differ[:3])})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
