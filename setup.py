"""Build script: installs ``crformer`` (``crformer/kernels`` is a symlink to the top-level ``kernels/``
folder, which has no ``__init__.py``: see docs/DESIGN.md §3) and builds the
``crformer._C`` extension (masked language pooling, C++ with optional CUDA kernels).

Install with ``pip install --no-build-isolation -e .[dev]`` so the extension is built against the
torch already in the environment.

Environment:
- ``CRFORMER_BUILD_CUDA=0|1``: force a CPU-only build / force the CUDA kernels. Default: CUDA kernels
  whenever torch is a CUDA build and ``nvcc`` is found.
- ``CUDA_HOME``: defaults to ``/usr/local/cuda`` when unset and that directory exists.
- ``TORCH_CUDA_ARCH_LIST``: defaults to ``8.0;9.0+PTX`` (A100, H100, PTX for newer GPUs).
- ``MAX_JOBS``: parallel compile jobs (torch's default: all cores).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGES = ["crformer", "crformer.ops", "crformer.data", "crformer.models", "crformer.kernels", "crformer.demo"]
DEFAULT_ARCHES = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"crformer setup: {msg}", file=sys.stderr)


def _build_cuda_wanted(torch) -> bool:
    from torch.utils import cpp_extension

    flag = os.environ.get("CRFORMER_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("CRFORMER_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        if torch.version.cuda is None:
            raise RuntimeError("CRFORMER_BUILD_CUDA=1 but the installed torch is not a CUDA build")
        return True
    if flag:
        raise RuntimeError(f"CRFORMER_BUILD_CUDA must be 0 or 1, got {flag!r}")
    home = cpp_extension.CUDA_HOME
    has_nvcc = home is not None and (Path(home) / "bin" / "nvcc").exists()
    return torch.version.cuda is not None and has_nvcc


def _extensions():
    # CUDA_HOME must be set before torch.utils.cpp_extension is imported: it is resolved at import
    # time (and without it torch guesses /usr/local from the nvcc wrapper on PATH).
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda").is_dir():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable: installing without crformer._C (pure PyTorch fallback)")
        return [], {}

    sources = ["csrc/module.cpp", "csrc/masked_pool_cpu.cpp"]
    cxx = ["-O3", "-g0"]  # -g0: Python's CFLAGS add -g, which costs a third of the compile time
    if _build_cuda_wanted(torch):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHES)
        sources += ["csrc/masked_pool_cuda_host.cpp", "csrc/masked_pool_cuda.cu"]
        nvcc = ["-O3", "-DCRFORMER_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "crformer._C", sources, extra_compile_args={"cxx": cxx + ["-DCRFORMER_WITH_CUDA"], "nvcc": nvcc})
        _log(f"building crformer._C with CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension("crformer._C", sources, extra_compile_args={"cxx": cxx})
        _log("building crformer._C CPU-only (no nvcc / CUDA torch, or CRFORMER_BUILD_CUDA=0)")
    ext.depends = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")]
    # Find libc10/libtorch without `import torch` first (torch next to us, or the build's torch).
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    ext.extra_link_args = ["-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{torch_lib}"]
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_data={"crformer": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
