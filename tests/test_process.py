"""crformer.process: the allocator setting of CPU training processes (run() is covered by test_cli)."""

import subprocess
import sys

import pytest

from tests.helpers import TINY_MODEL

# Ten 16 MiB tensors made and freed twenty times, like a step's activations; prints the page faults.
# Both modes start from malloc's initial mmap threshold (128 KiB) held fixed: glibc's own adaptive one
# sometimes keeps this pattern's memory and sometimes not (0 to 818,560 faults from run to run), which
# is the step-time wander keep_freed_memory() removes, but no baseline a test can compare against.
BURSTS = """
import ctypes, resource, sys, torch
from crformer.process import M_MMAP_THRESHOLD, keep_freed_memory
assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def burst():
    xs = [torch.ones(4 << 20) for _ in range(10)]
    del xs
for _ in range(3):  # warm-up: the heap grows to the burst's size
    burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", BURSTS, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


def test_keep_freed_memory_stops_the_page_faults():
    """When malloc returns large blocks to the kernel, each burst of tensors is faulted in again
    (16 MiB = 4,096 pages each); after keep_freed_memory() the freed memory is handed out again
    without new pages."""
    from crformer.process import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: keep_freed_memory() changes nothing here")
    returned, kept = _faults("return"), _faults("keep")
    assert returned > 800_000, returned  # 20 bursts × 10 tensors × 4,096 pages
    assert kept < 1_000, (kept, returned)


def test_a_cpu_trainer_keeps_freed_memory(monkeypatch, data_cache, tmp_path):
    """The trainer sets it for a CPU run, so README command 1 and the sweep's worker processes get it."""
    import crformer.train as train
    from crformer.config import load_config

    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append("set") or True)
    train.Trainer(load_config(None, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path}"]))
    assert calls == ["set"]
