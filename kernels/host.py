"""Host side of the Triton attention kernels (``cross_attention.py``, ``memory_attention.py``,
``key_splits.py``): the shipped-config table format (``shipped``, ``shipped_configs``, ``config``),
the allocator ``alloc`` (tests swap in a NaN-filled one), the uint8 key mask, how work is spread over
the SMs (``num_sms``, ``split_blocks``, ``split_keys``) and the dtype/device check of the kernels.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton

# Kernels are decorated at import; TRITON_INTERPRET decides then whether they run on CPU tensors
# (and it must already have been set when triton itself was imported: tests/kernels/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# --------------------------------------------------------------------------------------------
# Shipped-config tables. Each kernel module has a KERNEL_TABLE, the single source of truth for its
# launchers AND for tests/kernels/test_compile_sm90.py, which compiles every entry for sm_90 with
# ptxas and fails on any spill or a missing tensor-core instruction. One entry = one kernel with its
# launch options (a dict; ``shipped`` writes one as a table row):
#   kernel:  key into the module's KERNELS      dtypes: q/k/v dtypes it is shipped for
#   choices: constexpr -> values the launcher may pick (the cartesian product is shipped)
#   fixed:   constexprs that never change for this entry
#   mma:     instruction expected on sm_90: "wgmma"; "mma" (mma.sync) where a tile side is below
#            wgmma's 64-row warpgroup minimum; "fma" for fp32, whose dots use
#            input_precision="ieee" (exact fp32 on CUDA cores); None = no tl.dot.
# --------------------------------------------------------------------------------------------


def shipped(kernel: str, dtypes: tuple, num_warps: int, num_stages: int, mma, **constexprs) -> dict:
    """One KERNEL_TABLE entry: a tuple value lists the choices of that constexpr (every one is
    shipped), any other value is fixed."""
    choices = {k: v for k, v in constexprs.items() if isinstance(v, tuple)}
    fixed = {k: v for k, v in constexprs.items() if not isinstance(v, tuple)}
    return dict(kernel=kernel, dtypes=dtypes, choices=choices, fixed=fixed, num_warps=num_warps,
                num_stages=num_stages, mma=mma)


def shipped_configs(table: dict):
    """Yield (entry, kernel name, dtype name, constexprs, num_warps, num_stages, mma) for every
    shipped configuration of ``table`` (a kernel module's KERNEL_TABLE)."""
    for entry, spec in table.items():
        keys = list(spec["choices"])
        for values in itertools.product(*(spec["choices"][k] for k in keys)):
            constexprs = dict(spec["fixed"], **dict(zip(keys, values)))
            for dt in spec["dtypes"]:
                yield entry, spec["kernel"], dt, constexprs, spec["num_warps"], spec["num_stages"], spec["mma"]


def config(table: dict, entry: str, **want) -> tuple[dict, dict]:
    """Constexprs + launch options of a ``table`` entry. ``want`` gives preferred values: BLOCK_N
    takes the smallest shipped value >= want (it must cover all keys of the short-key regime),
    others the largest shipped value <= want (so False < True for flags); fixed constexprs ignore
    ``want``."""
    spec = table[entry]
    constexprs = dict(spec["fixed"])
    for key, values in spec["choices"].items():
        wanted = want[key]
        if key == "BLOCK_N":
            fits = [x for x in values if x >= wanted]
            constexprs[key] = min(fits) if fits else max(values)
        else:
            fits = [x for x in values if x <= wanted]
            constexprs[key] = max(fits) if fits else min(values)
    return constexprs, {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}


def alloc(shape, dtype, device):
    """Every buffer a kernel must fully write comes from here (tests swap in a NaN-filled version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the launchers size their grids by it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: pretend to be a tiny GPU so that small test shapes still exercise several
    # key splits / query runs.
    return 2


def keep_u8(keep, B, N, device):
    """The B×N bool key mask as the uint8 tensor the kernels read (all ones for no mask)."""
    if keep is None:
        return torch.ones((B, N), dtype=torch.uint8, device=device)
    return keep.view(torch.uint8)  # zero-copy; strides passed to the kernel


def split_blocks(n_blocks: int, n_other_programs: int, device, programs_per_sm: int) -> tuple[int, int]:
    """(n_parts, blocks_per_part): n_blocks cut into contiguous parts of whole blocks, about
    ``programs_per_sm`` programs per SM counting the ``n_other_programs`` each part is launched with."""
    wanted_parts = max(1, min(n_blocks, triton.cdiv(programs_per_sm * num_sms(device), max(1, n_other_programs))))
    blocks_per_part = triton.cdiv(n_blocks, wanted_parts)
    return triton.cdiv(n_blocks, blocks_per_part), blocks_per_part


def split_keys(N: int, BLOCK_N: int, n_other_programs: int, device, programs_per_sm: int) -> tuple[int, int]:
    """(n_splits, keys_per_split) of the flash-decoding key split: whole key blocks per split."""
    n_splits, blocks_per_split = split_blocks(triton.cdiv(N, BLOCK_N), n_other_programs, device, programs_per_sm)
    return n_splits, blocks_per_split * BLOCK_N


def check_kernel_inputs(q, name: str) -> None:
    """ValueError unless q (whose shape/dtype/device checks the inputs already agree with) has a
    dtype and device these kernels run on."""
    if q.dtype not in DTYPES:
        raise ValueError(f"{name} needs fp32/fp16/bf16 inputs; got {q.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         f"imported); got {q.device}")
