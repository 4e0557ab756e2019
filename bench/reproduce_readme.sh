#!/usr/bin/env bash
# Reproduce the README's benchmark tables.
#
#   bench/reproduce_readme.sh [quick|cora|arxiv-like|all]     (default: all)
#
# Environment:
#   DEVICE      cpu (default), cuda, cuda:N or auto
#   CORA_RAW    folder holding the Planetoid Cora raw files (ind.cora.*);
#               default /work/shared/data/planetoid/Cora/raw. They are copied to a
#               temporary --root because Planetoid writes processed/ next to raw/.
#   OUT         where result folders go (default: bench/results); each run writes
#               results.json (machine, versions, command line included), results.csv
#               and three PNG plots into $OUT/bench_<name>_<device>/.
#   EPOCHS_ARXIV / SEEDS_ARXIV   override the arxiv-like run length (CPU default: 20 x 1;
#               with a GPU use e.g. EPOCHS_ARXIV=300 SEEDS_ARXIV=5).
set -euo pipefail
cd "$(dirname "$0")/.."

WHAT="${1:-all}"
DEVICE="${DEVICE:-cpu}"
OUT="${OUT:-bench/results}"
CORA_RAW="${CORA_RAW:-/work/shared/data/planetoid/Cora/raw}"
TAG="${DEVICE//:/}"
BQ="${BQ:-python -m blockquant}"

run_quick() {
  # the bare command, with an output folder
  $BQ bench --device "$DEVICE" --out "$OUT/bench_quick_$TAG"
}

run_cora() {
  local root
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' RETURN
  mkdir -p "$root/Cora"
  cp -r "$CORA_RAW" "$root/Cora/raw"
  $BQ bench --dataset cora --root "$root" --model sage --hidden 128 --layers 3 \
    --configs fp32,checkpoint,exact,iexact,default,int4,int8 \
    --epochs 200 --seeds 5 --device "$DEVICE" --out "$OUT/bench_cora_$TAG"
}

run_arxiv_like() {
  $BQ bench --dataset synthetic:arxiv-like --model sage --hidden 128 --layers 3 \
    --configs fp32,checkpoint,exact,iexact,default \
    --epochs "${EPOCHS_ARXIV:-20}" --seeds "${SEEDS_ARXIV:-1}" --device "$DEVICE" \
    --out "$OUT/bench_arxiv-like_$TAG"
}

case "$WHAT" in
  quick) run_quick ;;
  cora) run_cora ;;
  arxiv-like) run_arxiv_like ;;
  all) run_quick; run_cora; run_arxiv_like ;;
  *) echo "usage: $0 [quick|cora|arxiv-like|all]" >&2; exit 2 ;;
esac
