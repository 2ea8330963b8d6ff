"""Checkpoints: atomic writes, and enough metadata to evaluate/predict without a config file."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

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


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with torch.save to a temp file in the same folder, fsync, then rename over
    ``path``: a kill mid-save leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint to CPU; UserError if missing or unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{p} is not a CRFormer checkpoint (no model/config entries)")
    return ckpt


def model_state(model: torch.nn.Module) -> dict:
    """State dict without a frozen text encoder (it is reloaded from its folder by reference)."""
    sd = model.state_dict()
    if not getattr(model.text_encoder, "finetune", True):
        sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    return sd


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
