#!/usr/bin/env bash
# Everything issue 10 asks of a GPU, on a fresh CUDA machine, in one command:
#
#   bash bench/gpu_check.sh            # all steps: install tests codec finite arxiv memory
#   bash bench/gpu_check.sh codec      # or any subset, in the order given
#
# Steps (each bounded by STEP_TIMEOUT seconds, default 540, so that a session with a
# 10-minute limit per command can run them one by one; a step that fails or times out
# is recorded and the next one still runs; the exit status is 1 if any step failed):
#   install  pip install -e ".[test]" WITHOUT the CPU constraints file (keeps the machine's
#            CUDA torch); offline machines: falls back to --no-deps --no-build-isolation and
#            checks that torch, torch_geometric and pytest import. PIP_ARGS adds pip options
#            (e.g. "--no-index --find-links wheels/").
#   tests    the whole suite with the compiled kernels (TRITON_INTERPRET unset: the root
#            conftest turns the interpreter on only where there is no GPU, and the CUDA
#            tests assert that they ran compiled) -> gpu_tests_<device>.txt / .xml
#   codec    bench/codec_bandwidth.py: 64M elements, fp32/fp16/bf16, bits 1/2/4/8, blocks
#            64/256/1024/4096/row, uniform/optimal, quantize + dequantize, GB/s against the
#            copy bandwidth measured beside each case -> codec_bandwidth_<device>.json / .md
#   finite   the per-quantize finiteness check (one host-device sync per call) against
#            blockquant.defer_finite_check() (one per block of work), INT2/INT4 G1024 only
#            -> codec_finite_check_<device>.json / .md
#   arxiv    blockquant bench on synthetic:arxiv-like, SAGE and GAT, configs fp32,
#            fp32-sparse (if this version of the bench knows it), checkpoint, exact, iexact,
#            default -> bench_arxiv-like_<model>_<device>/ (activation and peak memory, epoch
#            time and its ratio to fp32)
#   memory   bench/arxiv_memory.py --device cuda: track_saved against torch.cuda.memory_allocated
#            deltas -> arxiv_memory_<device>.log
#
# Everything lands in bench/results/ (RESULTS=... to change) with the GPU's name in the
# file name; the environment (nvidia-smi, versions) goes to gpu_env_<device>.txt.
# Environment: EPOCHS (default 20), SEEDS (1), CODEC_N (67108864), CODEC_REPEATS (10),
# STEP_TIMEOUT (540), PYTHON (python).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
RESULTS="${RESULTS:-bench/results}"
STEP_TIMEOUT="${STEP_TIMEOUT:-540}"
EPOCHS="${EPOCHS:-20}"
SEEDS="${SEEDS:-1}"
CODEC_N="${CODEC_N:-67108864}"
CODEC_REPEATS="${CODEC_REPEATS:-10}"
STEPS=("$@")
if [[ ${#STEPS[@]} -eq 0 ]]; then STEPS=(install tests codec finite arxiv memory); fi

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

log() { printf '\n=== %s (%s) ===\n' "$*" "$(date -u +%H:%M:%S)"; }

run_step() {
  # a step is a shell function; run it in a child bash so that `timeout` can bound it
  local name="$1" fn="$2"
  log "$name"
  local start=$SECONDS
  export PYTHON RESULTS EPOCHS SEEDS CODEC_N CODEC_REPEATS SLUG
  export -f "$fn"
  timeout --kill-after=20 "$STEP_TIMEOUT" bash -c "set -o pipefail; $fn"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name(rc=$rc)")
    echo "step $name failed with status $rc after $((SECONDS - start)) s (124 = timed out after ${STEP_TIMEOUT} s)"
  else
    echo "step $name done in $((SECONDS - start)) s"
  fi
}

step_install() {
  # no constraints file: keep the machine's CUDA torch
  # shellcheck disable=SC2086
  if ! "$PYTHON" -m pip install ${PIP_ARGS:-} -e ".[test]"; then
    echo "pip install with dependencies failed (offline?); installing blockquant alone"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install ${PIP_ARGS:-} --no-deps --no-build-isolation -e . || return 1
  fi
  "$PYTHON" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "torch_geometric", "triton", "pytest", "blockquant") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing}; install them (pip install -e '.[test]' with network access)")
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device"
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
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs --junitxml "$RESULTS/gpu_tests_$SLUG.xml" \
    2>&1 | tee "$RESULTS/gpu_tests_$SLUG.txt"
  return "${PIPESTATUS[0]}"
}

step_codec() {
  "$PYTHON" bench/codec_bandwidth.py --device cuda --preset full --n "$CODEC_N" --repeats "$CODEC_REPEATS" \
    --out "$RESULTS/codec_bandwidth_$SLUG.json"
}

step_finite() {
  "$PYTHON" bench/codec_bandwidth.py --device cuda --preset cpu --bits 2,4 --levels uniform --n "$CODEC_N" \
    --repeats "$CODEC_REPEATS" --finite-check --out "$RESULTS/codec_finite_check_$SLUG.json"
}

step_arxiv() {
  local configs="fp32,checkpoint,exact,iexact,default" rc=0
  if "$PYTHON" -m blockquant bench --help 2>/dev/null | grep -q "fp32-sparse"; then
    configs="fp32,fp32-sparse,checkpoint,exact,iexact,default"
  else
    echo "this blockquant bench has no fp32-sparse config; running without it"
  fi
  for model in sage gat; do
    "$PYTHON" -m blockquant bench --dataset synthetic:arxiv-like --model "$model" --configs "$configs" \
      --epochs "$EPOCHS" --seeds "$SEEDS" --device cuda --quiet \
      --out "$RESULTS/bench_arxiv-like_${model}_$SLUG" || rc=1
  done
  return $rc
}

step_memory() {
  "$PYTHON" bench/arxiv_memory.py --device cuda --no-write 2>&1 | tee "$RESULTS/arxiv_memory_$SLUG.log"
  return "${PIPESTATUS[0]}"
}

SLUG=""
for step in "${STEPS[@]}"; do
  case "$step" in
    install) run_step install step_install ;;
    tests|codec|finite|arxiv|memory)
      if [[ -z "$SLUG" ]]; then
        SLUG="$(device_slug)"
        echo "device: $SLUG"
        if [[ "$SLUG" != "no-cuda" && "$SLUG" != "unknown-gpu" ]]; then step_env; fi
      fi
      if [[ "$SLUG" == "no-cuda" || "$SLUG" == "unknown-gpu" ]]; then
        echo "gpu_check: no CUDA device visible to torch ($SLUG); step $step needs one"; FAILED+=("$step(no-gpu)"); continue
      fi
      run_step "$step" "step_$step" ;;
    *) echo "gpu_check: unknown step '$step' (expected install, tests, codec, finite, arxiv, memory)"; exit 2 ;;
  esac
done

log "summary"
echo "results in $RESULTS (device: ${SLUG:-not probed})"
if [[ ${#FAILED[@]} -gt 0 ]]; then echo "failed: ${FAILED[*]}"; exit 1; fi
echo "all steps passed: ${STEPS[*]}"
