"""Helpers shared by the test files (fixtures live in conftest.py; nothing is imported from a test file)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: ``key=value`` overrides for a tiny model on a tiny synthetic dataset: CLI tests run in seconds.
TINY_MODEL = [
    "data.image_size=32", "data.synthetic.size=32", "data.synthetic.train_images=24", "data.synthetic.eval_samples=12",
    "model.backbone.embed_dim=16", "model.backbone.depths=[1,1,1,1]", "model.backbone.num_heads=[1,1,2,2]",
    "model.backbone.window_size=2", "model.backbone.drop_path_rate=0.0",
    "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64", "model.num_queries=4", "model.num_decoder_layers=2",
    "train.batch_size=8", "train.warmup_iters=2", "train.log_every=1", "eval.batch_size=16",
    # The embedded default's coordinate waves and held peak rate are for its 7 epochs; after this model's few
    # steps they leave every mask empty, and the tests that compare masks need masks that are not. The waves
    # have tests of their own (test_constructors, and test_golden pins them).
    "model.position_frequencies=0", "train.lr_hold=0",
]


#: GNU time, which reports a command's peak resident memory (``%M``); absent on some systems.
GNU_TIME = "/usr/bin/time"


def python_m(module: str, *args: str, timeout: int = 600, warnings: str = "ignore",
             peak_file: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repository root, one thread, output captured. With
    ``peak_file`` (and GNU time installed), the child's peak resident memory in KiB is written there."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS=warnings)
    prefix = [GNU_TIME, "-f", "%M", "-o", str(peak_file)] if peak_file and os.access(GNU_TIME, os.X_OK) else []
    return subprocess.run([*prefix, sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def train_losses(out_dir: Path) -> dict:
    """``{step: total loss}`` from a run's log.jsonl."""
    records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["total"] for r in records if "total" in r}


def skip_unless_backend_runs(name: str, device="cpu", native: bool = False) -> None:
    """Skip the calling test, with the reason, unless the registered attention backend ``name``
    (``crformer.ops.BACKENDS``) can run on ``device`` here. ``native``: also skip a backend that would
    only run interpreted (triton on CPU): for tests too big for the interpreter, or in float64."""
    import torch

    from crformer.ops import BACKENDS

    backend = BACKENDS[name]
    kind = torch.device(device).type
    if native and kind not in backend.devices:
        pytest.skip(f"attention backend {name!r} has no native {kind} path ({'/'.join(backend.devices)} only)"
                    + ("; interpreted: tests/kernels/test_backends.py" if backend.interpreted_on_cpu else ""))
    why = backend.unavailable(device)
    if why is not None:
        pytest.skip(f"attention backend {name!r} {why}")


def mixed_mask_checkpoint(out_dir: Path, data_cache: str, *extra: str) -> Path:
    """``out_dir/last.pt``: the tiny model after one training step, its mask logits shifted up by 0.5
    (the refinement conv's bias) so that its masks cover part of each image; one step alone leaves
    every logit below 0, and comparisons of empty masks would prove nothing."""
    from crformer import train
    from crformer.checkpoint import load_checkpoint, save_checkpoint
    from crformer.process import run

    run(train.main, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={out_dir}", "train.epochs=1",
                                  "train.max_steps=1", "eval.language_check=false", *extra])
    path = Path(out_dir) / "last.pt"
    ckpt = load_checkpoint(path)
    ckpt["model"]["mask_head.refine.1.bias"] += 0.5
    save_checkpoint(ckpt, path)
    return path


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` × ``height`` pixels, with no pixel data: a huge image in a few
    bytes (the loader must refuse it from the header, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
