"""The three benchmark scripts run with --quick on CPU, print their table and CPU note, write JSON; the
train-step accounting (FLOPs, aten calls, peak table, kernel counting) counts what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from crformer.engine import native_bf16  # noqa: E402

CPU_TRAINING_PRECISION = "bf16" if native_bf16(torch.device("cpu")) else "fp32"


@pytest.mark.parametrize("script,section,extra", [
    ("bench_decoder.py", "decoder", []), ("bench_vlf.py", "vlf", []),
    ("bench_train_step.py", "train_step sweep", ["--sweep"]),
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
        assert "64² B=4" in rows[0]["case"] and any(f"train.amp=auto ({CPU_TRAINING_PRECISION} on this cpu)" in n
                                                   for n in data["sections"][section]["notes"])
    if section.startswith("train_step"):
        _check_train_step_accounting(rows, r.stdout, sweep="--sweep" in extra)


def _check_train_step_accounting(rows, stdout, sweep):
    """Every row is counted; the tiny step's FLOPs are the same for reference and sdpa and linear in B; the
    CPU gets no MFU and no CUDA columns."""
    assert "GFLOP/step" in stdout and "aten calls/step" in stdout and "MFU %" in stdout
    assert "host ms/step" not in stdout and "kernels/step" not in stdout
    flops = {}
    for r in rows:
        assert r["pass"] == "eager" and not r.get("note"), r
        assert r["flops"] > 0 and r["GFLOP"] == r["flops"] / 1e9 and r["TFLOPs"] > 0 and r["mfu_pct"] is None
        assert r["aten_calls"] == r["aten_fwd"] + r["aten_bwd"] + r["aten_opt"] and min(
            r["aten_fwd"], r["aten_bwd"], r["aten_opt"]) > 0
        assert r["host_ms"] is None and "kernels" not in r
        flops.setdefault(r["B"], {})[r["backend"]] = r["flops"]
    for per_backend in flops.values():
        assert per_backend["reference"] == per_backend["sdpa"], flops
    if sweep:
        assert sorted(flops) == [2, 4] and flops[4]["reference"] == 2 * flops[2]["reference"]


def _fwd_bwd_flops(fn, *inputs) -> int:
    with common.flop_counter() as counter:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def test_attention_flops_match_analytic_count():
    """One attention call forward + backward counts 4·B·H·M·N·d + 8·B·H·M·N·d on every backend: reference and
    sdpa run on CPU tensors, the Triton custom ops on meta tensors (their fake kernels, no GPU needed)."""
    from crformer.ops import cross_attention, memory_attention

    B, H, M, N, d = 2, 3, 5, 7, 8
    want, want_memory = 3 * common.attention_flops(B, H, M, N, d), 3 * 4 * B * M * N * d
    mask = torch.arange(N)[None, :] < torch.tensor([[N], [4]])
    got = {}
    for backend in ("reference", "sdpa"):
        q, k, v = (torch.randn(B, H, n, d, requires_grad=True) for n in (M, N, N))
        got[backend] = _fwd_bwd_flops(lambda *a: cross_attention(*a, mask, backend=backend), q, k, v)
        qm, memory, pos = torch.randn(B, M, d), torch.randn(B, N, d), torch.randn(N, d)
        got[backend + " memory"] = _fwd_bwd_flops(lambda *a: memory_attention(*a, mask, backend=backend),
                                                  *(t.requires_grad_() for t in (qm, memory, pos)))
    if "crformer::triton_cross_attention_fwd" in common.register_flop_formulas():
        q, k, v = (torch.randn(B, H, n, d, device="meta", requires_grad=True) for n in (M, N, N))
        got["triton"] = _fwd_bwd_flops(
            lambda *a: torch.ops.crformer.triton_cross_attention_fwd(*a, mask.to("meta"), 0.3)[0], q, k, v)
        qm, memory, pos = (torch.randn(*s, device="meta", requires_grad=True) for s in ((B, M, d), (B, N, d), (N, d)))
        got["triton memory"] = _fwd_bwd_flops(
            lambda *a: torch.ops.crformer.triton_memory_attention_fwd(*a, mask.to("meta"), 0.3)[0], qm, memory, pos)
    for name, flops in got.items():
        expected = want_memory if "memory" in name else want
        assert abs(flops - expected) <= 0.02 * expected, (name, flops, expected)
    assert len({v for k, v in got.items() if "memory" not in k}) == 1, got


def test_masked_pool_flops():
    from crformer.ops import masked_pool
    from crformer.ops.pooling import HAS_EXTENSION

    if not HAS_EXTENSION:
        pytest.skip("crformer._C not built: masked_pool runs the reference (elementwise, 0 FLOPs)")
    x = torch.randn(3, 5, 4, requires_grad=True)
    assert _fwd_bwd_flops(lambda t: masked_pool(t, torch.ones(3, 5, dtype=torch.bool)), x) == 2 * 3 * 5 * 4


def test_account_step_counts_phases():
    """account_step: FLOPs of forward + backward only (2·B·in·out each: no input gradient), top-level aten
    calls per phase; OpCounter counts each top-level call once, not the ops inside a kernel."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    acc = common.account_step(lambda: lin(x).square().sum(), lambda loss: loss.backward(), optimizer_step)
    assert acc["flops"] == 2 * (2 * 4 * 8 * 16)
    assert acc["aten_fwd"] >= 3 and acc["aten_bwd"] > 0 and acc["aten_opt"] > 0 and acc["custom_ops"] == 0
    assert acc["aten_calls"] == acc["aten_fwd"] + acc["aten_bwd"] + acc["aten_opt"]
    ops = common.OpCounter()
    a, b = torch.randn(3), torch.randn(3)
    with ops.phase("x"):
        (a + b).sum()
    assert ops.counts == {("x", "aten"): 2}


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None), ("NVIDIA L40", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None), ("NVIDIA GeForce RTX 4090", None), ("cpu", None)])
def test_peak_table(name, peak):
    assert common.peak_bf16_tflops(name)[0] == peak


def test_mfu_and_cuda_only_paths_on_cpu():
    dev = common.Device(force_cpu=True)
    assert dev.peak_tflops is None and common.mfu_pct(10**12, 1.0, dev) is None
    dev.peak_tflops = 1000.0  # 1 TFLOP in 1 ms = 1000 TFLOP/s = 100 % of a 1000 TFLOP/s peak
    assert common.mfu_pct(10**12, 1.0, dev) == pytest.approx(100.0)
    host = []
    assert common.time_events_ms(lambda: None, common.Device(force_cpu=True), 1, 3, host_ms=host) >= 0 and host == []
    assert common.profile_kernels(lambda: None, common.Device(force_cpu=True)) == {}


def test_count_kernels():
    from torch.autograd import DeviceType

    def ev(name, device=DeviceType.CUDA, kind="kernel", us=2.0, annotation=False):
        return SimpleNamespace(name=name, device_type=device, activity_type=kind, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [ev("gemm"), ev("softmax", us=1.0), ev("Memcpy HtoD (Pageable -> Device)", kind="gpu_memcpy"),
              ev("Memset (Device)", kind=None), ev("aten::mm", device=DeviceType.CPU, kind="cpu_op"),
              ev("elementwise", kind=None), ev("Optimizer.step#AdamW.step", kind=None, annotation=True),
              ev("ProfilerStep#1", kind="gpu_user_annotation")]
    assert common.count_kernels(events) == (3, pytest.approx(5.0e-3))


def test_compile_flag_adds_a_compiled_step_without_running_it():
    """``--compile MODE`` adds a "compile MODE" and a "compile MODE + graphs" step per backend, sharing the
    eager step's model and batch; on CPU the graphs step is a reason, not a step; torch.compile is lazy, so
    nothing compiles here."""
    import argparse

    import bench_train_step as bts

    step = bts.TrainStep(torch.nn.Linear(2, 2), None, None, {}, torch.device("cpu"), "none")
    cpu, cuda = argparse.Namespace(cuda=False, rehearse=False), argparse.Namespace(cuda=True, rehearse=False)
    assert [name for name, *_ in bts.step_variants(argparse.Namespace(compile=None), step, cpu)] == ["eager"]
    variants = bts.step_variants(argparse.Namespace(compile="default"), step, cpu)
    assert [(name, why) for name, _, why in variants] == [
        ("eager", ""), ("compile default", ""), ("compile default + graphs", "CUDA graphs need CUDA")]
    compiled = variants[1][1]
    assert compiled.model is step.model and compiled.forward_loss is not step.forward_loss and variants[2][1] is None
    on_cuda = bts.step_variants(argparse.Namespace(compile="max-autotune"), step, cuda)
    assert [(name, fn is not None) for name, fn, _ in on_cuda][1:] == [
        ("compile max-autotune", True), ("compile max-autotune + graphs", True)]


SUITE = ROOT / "benchmarks" / "run_gpu_suite.sh"


def _suite(*args, suite_dir, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, GPU_SUITE_DIR=str(suite_dir), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def _planned_steps(mode_args, suite_dir) -> dict[str, tuple[str, list[str]]]:
    """{step: (limit, command words)} from ``--dry-run``, in plan order."""
    r = _suite(*mode_args, "--dry-run", suite_dir=suite_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {}
    for line in r.stdout.split("\n"):  # a step's line: "NAME LIMITs: COMMAND" (the versions one wraps)
        head, sep, command = line.partition(": ")
        if sep and len(head.split()) == 2 and head.split()[1].endswith("s"):
            name, limit = head.split()
            steps[name] = (limit, command.split())
    return steps


def test_gpu_suite_rehearses_every_device_command(tmp_path):
    """Every step of the device plan has a rehearsal with the same limit and the same command, only the size
    arguments added (benchmarks: --rehearse; pytest: --collect-only; the build: --help); the deadline keeps
    the device plan inside one 540 s call."""
    device, rehearse = _planned_steps([], tmp_path), _planned_steps(["rehearse"], tmp_path)
    assert list(device) == list(rehearse) and len(device) >= 13, (device, rehearse)
    sizes = {"--rehearse", "--collect-only", "--help"}
    for name, (limit, command) in device.items():
        assert rehearse[name][0] == limit, name
        assert [w for w in rehearse[name][1] if w not in sizes] == command, name
        assert not sizes & set(command), name
    script = SUITE.read_text()
    assert "DEADLINE_S=${DEADLINE_S:-525}" in script and "DEADLINE_S=${DEADLINE_S:-300}" in script


@pytest.mark.slow
def test_gpu_suite_rehearsal(tmp_path):
    """``run_gpu_suite.sh rehearse`` runs every step on CPU at toy sizes inside its 5-minute deadline: each one
    ok, the benchmarks' sections written, the CUDA-only variants skipped with their reason, and what a device
    call would bring back from $OUT inside its 8 files."""
    r = _suite("rehearse", suite_dir=tmp_path, timeout=420)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text().split("\n")
    done = [line.split()[0] for line in summary if line]
    assert done and all(" ok " in line for line in summary if line), summary
    assert sorted(done) == sorted(_planned_steps(["rehearse"], tmp_path)), done
    out = [f for f in (tmp_path / "OUT").rglob("*") if f.is_file()]
    assert len(out) <= 8 and {"summary.txt", "logs.tgz"} <= {f.name for f in out}, out
    sections = json.loads(next((tmp_path / "results").glob("cpu-*.json")).read_text())["sections"]
    assert {"train_step triton", "train_step sdpa", "train_step reference", "train_step memory auto",
            "train_step sweep", "vlf", "decoder"} <= set(sections), list(sections)
    triton = {row["pass"]: row for row in sections["train_step triton"]["rows"]}
    assert triton["eager"]["ms"] and triton["compile default"]["ms"], triton
    # One graph per step: an import check traced per attention call once broke it into 35.
    assert all(row["graph_breaks"] == 0 for name in ("triton", "sdpa", "reference")
               for row in sections[f"train_step {name}"]["rows"] if row["pass"] == "compile default"), sections
    assert triton["compile default + graphs"]["note"] == "skipped: CUDA graphs need CUDA"
    memory = sections["train_step memory auto"]["rows"]
    assert sorted((row["pass"], row["B"]) for row in memory) == sorted(
        (p, b) for p in ("plain", "grad_checkpointing") for b in (2, 4, 8))
    assert all(row["ms"] and row.get("peak_total_MB") is None for row in memory)
