#!/usr/bin/env bash
# The one prepared check for a GPU machine that has torch and triton preinstalled and no network.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (default: $OUT if set, else gpu-results/)
#
# Steps (each under `timeout`, the whole script within a hard budget of 500 s; give the device
# tool a timeout of about 570 s):
#   1. install:  python3 -m pip install --no-deps --no-build-isolation -e .
#   2. env:      GPU (nvidia-smi), driver, torch / triton / CUDA versions
#   3. tests:    a curated subset of the test suite, compiled on the GPU (fixed configurations,
#                no hypothesis: every new specialisation costs a compile)
#   3b. train:   `fusedmlp train --epochs 5` (the README's main job) on the GPU, then the same
#                with `--cuda-graph` (train_graph)
# Then, in the order of what the open issues' targets need most (a step the budget cannot fit is
# skipped: the later ones first):
#   4. step_graph: target_grid.py --grid step --graph: issue 8's step at w1024 B16K, fusedmlp's
#                and torch's each captured in a CUDA graph (no host time in either), with the
#                A/B rows of the TMA defaults (TF32 on the pointer kernel; the dW split on it)
#   5. kernel_times: benchmarks/kernel_times.py --sections step --passes kernel: the same step's
#                kernel-only time and per-kernel breakdown, the default, its TMA A/Bs and torch
#   6. small_graph: target_grid.py --grid small --graph: issue 3's widths 64, 128, 256 at batch
#                16K, each case timed as CUDA graph replays (no host launch time)
#   7. bench:    fusedmlp bench --quick, JSON + markdown + plot, then RESULTS.md from the JSON
#   8. target_grid: benchmarks/target_grid.py: issue 4's cross-entropy grid (C 32K-128K, bf16,
#                fp32; resolved: a check that its figures hold)
#   9. small_grid: the same widths as 6, launched from Python (the bench's timing)
#   10. tma_grid: target_grid.py --grid optim,tma: issue 7's Adam over 1,000 small tensors;
#                issue 3's bf16 GEMMs and a TF32 layer through the pointer kernels, the TMA one
#                (FUSEDMLP_TMA=1) and torch
#   11. targets: benchmarks/targets.py: each open issue's speed targets, met or not, from the JSONs
#   12. profile: benchmarks/profile_step.py: host (cProfile, torch.profiler CPU) and kernel (CUDA)
#                times of the MLP training step, and the host cost of one launch, under profile/
#   13. int64:   dropout over 2^31 + 1024 fp16 elements (4 GiB in, 4 GiB out), forward and backward
#   14. verify:  fusedmlp verify, no new case 20 s before its timeout (tolerated missing)
# Everything is logged under OUTDIR (<step>.log, summary.txt), and at the end packed into
# OUTDIR/gpu_check.tgz. The script goes on past a failing step and exits non-zero if any step
# failed. Copy OUTDIR/RESULTS.md to benchmarks/RESULTS.md to publish the figures.
# The device tool brings back at most 8 files from $OUT: run it into a folder of its own and copy
# only summary.txt, bench.json, RESULTS.md and gpu_check.tgz into $OUT, e.g.
#   bash benchmarks/gpu_check.sh /tmp/gc; rc=$?; cp /tmp/gc/{summary.txt,bench.json,RESULTS.md,gpu_check.tgz} $OUT/; exit $rc
# Overrides (for a dry run elsewhere): PYTHON, GPU_CHECK_TESTS (space-separated test files),
# GPU_CHECK_NO_INSTALL=1, GPU_CHECK_SKIP (space-separated step names not to run, e.g.
# "profile int64 verify" to leave their seconds to the grids).
# The fifteenth session (H200): GPU_CHECK_BUDGET=480 GPU_CHECK_SKIP="profile int64 verify" ran in
# 365 s (394 s of device time with the machine's start), which left time for a second call of
# about 4 minutes (the whole curated test set took 140 s of it). The seventeenth (H100): the
# same in 474 s, tests 164 s; the bench, on the cold machine, ran past its step's timeout. With
# the small_graph step added since, GPU_CHECK_BUDGET=540 (a device timeout of about 590 s) fits
# every step but the skipped ones and leaves about 4 minutes for a second call on the warm machine.
# The eighteenth session added step_graph (about 40 s, its kernels compiled by kernel_times
# before it): within 540 s the TMA grid, the last grid, gets what is left (targets keeps 15 s).
# Run it from the checkout's root: the repository is the package (its __init__.py at the root),
# so a copy nested inside the checkout (say, of a clean commit) makes pytest take the copy for a
# subpackage and fail every test at collection (the twenty-fourth session's first call).
set -u -o pipefail

cd "$(dirname "$0")/.."
DIR="${1:-${OUT:-gpu-results}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PY="${PYTHON:-python3}"
BUDGET=${GPU_CHECK_BUDGET:-500} # seconds for all steps (the device tool: 600 s a call, 900 s a session)
START=$SECONDS
FAILED=()
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# The curated, compiled subset (files that do not exist yet are skipped with a note).
# Left out: test_fuzz.py (hypothesis), test_sm90_compile.py (cross-compiles for sm_90 on CPU
# machines), test_ddp.py (CPU gloo), the CLI tests (verify and bench run as their own steps).
TESTS=(
  tests/test_backend.py
  tests/test_linear.py
  tests/test_cross_entropy.py
  tests/test_softmax.py
  tests/test_batchnorm.py
  tests/test_dropout.py
  tests/test_optim.py
  tests/test_mlp.py
  tests/test_convert.py
  tests/test_determinism.py
  tests/test_checkpoint.py
  tests/test_compile.py
  tests/test_cuda_graphs.py
  tests/test_autocast.py
  tests/test_amp_optim.py
  tests/test_fused_block.py
  tests/test_inputs.py
  tests/test_configs.py
  tests/test_export_autograd.py
  tests/test_autograd_edges.py
  tests/test_examples.py
)
if [[ -n ${GPU_CHECK_TESTS:-} ]]; then read -r -a TESTS <<<"$GPU_CHECK_TESTS"; fi

: >"$DIR/summary.txt"
# kernel_times.py appends to its JSONL, and a skipped step would leave the last run's files:
# start from none of this script's outputs (a rerun into the same folder on a warm machine).
rm -rf "$DIR/profile" "$DIR"/*.log "$DIR"/kernel_times.jsonl "$DIR"/bench.{json,md,png} \
  "$DIR"/tma_grid.{json,md} "$DIR"/small_grid.{json,md} "$DIR"/small_graph.{json,md} \
  "$DIR"/step_graph.{json,md} "$DIR"/target_grid.{json,md} "$DIR"/targets.md \
  "$DIR"/RESULTS.md "$DIR"/verify.json "$DIR"/gpu_check.tgz
log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$DIR/summary.txt"; }

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MAX_SECONDS CMD...: run CMD under timeout (capped by what is left of the budget),
# output to $DIR/NAME.log; record a failure and go on.
step() {
  local name=$1 max=$2
  shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    log "SKIP $name: named in GPU_CHECK_SKIP"
    return 0
  fi
  local t
  t=$(left)
  ((t > max)) && t=$max
  if ((t < 10)); then
    log "SKIP $name: the ${BUDGET}-s budget is spent"
    FAILED+=("$name (skipped: budget)")
    return 1
  fi
  log "RUN  $name (timeout ${t}s): $*"
  timeout -k 10 "$t" "$@" >"$DIR/$name.log" 2>&1
  local rc=$?
  if ((rc == 0)); then
    log "OK   $name"
    return 0
  fi
  if ((rc == 124 || rc == 137)); then
    log "FAIL $name: timed out after ${t}s (rc=$rc); last lines:"
  else
    log "FAIL $name: rc=$rc; last lines:"
  fi
  tail -n 20 "$DIR/$name.log" | sed 's/^/    /' | tee -a "$DIR/summary.txt"
  FAILED+=("$name")
  return 1
}

log "output folder: $DIR"

# 1. install (no network: no dependencies, no isolated build environment)
if [[ -z ${GPU_CHECK_NO_INSTALL:-} ]]; then
  # pyproject's SPDX license string needs setuptools >= 77. Where the machine's setuptools is
  # older (the isolated build that would fetch a newer one needs the network), the package is
  # imported from the work tree instead: a folder holding only a link named fusedmlp to it.
  if ! step install 90 "$PY" -m pip install --no-deps --no-build-isolation -e .; then
    mkdir -p "$DIR/pkg" && ln -sfn "$PWD" "$DIR/pkg/fusedmlp"
    export PYTHONPATH="$DIR/pkg${PYTHONPATH:+:$PYTHONPATH}"
    log "install failed: fusedmlp imported from the work tree (PYTHONPATH=$DIR/pkg)"
  fi
fi

# 2. environment
step env 30 bash -c "
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  '$PY' - <<'EOF'
import platform
import torch
import triton
import fusedmlp
print('python', platform.python_version())
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('triton', triton.__version__)
try:
    import setuptools
    print('setuptools', setuptools.__version__)
except ImportError:
    print('setuptools: none')
print('fusedmlp', fusedmlp.__version__, fusedmlp.__file__)
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
"
cat "$DIR/env.log" >>"$DIR/summary.txt" 2>/dev/null

# 3. the curated compiled subset of the tests
SELECTED=()
for f in "${TESTS[@]}"; do
  if [[ -f $f ]]; then SELECTED+=("$f"); else log "note: $f does not exist, not run"; fi
done
if ((${#SELECTED[@]})); then
  # pytest-xdist (in the GPU image) spreads the kernel compiles over the CPU cores.
  XDIST=()
  # (without it, pyproject.toml's "-n auto" would be an unknown option: addopts replaced)
  if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); else XDIST=(-o "addopts=-ra"); fi
  # -v: one line per test as it ends, so a run cut off by the timeout still names its failures;
  # --maxfail=100: the twenty-fourth session's run stopped at 29 failures (xdist stops late),
  # and the tests it did not reach went unseen on the GPU
  step tests 200 env FUSEDMLP_AUTOTUNE=0 "$PY" -m pytest -v -p no:cacheprovider --maxfail=100 \
    ${XDIST[@]+"${XDIST[@]}"} \
    -k 'not fuzz and not hypothesis' --durations=15 -rfEs "${SELECTED[@]}"
  grep -E "(FAILED|ERROR) tests/" "$DIR/tests.log" 2>/dev/null | sort -u | head -n 100 |
    tee -a "$DIR/summary.txt"
  tail -n 3 "$DIR/tests.log" 2>/dev/null | tee -a "$DIR/summary.txt"
else
  log "FAIL tests: none of the curated test files exists"
  FAILED+=("tests (none found)")
fi

# 3b. the main job on the GPU (README: `fusedmlp train`), as a user runs it (autotuning on):
# scikit-learn's digits when sklearn is importable, else the generated 2-D disc problem
DATASET=(--dataset disc)
"$PY" -c "import sklearn" 2>/dev/null && DATASET=(--dataset digits)
step train 60 "$PY" -m fusedmlp train "${DATASET[@]}" --epochs 5 --no-progress
tail -n 6 "$DIR/train.log" 2>/dev/null | tee -a "$DIR/summary.txt"
# the same with each model's step captured in a CUDA graph (no host launch time in either)
step train_graph 60 "$PY" -m fusedmlp train "${DATASET[@]}" --epochs 5 --no-progress --cuda-graph
tail -n 6 "$DIR/train_graph.log" 2>/dev/null | tee -a "$DIR/summary.txt"

# 4. issue 8's step (w1024 B16K TF32) with each impl's whole step captured in a CUDA graph: the
# GPU's time of both steps, without the host's (fusedmlp's Python sets its event time on these
# machines), and its A/B rows (TF32 on the pointer kernel, the dW split on the pointer kernel):
# which TMA default earns its place. Cold here (the kernels compile and tune in this step).
step step_graph 100 "$PY" benchmarks/target_grid.py --grid step --graph \
  --json "$DIR/step_graph.json" --markdown "$DIR/step_graph.md"
cat "$DIR/step_graph.md" >>"$DIR/summary.txt" 2>/dev/null

# 5. the kernel-only GPU time of the same step, the default and its TMA A/B rows beside torch's:
# each kernel's share (the launched step's event time is the host's, so no event pass)
step kernel_times 80 "$PY" benchmarks/kernel_times.py --out "$DIR" --budget 60 --sections step \
  --passes kernel --match 'w1024 B16K tf32 (torch|fusedmlp dz($|, TF32 on|, dW split on))'
# its table and each row's costliest kernels (the tuned configurations stay in the log)
sed -n '/^case /,/^tuned configurations/p' "$DIR/kernel_times.log" 2>/dev/null | sed '$d' |
  tee -a "$DIR/summary.txt" >/dev/null

# 6. issue 3's small widths (64, 128, 256 at batch 16K; bf16 and fp32; forward and backward),
# each case timed as CUDA graph replays, fusedmlp and torch alike: their GPU time, without the
# host's launch cost that sets them when launched from Python on the GPU machines (step 9)
step small_graph 40 "$PY" benchmarks/target_grid.py --grid small --graph \
  --json "$DIR/small_graph.json" --markdown "$DIR/small_graph.md"
cat "$DIR/small_graph.md" >>"$DIR/summary.txt" 2>/dev/null

# 7. fusedmlp bench --quick (saves its JSON after every case, so a timeout keeps what ran)
# keep 30 s for results_md (RESULTS.md is made even when the bench times out) and the targets
# (the grids after it get what the budget leaves: skip them to give the bench their seconds)
t=$(($(left) - 30))
((t > 170)) && t=170
# (a cold machine's first cases compile and autotune for seconds each: the seventeenth
# session's bench ran 35 s past a 53-s budget)
bench_budget=$((t - 45))
((bench_budget < 10)) && bench_budget=10
PLOT=()
if "$PY" -c "import matplotlib" 2>/dev/null; then
  PLOT=(--plot "$DIR/bench.png")
else
  log "note: matplotlib missing, no bench.png"
fi
step bench "$t" "$PY" -m fusedmlp bench --quick --time-budget "$bench_budget" \
  --json "$DIR/bench.json" --markdown "$DIR/bench.md" ${PLOT[@]+"${PLOT[@]}"}
if [[ -f "$DIR/bench.json" ]]; then
  step results_md 20 "$PY" benchmarks/results_md.py "$DIR/bench.json" -o "$DIR/RESULTS.md"
fi

# 8. issue 4's cross-entropy grid (C 32K-128K, bf16 and fp32; about 15 s on an H100; issue 4 is
# resolved: this checks its figures still hold)
step target_grid 40 "$PY" benchmarks/target_grid.py --json "$DIR/target_grid.json" \
  --markdown "$DIR/target_grid.md"

# 9. the same small widths, each call launched from Python (the bench's timing)
step small_grid 40 "$PY" benchmarks/target_grid.py --grid small --json "$DIR/small_grid.json" \
  --markdown "$DIR/small_grid.md"
cat "$DIR/small_grid.md" >>"$DIR/summary.txt" 2>/dev/null

# 10. the TMA forward kernel against the pointer kernel and torch (bf16 8192^3 and
# 16384 x 4096 x 4096, TF32 16384 x 1024 x 1024; forward and backward): where FUSEDMLP_TMA
# should be the default; and issue 7's Adam over 1,000 small tensors. What the budget leaves,
# less 15 s for the targets after it.
tma_max=$(($(left) - 15))
((tma_max > 70)) && tma_max=70
step tma_grid "$tma_max" "$PY" benchmarks/target_grid.py --grid optim,tma --json "$DIR/tma_grid.json" \
  --markdown "$DIR/tma_grid.md"
cat "$DIR/tma_grid.md" >>"$DIR/summary.txt" 2>/dev/null

# 11. the open issues' speed targets from this run's JSON files (met / not met / not measured)
step targets 10 "$PY" benchmarks/targets.py "$DIR" -o "$DIR/targets.md"
cat "$DIR/targets.md" >>"$DIR/summary.txt" 2>/dev/null

# 12. where a training step's time goes (fixed configurations: no autotuning inside the profile);
# 65536x64: the bench's narrow step, 2.9x slower than eager in the seventh session's run 1
step profile 75 env FUSEDMLP_AUTOTUNE=0 "$PY" benchmarks/profile_step.py --out "$DIR/profile" \
  --shapes 64x256,16384x1024,65536x64 --steps 10
cat "$DIR/profile/summary.txt" >>"$DIR/summary.txt" 2>/dev/null

# 13. int64 indexing: one tensor beyond 2^31 elements
step int64 60 "$PY" - <<'EOF'
import torch

import fusedmlp
import fusedmlp.functional as FF

n = 2**31 + 1024
print(f"dropout over {n} fp16 elements ({n * 2 / 2**30:.2f} GiB)", flush=True)
torch.manual_seed(0)
x = torch.ones(n, device="cuda", dtype=torch.float16, requires_grad=True)
with fusedmlp.use_backend("triton"):
    y = FF.dropout(x, p=0.5, training=True)
    torch.cuda.synchronize()
    valid = ((y == 0) | (y == 2)).all().item()
    kept = y.count_nonzero().item() / n
    tail_kept = y[2**31 :].count_nonzero().item() / 1024
    head_kept = y[:1024].count_nonzero().item() / 1024
    print(f"values in {{0, 2}}: {valid}; kept {kept:.5f}; head {head_kept:.3f} tail {tail_kept:.3f}")
    assert valid, "dropout output has values other than 0 and 1/(1-p)"
    assert abs(kept - 0.5) < 1e-3, kept
    assert 0.35 < tail_kept < 0.65, f"elements past 2^31 not written or not random: {tail_kept}"
    # no repetition: the mask past 2^31 is not the mask at the start (int32 offsets would wrap)
    assert not torch.equal(y[2**31 :] != 0, y[:1024] != 0), "mask repeats past 2^31"
    assert not torch.equal(y[2**31 :] != 0, y[2**31 - 1024 : 2**31] != 0)
    # backward regenerates the same mask, also past 2^31
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    for sl in (slice(0, 4096), slice(2**31 - 2048, 2**31 + 1024)):
        assert torch.equal(x.grad[sl], y[sl].detach()), f"backward mask differs at {sl}"
print("int64 dropout OK")
EOF

# 14. fusedmlp verify (written by another issue: tolerate it missing)
if "$PY" -m fusedmlp verify --help >/dev/null 2>&1; then
  # --time-budget: no new case 20 s before the step's timeout (what is left of the budget, at
  # most 80 s), so a verify that cannot finish here reports the checks it ran (INCOMPLETE)
  # instead of being killed
  vt=$(left)
  ((vt > 80)) && vt=80
  step verify "$vt" "$PY" -m fusedmlp verify --json "$DIR/verify.json" \
    --time-budget $((vt > 30 ? vt - 20 : 10))
else
  log "note: 'fusedmlp verify --help' fails: verify not available, skipped"
fi

log "elapsed $((SECONDS - START)) s"
rc=0
if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]}"
  rc=1
else
  log "all steps passed"
fi
# The device tool brings back at most 8 files from $OUT: every output in one archive.
tgz=$(mktemp) && tar -czf "$tgz" -C "$DIR" . && mv "$tgz" "$DIR/gpu_check.tgz" && chmod 644 "$DIR/gpu_check.tgz" &&
  echo "all outputs in $DIR/gpu_check.tgz"
exit $rc
