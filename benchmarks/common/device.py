"""The device a benchmark runs on: its name, HBM bandwidth and bf16 peak (for the floor and MFU
columns), and the notes that CPU and rehearsal runs carry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch


RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
L2_BYTES = 50 * 2**20  # H100 and H200 both have 50 MB of L2

# HBM bandwidth used for the floor, by device-name substring: (bytes/s, where the number comes from).
BANDWIDTHS = [
    ("H200", 4.0e12, "H200 ~4.0 TB/s: GUESS of a measured copy (4.8 TB/s spec), not measured here"),
    ("H100", 3.0e12, "H100 3.0 TB/s: measured copy (docs/DESIGN.md §6)"),
]

# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s, by device name (torch.cuda.get_device_name()), for
# the MFU column. NVIDIA's datasheets print the bf16 figure *with sparsity* (marked "*"); dense is half of it:
#   H100 SXM 1,979* -> 989, H100 PCIe 1,513* -> 756 (H100 datasheet table, as reproduced at
#     archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html: "Shown with sparsity. 1/2 lower without");
#   H200 (SXM) 1,979* -> 989 (H200 datasheet; same GH100 compute as the H100 SXM; the H200 NVL card is lower
#     and is NOT matched);
#   A100 SXM4 / PCIe, 40 / 80 GB: 312 dense, 624* (A100 datasheet nvidia-a100-datasheet-us-nvidia-1758950-r4,
#     as cited at glennklockwood.com/garden/processors/A100);
#   L40S 362.05 dense, 733* (L40/L40S datasheet table, as reproduced at mullet.se; the L40 is 181 and NOT matched).
# (nvidia.com itself was not reachable from the session that wrote this; the figures above agree across the
# reproductions.) Names are matched strictly; an H100 whose name says neither SXM/HBM3 nor PCIe (H100 NVL), an
# H200 NVL, a GH200, a MIG slice, any other card and the CPU get no peak: MFU is left blank, never guessed.
PEAK_BF16_TFLOPS = [
    (r"\bH100\b.*\bPCIE\b", 756.0, "H100 PCIe: 756 TFLOP/s dense bf16 (datasheet 1,513 with sparsity)"),
    (r"\bH100\b.*\b(SXM\w*|HBM3)\b", 989.0, "H100 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    (r"\bH200\b(?!.*\bNVL\b)", 989.0, "H200 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    (r"\bA100\b", 312.0, "A100: 312 TFLOP/s dense bf16 (datasheet)"),
    (r"\bL40S\b", 362.0, "L40S: 362 TFLOP/s dense bf16 (datasheet 362.05; 733 with sparsity)"),
]


def peak_bf16_tflops(name: str) -> tuple[Optional[float], str]:
    """(dense bf16 peak in TFLOP/s, note) for a CUDA device name; (None, why) when the card is not in the table."""
    upper = name.upper()
    if re.search(r"\bMIG\b", upper):
        return None, f"{name}: MIG slice, no peak (MFU blank)"
    for pattern, tflops, note in PEAK_BF16_TFLOPS:
        if re.search(pattern, upper):
            return tflops, note
    return None, f"{name}: not in the peak table (MFU blank)"


CPU_NOTE = ("CPU-only run: reference and sdpa paths only (torch.compile / FlexAttention / xformers / triton "
            "need CUDA); fp32; no HBM floor; shared CPU, numbers are noisy")
REHEARSE_NOTE = ("REHEARSAL (--rehearse): toy sizes, one timed repetition, on CPU, backends that can run interpreted "
                 "(triton under TRITON_INTERPRET=1) included: it proves the GPU suite's command lines, its numbers "
                 "mean nothing")




class Device:
    """Where the benchmark runs: torch device, name, file slug, HBM bandwidth (None on CPU).
    ``rehearse``: a CPU rehearsal of the GPU suite (:data:`REHEARSE_NOTE`)."""

    def __init__(self, force_cpu: bool = False, rehearse: bool = False):
        self.rehearse = rehearse
        self.cuda = torch.cuda.is_available() and not (force_cpu or rehearse)
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if self.cuda:
            self.name = torch.cuda.get_device_name()
            words = re.sub(r"[^a-z0-9 ]+", " ", self.name.lower()).split()
            self.slug = "-".join(words[:2]) or "cuda"
            self.bandwidth, self.bandwidth_note = None, "unknown GPU: no floor"
            for key, bw, note in BANDWIDTHS:
                if key in self.name.upper():
                    self.bandwidth, self.bandwidth_note = bw, note
                    break
            self.peak_tflops, self.peak_note = peak_bf16_tflops(self.name)
        else:
            self.name, self.slug = "cpu", "cpu"
            self.bandwidth, self.bandwidth_note = None, "CPU: no HBM floor"
            self.peak_tflops, self.peak_note = None, "CPU: no peak (MFU blank)"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def header(self, what: str) -> str:
        lines = [f"== {what} on {self.name} (torch {torch.__version__}, dtype "
                 f"{str(self.dtype).replace('torch.', '')}) =="]
        if self.cuda:
            lines.append(f"   timing: triton do_bench median (CUDA events); floor: {self.bandwidth_note}; "
                         f"MFU peak: {self.peak_note}")
        else:
            lines.append(f"   {CPU_NOTE}; {torch.get_num_threads()} thread(s), perf_counter median")
        if self.rehearse:
            lines.append(f"   {REHEARSE_NOTE}")
        return "\n".join(lines)

    def meta(self) -> dict:
        import platform

        m = {"device": self.name, "slug": self.slug, "torch": torch.__version__, "dtype": str(self.dtype),
             "bandwidth_Bps": self.bandwidth, "bandwidth_note": self.bandwidth_note,
             "peak_bf16_tflops": self.peak_tflops, "peak_note": self.peak_note,
             "python": platform.python_version(), "threads": torch.get_num_threads()}
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError:
            pass
        if not self.cuda:
            m["note"] = CPU_NOTE
        if self.rehearse:
            m["rehearse"] = REHEARSE_NOTE
        return m
