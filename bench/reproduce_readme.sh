#!/usr/bin/env bash
# Reproduce the README's benchmark tables.
#
#   bench/reproduce_readme.sh [quick|cora|arxiv-like|arxiv-peak|all]     (default: all)
#
#   arxiv-peak: peak step memory and step time of SAGE and GAT (3 layers, hidden 128; GAT as
#   8 heads x 16) on the arxiv-like graph for fp32, fp32-sparse, checkpoint, exact, iexact,
#   default (2 epochs, 1 seed: a memory run). MODELS_PEAK overrides the model list.
#
# Environment:
#   DEVICE      cpu (default), cuda, cuda:N or auto
#   CORA_RAW    folder holding the Planetoid Cora raw files (ind.cora.*);
#               default ../shared/data/planetoid/Cora/raw (the shared folder beside the repository). They are copied to a
#               temporary --root because Planetoid writes processed/ next to raw/.
#   OUT         where result folders go (default: bench/results); each run writes
#               results.json (machine, versions, command line included), results.csv
#               and three PNG plots into $OUT/bench_<name>_<device>/.
#   EPOCHS_CORA / SEEDS_CORA, EPOCHS_ARXIV / SEEDS_ARXIV   run lengths. Defaults: on CPU
#               Cora 40 epochs x 3 seeds and arxiv-like 5 epochs x 1 seed (memory numbers do not
#               depend on the length; a 2-core CPU needs ~20 s per arxiv-like epoch); with a
#               GPU (DEVICE=cuda*) Cora 200 x 10 and arxiv-like 300 x 5.
set -euo pipefail
cd "$(dirname "$0")/.."

WHAT="${1:-all}"
DEVICE="${DEVICE:-cpu}"
OUT="${OUT:-bench/results}"
CORA_RAW="${CORA_RAW:-$(cd .. && pwd)/shared/data/planetoid/Cora/raw}"
TAG="${DEVICE//:/}"
if [[ "$DEVICE" == cuda* ]]; then LONG=1; else LONG=0; fi
EPOCHS_CORA="${EPOCHS_CORA:-$([[ $LONG == 1 ]] && echo 200 || echo 40)}"
SEEDS_CORA="${SEEDS_CORA:-$([[ $LONG == 1 ]] && echo 10 || echo 3)}"
EPOCHS_ARXIV="${EPOCHS_ARXIV:-$([[ $LONG == 1 ]] && echo 300 || echo 5)}"
SEEDS_ARXIV="${SEEDS_ARXIV:-$([[ $LONG == 1 ]] && echo 5 || echo 1)}"
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
    --configs fp32,checkpoint,exact,iexact,default,int4 \
    --epochs "$EPOCHS_CORA" --seeds "$SEEDS_CORA" --device "$DEVICE" --out "$OUT/bench_cora_$TAG"
}

run_arxiv_like() {
  $BQ bench --dataset synthetic:arxiv-like --model sage --hidden 128 --layers 3 \
    --configs fp32,checkpoint,exact,iexact,default \
    --epochs "$EPOCHS_ARXIV" --seeds "$SEEDS_ARXIV" --device "$DEVICE" \
    --out "$OUT/bench_arxiv-like_$TAG"
}

run_arxiv_peak() {
  local model
  for model in ${MODELS_PEAK:-sage gat}; do
    $BQ bench --dataset synthetic:arxiv-like --model "$model" --hidden 128 --layers 3 \
      --configs fp32,fp32-sparse,checkpoint,exact,iexact,default \
      --epochs 2 --seeds 1 --device "$DEVICE" --quiet --out "$OUT/bench_arxiv-like_peak_${model}_$TAG"
  done
}

case "$WHAT" in
  quick) run_quick ;;
  cora) run_cora ;;
  arxiv-like) run_arxiv_like ;;
  arxiv-peak) run_arxiv_peak ;;
  all) run_quick; run_cora; run_arxiv_like ;;
  *) echo "usage: $0 [quick|cora|arxiv-like|arxiv-peak|all]" >&2; exit 2 ;;
esac
