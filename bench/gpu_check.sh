#!/usr/bin/env bash
# What only a GPU can show, in one command of about 8 minutes on a fresh CUDA machine:
#
#   bash bench/gpu_check.sh              # default steps: install tests step codec chunks
#   bash bench/gpu_check.sh codec step   # or any steps, in the order given
#
# Everything checked without a GPU (CI on a CPU) is not repeated here: the kernels compile for
# sm_80/sm_90 without spills (tests/test_triton_aot.py), host syncs are counted per step on the
# CPU (tests/test_host_syncs.py), the device audit (tests/test_device_audit.py). This script
# measures what those cannot:
#
#   install  pip install --no-deps -e . for this checkout (keeps the machine's CUDA torch; a GPU
#            machine may have no network), after the wheels in a wheels/ directory beside setup.py
#            if there is one (--no-index: e.g. torch_geometric, pip download torch_geometric
#            --no-deps -d wheels). Then checks that torch (with CUDA), torch_geometric, triton and
#            pytest import. PIP_ARGS adds pip options. (~20 s)
#   tests    the CUDA tests, compiled kernels (pytest -m cuda): bit-identical nearest rounding
#            against the reference, compiled kernels cached, every bench model and PyG's GCN /
#            GATv2 converted and trained on the device against the unconverted model, host syncs
#            per step from torch.cuda.set_sync_debug_mode("warn") equal to the CPU counter's,
#            launches on a tensor's own device (two GPUs), per-device constants
#            -> gpu_tests_<device>.txt / .xml (~2 min)
#   step     bench/gpu_step.py: arxiv-like SAGE and GAT, configs fp32, fp32-sparse (plain PyG with
#            a sparse adj_t, the baseline), iexact, default: peak of one training step
#            (max_memory_allocated above the step's start, max_memory_reserved), step time
#            (median of STEPS) and its ratio to fp32-sparse (goal: iexact <= 1.10x), host syncs
#            of forward + backward by the CPU counter and by CUDA's sync detector
#            -> gpu_step_<device>.json / .md (~2 min)
#   codec    bench/codec_bandwidth.py, preset gpu (fp32/bf16 x int1/2/4/8 x uniform/optimal at
#            block 1024) and int2 at blocks 64/256/4096/row, on CODEC_N elements: GB/s against
#            the copy bandwidth measured beside each case (goal: >= 70% of copy at INT2 / 1024)
#            -> codec_bandwidth_<device>.json / .md and codec_blocks_<device>.* (~2 min)
#   chunks   the same codec at INT2/INT4 block 1024 on 1M, 4M, 16M and 64M elements: whether
#            blockquant's CUDA chunk size (save_policy.CHUNK_ELEMENTS["cuda"] = 16M) reaches
#            the large-tensor bandwidth -> codec_chunks_<device>_<n>.* (~30 s)
# Not in the default run (longer; name them to run them):
#   suite    the whole test suite with the compiled kernels -> gpu_suite_<device>.txt
#   arxiv    blockquant bench on synthetic:arxiv-like, SAGE and GAT, with accuracy (EPOCHS)
#   memory   bench/arxiv_memory.py --device cuda: track_saved against memory_allocated deltas
#
# Each step is bounded by its own timeout (STEP_TIMEOUT_<STEP>, seconds) and the whole run by
# DEADLINE (default 570 s, under a 10-minute command limit): a step that would start after the
# deadline is skipped and reported. A failed or timed-out step is recorded and the next one runs;
# the exit status is 1 if any step failed or was skipped.
# Everything lands in bench/results/ (RESULTS=...) with the GPU's name in the file names; the
# environment (nvidia-smi, versions, commit) goes to gpu_env_<device>.txt.
# Environment: PYTHON (python), RESULTS, DEADLINE, STEPS (10, gpu_step.py's timed steps),
# CODEC_N (67108864), CODEC_REPEATS (10), EPOCHS (10, arxiv), PIP_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
RESULTS="${RESULTS:-bench/results}"
DEADLINE="${DEADLINE:-570}"
STEPS="${STEPS:-10}"
EPOCHS="${EPOCHS:-10}"
CODEC_N="${CODEC_N:-67108864}"
CODEC_REPEATS="${CODEC_REPEATS:-10}"
DEFAULT_STEPS=(install tests step codec chunks)
ALL_STEPS=(install tests step codec chunks suite arxiv memory)
declare -A TIMEOUT=([install]=60 [tests]=180 [step]=180 [codec]=150 [chunks]=60 [suite]=1500 [arxiv]=900
                    [memory]=300)
WANTED=("$@")
if [[ ${#WANTED[@]} -eq 0 ]]; then WANTED=("${DEFAULT_STEPS[@]}"); fi

# the interpreter must stay off on a GPU machine: the point of this script is the compiled kernels
unset TRITON_INTERPRET BLOCKQUANT_TEST_INTERPRET BLOCKQUANT_BACKEND
mkdir -p "$RESULTS"
FAILED=()

device_slug() {
  "$PYTHON" - <<'EOF' 2>/dev/null || echo "unknown-gpu"
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda"
print(re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower())
EOF
}

log() { printf '\n=== %s (%s, %d s into the run) ===\n' "$*" "$(date -u +%H:%M:%S)" "$SECONDS"; }

run_step() {
  # a step is a shell function; run it in a child bash so that `timeout` can bound it
  local name="$1" fn="step_$1"
  local limit="${TIMEOUT[$1]}"
  local override="STEP_TIMEOUT_${1^^}"
  limit="${!override:-$limit}"
  if (( SECONDS + 10 > DEADLINE )); then
    FAILED+=("$name(skipped:deadline)")
    echo "step $name skipped: ${SECONDS} s of the ${DEADLINE} s deadline used"
    return
  fi
  if (( SECONDS + limit > DEADLINE )); then limit=$(( DEADLINE - SECONDS )); fi
  log "$name (timeout ${limit} s)"
  local start=$SECONDS
  export PYTHON RESULTS STEPS EPOCHS CODEC_N CODEC_REPEATS SLUG
  export -f "$fn"
  timeout --kill-after=15 "$limit" bash -c "set -o pipefail; $fn"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name(rc=$rc)")
    echo "step $name failed with status $rc after $((SECONDS - start)) s (124 = timed out after ${limit} s)"
  else
    echo "step $name done in $((SECONDS - start)) s"
  fi
}

step_install() {
  # offline-first and never replacing the machine's CUDA torch: the dependencies come from the
  # image, or from a wheels/ directory carried beside setup.py (pip download <pkg> -d wheels)
  if [[ -d wheels ]] && compgen -G "wheels/*.whl" > /dev/null; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q ${PIP_ARGS:-} --no-index --find-links wheels wheels/*.whl || return 1
  fi
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q ${PIP_ARGS:-} --no-deps --no-build-isolation -e . || return 1
  "$PYTHON" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "torch_geometric", "triton", "pytest", "blockquant") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing}; put their wheels in wheels/ (pip download ... -d wheels) "
             "or install them with network access")
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device (a CPU build of torch?)"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
EOF
}

step_env() {
  {
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PYTHON" -c "import torch_geometric; print('torch_geometric', torch_geometric.__version__)" 2>&1
    git rev-parse HEAD 2>/dev/null
    nproc
  } > "$RESULTS/gpu_env_$SLUG.txt" 2>&1
}

step_tests() {
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m cuda --junitxml "$RESULTS/gpu_tests_$SLUG.xml" \
    2>&1 | tee "$RESULTS/gpu_tests_$SLUG.txt"
  return "${PIPESTATUS[0]}"
}

step_step() {
  "$PYTHON" bench/gpu_step.py --steps "$STEPS" --out "$RESULTS/gpu_step_$SLUG.json"
}

step_codec() {
  "$PYTHON" bench/codec_bandwidth.py --device cuda --preset gpu --n "$CODEC_N" --repeats "$CODEC_REPEATS" \
    --finite-check --out "$RESULTS/codec_bandwidth_$SLUG.json" || return 1
  "$PYTHON" bench/codec_bandwidth.py --device cuda --dtypes float32 --bits 2 --blocks 64,256,4096,row \
    --levels uniform --n "$CODEC_N" --repeats "$CODEC_REPEATS" --out "$RESULTS/codec_blocks_$SLUG.json"
}

step_chunks() {
  local n rc=0
  for n in 1048576 4194304 16777216 67108864; do
    "$PYTHON" bench/codec_bandwidth.py --device cuda --dtypes float32 --bits 2,4 --blocks 1024 --levels uniform \
      --n "$n" --repeats "$CODEC_REPEATS" --out "$RESULTS/codec_chunks_${SLUG}_$n.json" || rc=1
  done
  return $rc
}

step_suite() {
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs --junitxml "$RESULTS/gpu_suite_$SLUG.xml" \
    2>&1 | tee "$RESULTS/gpu_suite_$SLUG.txt"
  return "${PIPESTATUS[0]}"
}

step_arxiv() {
  local model rc=0
  for model in sage gat; do
    "$PYTHON" -m blockquant bench --dataset synthetic:arxiv-like --model "$model" \
      --configs fp32,fp32-sparse,iexact,default --epochs "$EPOCHS" --seeds 1 --device cuda --quiet \
      --out "$RESULTS/bench_arxiv-like_${model}_$SLUG" || rc=1
  done
  return $rc
}

step_memory() {
  "$PYTHON" bench/arxiv_memory.py --device cuda --no-write 2>&1 | tee "$RESULTS/arxiv_memory_$SLUG.log"
  return "${PIPESTATUS[0]}"
}

SLUG=""
for step in "${WANTED[@]}"; do
  if [[ ! " ${ALL_STEPS[*]} " == *" $step "* ]]; then
    echo "gpu_check: unknown step '$step' (expected one of: ${ALL_STEPS[*]})"; exit 2
  fi
done
for step in "${WANTED[@]}"; do
  if [[ "$step" == "install" ]]; then run_step install; continue; fi
  if [[ -z "$SLUG" ]]; then
    SLUG="$(device_slug)"
    echo "device: $SLUG"
    if [[ "$SLUG" != "no-cuda" && "$SLUG" != "unknown-gpu" ]]; then step_env; fi
  fi
  if [[ "$SLUG" == "no-cuda" || "$SLUG" == "unknown-gpu" ]]; then
    echo "gpu_check: no CUDA device visible to torch ($SLUG); step $step needs one"; FAILED+=("$step(no-gpu)"); continue
  fi
  run_step "$step"
done

log "summary"
echo "results in $RESULTS (device: ${SLUG:-not probed}), ${SECONDS} s"
if [[ ${#FAILED[@]} -gt 0 ]]; then echo "failed: ${FAILED[*]}"; exit 1; fi
echo "all steps passed: ${WANTED[*]}"
