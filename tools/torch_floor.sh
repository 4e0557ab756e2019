#!/usr/bin/env bash
# Run the test suite on one torch release from the package registry, in a fresh virtual environment.
#
#   tools/torch_floor.sh VERSION [--pyg VERSION] [--scratch DIR] [--record FILE] [--keep] [-- PYTEST ARGS]
#
# VERSION        the torch release, e.g. 2.5.1 (PyPI's Linux wheels are CUDA builds: several GB with the
#                nvidia-* packages; they run on CPU when no GPU is present)
# --pyg VERSION  the torch-geometric release (default: the newest; pass an older one when the newest does
#                not import on this torch)
# --scratch DIR  where the environment is made: DIR/torch-VERSION (default: ${TMPDIR:-/tmp}/blockquant-torch-floor)
# --record FILE  append one line to FILE: versions, the pytest summary, the first failure
# --keep         keep the environment afterwards (default: removed, it is large)
#
# The environment has no system site packages: it installs the repository as the README says
# (`-e ".[bench,test]"`) with torch pinned, so what runs is what a user of that release gets
# (the triton that torch release pins included). The result of the runs is in bench/results/torch_floor.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
[ $# -ge 1 ] || { sed -n '2,15p' "$0"; exit 2; }
VERSION=$1; shift
PYG=""
SCRATCH=${TMPDIR:-/tmp}/blockquant-torch-floor
RECORD=""
KEEP=0
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pyg) PYG=$2; shift 2 ;;
        --scratch) SCRATCH=$2; shift 2 ;;
        --record) RECORD=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        *) echo "torch_floor.sh: unknown argument '$1' (expected --pyg VERSION, --scratch DIR, --record FILE, --keep, -- PYTEST ARGS)" >&2; exit 2 ;;
    esac
done

ENV=$SCRATCH/torch-$VERSION
PY=$ENV/bin/python
PINS=$ENV/pins.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$SCRATCH"
if [ -x "$PY" ] && "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null; then
    echo "== reusing $ENV (torch $VERSION is installed there)"   # a kept or interrupted run's environment
else
    rm -rf "$ENV"
    python -m venv "$ENV"
    echo "torch==$VERSION" > "$PINS"
    [ -n "$PYG" ] && echo "torch-geometric==$PYG" >> "$PINS"
    # torch before 2.3 was built against numpy 1.x and cannot convert to or from numpy 2 arrays; the triton that
    # torch before 2.12 pins (3.6.0 and older) has an interpreter that turns 1-element arrays into Python ints
    # with int(), which numpy 2.4 refuses (the CPU tests run the Triton kernels through that interpreter)
    "$PY" - "$VERSION" >> "$PINS" <<'PYEOF'
import sys
major, minor = (int(p) for p in sys.argv[1].split(".")[:2])
if (major, minor) < (2, 3):
    print("numpy<2")
elif (major, minor) < (2, 12):
    print("numpy<2.4")
PYEOF
    "$PY" -m pip install -q --no-cache-dir -c "$PINS" "torch==$VERSION"
fi
# a snapshot of the working tree (tracked and new files, not ignored ones), so that editing the repository
# while a run goes on does not change what it tests
SRC=$ENV/src
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$SRC"
echo "== source: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' + uncommitted changes')"
# the snapshot declares no torch floor: the release under test is the one pinned above, whatever setup.py says
sed -i -E 's/"torch>=[0-9.]+"/"torch"/' "$SRC/setup.py"
grep -q '"torch",' "$SRC/setup.py" || { echo "torch_floor.sh: cannot find the torch requirement in setup.py" >&2; exit 2; }
"$PY" -m pip install -q --no-cache-dir -c "$PINS" -e "$SRC[bench,test]"
versions=$("$PY" -c 'import importlib.metadata as m
print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "torch-geometric", "triton", "numpy")
                if any(d.metadata["Name"] == p for d in m.distributions())))')
echo "== $versions"
# the private PyTorch APIs of blockquant/_compat.py, each tried on this release
# (loaded as a file: it imports only torch, so it reports even where `import blockquant` fails)
compat=$(cd "$SRC" && "$PY" -c "import importlib.util as u; s = u.spec_from_file_location('c', 'blockquant/_compat.py')
m = u.module_from_spec(s); s.loader.exec_module(m); m.report()" 2>&1 | tail -n 12 || true)
echo "$compat" | sed 's/^/== /'
# (an error's name at the start of a line: "ok      DelayedError" is an API that works)
missing=$(echo "$compat" | grep -E "^MISSING|^[A-Za-z_.]*(Error|Exception)\b" | cut -c 1-200 | paste -sd ';' - || true)

log=$SCRATCH/torch-$VERSION.pytest.log   # kept when the environment is removed
set +e
(cd "$SRC" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q -p no:cacheprovider -rfE "${PYTEST_ARGS[@]}") > "$log" 2>&1
rc=$?
set -e
# pytest's last line: "1 failed, 1500 passed, 80 skipped in 600.00s" (with -q, no "=" around it)
summary=$(grep -E "(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s" "$log" | tail -n 1 \
          | sed -E 's/^=+ //; s/ =+$//' || true)
first=$(grep -m 1 -E "^(FAILED|ERROR) " "$log" | cut -c 1-300 || true)
echo "== $summary"
[ -n "$first" ] && echo "== first failure: $first"
if [ -n "$RECORD" ]; then
    echo "| $versions | ${summary:-pytest exit $rc, no summary (see the log)} | ${first:-} | ${missing:-all work} |" >> "$RECORD"
fi
[ "$KEEP" = 1 ] || rm -rf "$ENV"   # the snapshot goes with it
exit "$rc"
