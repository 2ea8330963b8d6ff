"""The checkout runs as a user runs it: from its root, beside Hugging Face's own ``kernels`` package, in
the environment ``scripts/setup.sh`` installs from ``requirements.lock`` (README commands 1 and 2).

``kernels/`` at the root has no ``__init__.py`` and reaches Python only as ``crformer.kernels`` (the
``crformer/kernels`` symlink; docs/DESIGN.md §3). A regular package there shadowed the installed
``kernels`` whenever the root led ``sys.path`` (``python -m``, pytest), and transformers >= 5 imports
that package as soon as a BERT is built.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_MODEL, python_m

FIND_KERNELS = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
print(json.dumps(None if spec is None else {"origin": spec.origin,
                                            "paths": list(spec.submodule_search_locations or [])}))
"""


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with the checkout root first on ``sys.path``, as ``python -m`` puts it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_top_level_kernels_never_runs_checkout_code():
    proc = _run_from_root(FIND_KERNELS)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)
    if _hub_kernels_installed():
        # The installed package wins: a folder without __init__.py is only a namespace candidate.
        assert spec is not None and spec["origin"] is not None, spec
        ours = (REPO / "kernels").resolve()
        assert not any(Path(p).resolve() == ours for p in [Path(spec["origin"]).parent, *spec["paths"]]), spec
    else:
        # Nothing else is called `kernels`: at most an empty namespace (no file of ours is loaded as
        # `kernels`), which transformers' availability probe reports as not installed.
        assert spec is None or spec["origin"] is None, spec


def test_text_encoder_loads_from_checkout_root():
    # transformers imports `kernels` (its hub integration) while it builds the BERT.
    proc = _run_from_root("from crformer.models.text_encoder import TextEncoder\n"
                          "print(type(TextEncoder('minilm').bert).__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "BertModel"


def test_train_one_step_from_checkout_root(tmp_path):
    proc = python_m("crformer.train", *TINY_MODEL, "train.max_steps=1", f"train.out_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "last.pt").is_file()


def test_kernels_reach_python_only_as_crformer_kernels():
    assert not (REPO / "kernels" / "__init__.py").exists()
    link = REPO / "crformer" / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"
    import crformer.kernels.cross_attention as ca

    assert Path(ca.__file__).resolve() == (REPO / "kernels" / "cross_attention.py").resolve()


def test_wheel_holds_crformer_kernels_and_no_top_level_kernels(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if not os.path.lexists(REPO / name):
            continue  # deleted in the working tree, not yet committed
        dst = src / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst, follow_symlinks=False)
    env = dict(os.environ, CRFORMER_BUILD_CUDA="0")  # the C++ extension only: the layout is what is tested
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], cwd=src, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("crformer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("crformer/kernels/")}
    assert shipped == {p.name for p in (REPO / "kernels").glob("*.py")}, sorted(names)
    tops = {n.split("/")[0] for n in names}
    assert not {t for t in tops if t != "crformer" and not t.endswith(".dist-info")}, sorted(tops)
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "crformer").rglob("__init__.py")}
    assert {p for p in packages if f"{p}/__init__.py" not in names} == set(), "packages missing from the wheel"


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_environment_is_the_lock():
    """Every pin of requirements.lock, and nothing else but pins of requirements-demo.lock (the demo
    extras, which scripts/setup-demo.sh and so .ci/run add on top; the locks agree on what they share)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not the environment scripts/setup.sh makes ({REPO / '.venv'}): {sys.prefix}")
    lock = _pins((REPO / "requirements.lock").read_text())
    demo_lock = _pins((REPO / "requirements-demo.lock").read_text())
    assert {k: demo_lock.get(k) for k in lock} == lock, "the locks differ: refresh both with scripts/lock.sh"
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    installed = _pins(freeze)
    not_as_locked = {k: (installed.get(k), v) for k, v in lock.items() if installed.get(k) != v}
    not_in_demo_lock = {k: (v, demo_lock.get(k)) for k, v in installed.items()
                        if k not in lock and demo_lock.get(k) != v}  # (installed, demo pin or None)
    assert not not_as_locked and not not_in_demo_lock, {"not as locked": not_as_locked,
                                                         "not as in requirements-demo.lock": not_in_demo_lock}


@pytest.mark.parametrize("name", ["transformers", "triton"])  # one from each half setup.sh installs
def test_environment_is_byte_compiled(name):
    """scripts/setup.sh installs with ``pip --no-compile`` and byte-compiles in parallel afterwards: every
    module of a large package, the thousands no run imports included, has its up-to-date ``.pyc``. Without
    it each ``python -m crformer.…`` under PYTHONDONTWRITEBYTECODE would compile torch from source again."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not the environment scripts/setup.sh makes ({REPO / '.venv'}): {sys.prefix}")
    import importlib.util

    package = Path(importlib.util.find_spec(name).origin).parent
    sources = list(package.rglob("*.py"))
    assert len(sources) > 100
    stale = []
    for src in sources:
        pyc = Path(importlib.util.cache_from_source(str(src)))
        # header: magic, flags, source mtime, source size (PEP 552, timestamp-based)
        header = pyc.read_bytes()[:16] if pyc.exists() else b""
        if len(header) < 16 or int.from_bytes(header[8:12], "little") != int(src.stat().st_mtime) & 0xFFFFFFFF:
            stale.append(str(src.relative_to(package)))
    assert not stale, f"{len(stale)} of {len(sources)} {name} modules without an up-to-date .pyc: {stale[:5]}"


def test_gpu_suite_path_leaves_the_root_out(tmp_path):
    """benchmarks/run_gpu_suite.sh runs the checkout uninstalled: its crformer and its pytest must not
    put the root (so the root's kernels/) on sys.path."""
    probe = REPO / "tests" / f"test_zz_gpu_env_probe_{os.getpid()}.py"
    probe.write_text("import json, os, sys\n"
                     "def test_probe():\n"
                     "    import crformer.kernels.host\n"
                     f"    open({str(tmp_path / 'seen.json')!r}, 'w').write(json.dumps(\n"
                     "        {'path': sys.path, 'kernels': crformer.kernels.host.__file__}))\n")
    try:
        script = (f"source benchmarks/gpu_env.sh && {sys.executable} $PYTEST {probe.relative_to(REPO)} && "
                  f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.path))'")
        proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    root = str(REPO.resolve())
    for path in (seen["path"], json.loads(proc.stdout.splitlines()[-1])):
        assert not [p for p in path if p in ("", ".", root)], path
    assert seen["kernels"].startswith(str(REPO / ".gpu_path" / "crformer" / "kernels")), seen
