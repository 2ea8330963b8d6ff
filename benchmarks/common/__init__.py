"""Shared helpers for the benchmark scripts, one module per job: ``device`` (bandwidth, peak, notes),
``timing``, ``counting`` (bytes, FLOPs, aten calls, kernels, MFU), ``report`` (rows, tables, JSON,
shared arguments), ``attention`` (the attention benchmarks' cases). The scripts ``import common`` and
use the names re-exported here.

Byte counting (docs/DESIGN.md §6): the floor of an op is the bytes it *must* move — each input read once,
each output written once — divided by the HBM bandwidth. Caches, recomputation and intermediate
tensors are not counted, so "% of floor" = floor time / measured time says how far an implementation
is from a perfectly fused, bandwidth-bound one (100% = at the floor).

Timing: on CUDA two numbers per row. "median ms" is ``triton.testing.do_bench`` on the eager call
(CUDA events, median, warm-up; it zeroes a 256 MB buffer before every call, which evicts L2): what a
caller sees, including host-side launch cost whenever the GPU finishes before Python has issued the
next kernel, which is the case for most single attention calls here (tens of µs of GPU work against
tens to hundreds of µs of dispatch). "graph ms" replays the same calls from a CUDA graph
(``do_bench_cudagraph``): the GPU time of the kernels alone, what a GPU-bound training step pays.
Input rotation (copies > 2× L2) keeps the graph numbers out of L2 for all but the smallest cases. On
CPU ``time.perf_counter`` median after warm-up; CPU numbers on the shared development machine are noisy.
"""

from .device import RESULTS_DIR, L2_BYTES, BANDWIDTHS, PEAK_BF16_TFLOPS, peak_bf16_tflops, CPU_NOTE, REHEARSE_NOTE, Device  # noqa: F401
from .timing import time_ms, time_graph_ms, time_events_ms, peak_mb, rotation  # noqa: F401
from .counting import nbytes, attention_bytes, module_bytes, attention_flops, FLOP_FORMULAS, TORCH_SDPA_BACKWARDS, register_flop_formulas, flop_counter, OpCounter, account_step, mfu_pct, count_kernels, profile_kernels  # noqa: F401
from .report import fmt, finish_rows, COLUMNS, GRAPH_COLUMNS, columns_for, table, run_case, rehearsal_failures, _first_line, skip, add_rehearse_arg, add_common_args, setup, save, write_markdown  # noqa: F401
from .attention import padding_mask, registered_backends, attention_backends, bench_attention, ATTENTION_CPU_NOTE, start_attention_bench  # noqa: F401
