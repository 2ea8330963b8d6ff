"""The three benchmark scripts run with --quick on CPU, print their table and CPU note, write JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script,section,extra", [("bench_decoder.py", "decoder", []), ("bench_vlf.py", "vlf", []),
                                                  ("bench_train_step.py", "train_step", []),
                                                  ("bench_train_step.py", "train_step", ["--embedded", "--batch-size", "4"])])
def test_quick_cpu(script, section, extra, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--cpu", "--threads", "1",
                        "--out-dir", str(tmp_path), *extra], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "| case | backend |" in r.stdout
    assert "CPU-only" in r.stdout
    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    data = json.loads(files[0].read_text())
    rows = data["sections"][section]["rows"]
    assert rows and all(r["ms"] and r["ms"] > 0 for r in rows if "note" not in r or not r["note"])
    assert {r["backend"] for r in rows} >= {"reference", "sdpa"}
    assert any("CPU-only" in n for n in data["sections"][section]["notes"])
    if "--embedded" in extra:
        assert "64² B=4" in rows[0]["case"] and any("train.amp=bf16" in n for n in data["sections"][section]["notes"])
