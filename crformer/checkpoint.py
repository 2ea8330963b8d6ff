"""Checkpoints: atomic writes, data-only loading, and enough metadata to evaluate/predict without a
config file.

Loading never runs code: every ``.pt``/``.pth`` file (checkpoints, backbone weights) goes through
:func:`load_tensor_file`, i.e. ``torch.load(weights_only=True)``, which rebuilds tensors and plain
Python data only. What a checkpoint stores is chosen to fit that: RNG states are tensors, ints and
tuples (see :func:`rng_state`).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import crformer
from crformer.errors import UserError


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{crformer.__version__}+{sha}" if sha else crformer.__version__


#: Temp files of :func:`save_atomic` are ``.<name>.<random>.tmp`` beside the target.
_TEMP_PATTERN = re.compile(r"^\..+\.pt\.[A-Za-z0-9_]+\.tmp$")


def _file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (0666 less the umask); mkstemp gives 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with torch.save to a temp file in the same folder, fsync, then rename over
    ``path``: a kill mid-save leaves the previous file intact, never a truncated one. A full disk
    or an unwritable folder is a UserError (the previous file stays as it was)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            kept = f"; the previous {path.name} is intact" if path.exists() else ""
            reason = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise UserError(f"cannot write checkpoint {path}: {reason}{kept}") from None
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that a killed :func:`save_atomic` (``kill -9``, power loss) left in
    ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _TEMP_PATTERN.match(p.name)]
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
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise UserError(f"refusing to load {what} {p}: it asks for the Python object {found.group(1)}, and "
                            "only tensors and plain data are loaded (a file that needs code can run code)") from None
        raise UserError(f"cannot read {what} {p}: {_first_line(e)}") from None
    except Exception as e:  # truncated, not a torch file, wrong format
        raise UserError(f"cannot read {what} {p}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint to CPU (data only, see :func:`load_tensor_file`); UserError if missing,
    unreadable, unsafe or not a CRFormer checkpoint."""
    ckpt = load_tensor_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{Path(path).expanduser()} is not a CRFormer checkpoint (no model/config entries)")
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
