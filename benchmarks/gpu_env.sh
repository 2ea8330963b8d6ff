# Sourced from the repository root by run_gpu_suite.sh (and tests/test_environment.py): run the
# checkout's crformer, not installed on the GPU image, without the root on sys.path: the root's kernels/
# must never be a candidate for a top-level `kernels` (docs/DESIGN.md §3). .gpu_path holds links to
# crformer/ and tests/ only; PYTHONSAFEPATH keeps `python -m` and scripts from prepending the root, and
# pytest's importlib mode keeps it from inserting the rootdir.
mkdir -p .gpu_path && ln -sfn ../crformer .gpu_path/crformer && ln -sfn ../tests .gpu_path/tests
export PYTHONSAFEPATH=1 PYTHONPATH=$PWD/.gpu_path${PYTHONPATH:+:$PYTHONPATH}
PYTEST="-m pytest -q -p no:cacheprovider --import-mode=importlib"
