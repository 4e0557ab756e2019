#!/usr/bin/env bash
# Build torch-scatter and torch-sparse from their source distributions once, then run the tests
# that skip without them (NeighborLoader, ClusterLoader, SparseTensor inputs).
#
#   tools/build_torch_sparse.sh [--wheels DIR] [--venv DIR | --here] [--build-only] [--record FILE]
#
# --wheels DIR   wheel cache (default: ${XDG_CACHE_HOME:-~/.cache}/blockquant/wheels). Wheels are kept
#                per torch version (DIR/torch-<version>/): a wheel compiled against one torch does not load
#                in another. A wheel already there is reused, so only the first run compiles.
# --venv DIR     install into a virtual environment made at DIR with --system-site-packages (so it
#                sees this python's torch and torch-geometric), the repository installed editable
#                (default: a fresh one under ${TMPDIR:-/tmp})
# --here         install into the python this script runs ($PYTHON, default: python) instead
# --build-only   build (or find) the wheels and stop
# --record FILE  write the pytest summary (what ran, passed, skipped) to FILE
#
# ClusterLoader needs torch-sparse built with METIS: where METIS headers with 64-bit indices are installed
# (IDXTYPEWIDTH 64; Debian's libmetis-dev has 32-bit ones, which torch-sparse cannot compile against)
# torch-sparse is built WITH_METIS=1 and its wheel cached apart.
#
# Compiling takes about an hour per package on a loaded 2-core machine, 2.5 GB peak; MAX_JOBS=1 keeps it
# to one compiler at a time (set MAX_JOBS to change that). CI does not run this: there the tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python}
WHEELS=${XDG_CACHE_HOME:-$HOME/.cache}/blockquant/wheels
VENV=""
HERE=0
BUILD_ONLY=0
RECORD=""
SCATTER=torch-scatter==2.1.2
SPARSE=torch-sparse==0.6.18

while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --here) HERE=1; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --record) RECORD=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "build_torch_sparse.sh: unknown argument '$1' (expected --wheels DIR, --venv DIR, --here, --build-only, --record FILE)" >&2; exit 2 ;;
    esac
done

TORCH=$("$PYTHON" -c "import torch; print(torch.__version__)")
CACHE="$WHEELS/torch-$TORCH"
METIS=0
METIS_NOTE="no metis.h"
for dir in /usr/include /usr/local/include $(echo "${CPATH:-}" | tr : " "); do
    [ -f "$dir/metis.h" ] || continue
    # torch-sparse passes int64 indices to METIS: a METIS built with 32-bit idx_t (Debian's libmetis-dev)
    # fails to compile against it (metis_cpu.cpp: cannot convert int64_t* to idx_t*)
    if grep -qE '^#define IDXTYPEWIDTH 64' "$dir/metis.h"; then
        METIS=1
    else
        METIS_NOTE="$dir/metis.h has 32-bit idx_t (IDXTYPEWIDTH 32), which torch-sparse cannot use"
    fi
done
mkdir -p "$CACHE" "$CACHE-metis"

cache_of() {  # torch-sparse with METIS goes to its own folder: the same file name, another build
    if [ "$1" = "$SPARSE" ] && [ "$METIS" = 1 ]; then echo "$CACHE-metis"; else echo "$CACHE"; fi
}

wheel_for() {  # the cached wheel of a requirement "name==version", or nothing
    local name=${1%%==*} version=${1##*==}
    ls "$(cache_of "$1")"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n 1
}

[ "$METIS" = 1 ] && echo "METIS headers found: torch-sparse is built WITH_METIS=1 (ClusterLoader)" \
    || echo "$METIS_NOTE: torch-sparse is built without METIS (ClusterLoader will stay unavailable)"
for req in "$SCATTER" "$SPARSE"; do
    if [ -n "$(wheel_for "$req")" ]; then
        echo "reusing $(wheel_for "$req")"
        continue
    fi
    echo "building $req against torch $TORCH (about an hour on 2 cores) ..."
    start=$(date +%s)
    # --no-build-isolation: the extension compiles against the torch installed here, not a fresh one
    WITH_METIS=$METIS MAX_JOBS=${MAX_JOBS:-1} "$PYTHON" -m pip wheel --no-build-isolation --no-deps \
        -w "$(cache_of "$req")" "$req"
    echo "built $req in $(( $(date +%s) - start )) s"
done
[ "$BUILD_ONLY" = 1 ] && exit 0

if [ "$HERE" = 1 ]; then
    PY=$PYTHON
else
    VENV=${VENV:-$(mktemp -d "${TMPDIR:-/tmp}/blockquant-torch-sparse.XXXXXX")}
    "$PYTHON" -m venv --system-site-packages "$VENV"
    PY=$VENV/bin/python
    "$PY" -m pip install -q --no-deps -e "$REPO"
fi
# scipy: torch_sparse imports it
"$PY" -m pip install -q --no-deps "$(wheel_for "$SCATTER")" "$(wheel_for "$SPARSE")"
"$PY" -m pip install -q scipy
"$PY" -c "import torch_geometric.typing as t; assert t.WITH_TORCH_SPARSE and t.WITH_TORCH_SCATTER, 'torch_sparse/torch_scatter did not load'
print('torch_geometric.typing: WITH_TORCH_SPARSE', t.WITH_TORCH_SPARSE, 'WITH_METIS', t.WITH_METIS)"

# The tests that skip (or take their "not installed" branch) without torch-sparse: every mini-batch loader test,
# the SparseTensor adjacency tests and the NeighborLoader example of docs/scaling.md (tests/test_readme.py).
TESTS=(tests/test_minibatch.py tests/test_conv_wrappers.py tests/test_attention.py tests/test_functional.py
       tests/test_readme.py)
SELECT="test_minibatch or sparse_tensor or python_block_runs"
out=$(mktemp)
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" -k "$SELECT" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
if [ -n "$RECORD" ]; then
    {
        echo "# torch-sparse / torch-scatter run ($(date -u +%F), tools/build_torch_sparse.sh)"
        echo
        echo "torch $TORCH, $("$PY" -c 'import torch_geometric as g, torch_sparse as s, torch_scatter as c; print(f"torch-geometric {g.__version__}, torch-sparse {s.__version__}, torch-scatter {c.__version__}")')"
        echo "selection: pytest ${TESTS[*]} -k \"$SELECT\""
        echo
        echo '```'
        cat "$out"
        echo '```'
    } > "$RECORD"
fi
rm -f "$out"
exit "$rc"
