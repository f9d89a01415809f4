#!/usr/bin/env bash
# The first GPU run in one command (15 minutes of device time a session, 10 a command):
#   bash benchmarks/run_gpu.sh OUT               # on the GPU machine: OUT/1-env.json ... OUT/5-tests.json
#   bash benchmarks/run_gpu.sh --rehearsal OUT   # the same code on the CPU (Triton's interpreter, tiny sizes)
# Parts, each with its own time budget, each file written as soon as its part ends (and after
# every row): 1 env, 2 smoke, 3 kernels, 4 sampling, 5 tests (benchmarks/gpu_run.py says what each measures).
# Extra arguments go to benchmarks/gpu_run.py (e.g. --parts 1,2 or --budget-scale 0.5).
# A Triton cache carried in benchmarks/triton-cache-sm90/ (git-ignored; name it in the device
# tool's carry) is used as TRITON_CACHE_DIR (README, "The GPU run").
# Then: python -m benchmarks.report OUT --readme README.md --png docs/results.png
set -euo pipefail
cd "$(dirname "$0")/.."
rehearsal=()
if [ "${1:-}" = "--rehearsal" ]; then rehearsal=(--rehearsal); shift; fi
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/run_gpu.sh [--rehearsal] OUT [gpu_run.py options]" >&2; exit 2
fi
out=$1; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The install: this checkout importable as fastddpm (with fastddpm.kernels) from anywhere.
where() { (cd / && python -c "import fastddpm, fastddpm.kernels.step; print(fastddpm.__file__)" 2>/dev/null) || true; }
here=$(pwd)/fastddpm/__init__.py
if [ "$(where)" = "$here" ]; then
  export FASTDDPM_INSTALL="already installed from this checkout"
elif pip install -q --no-deps --no-build-isolation -e . >"$out/.pip.log" 2>&1 && [ "$(where)" = "$here" ]; then
  export FASTDDPM_INSTALL="pip install --no-deps --no-build-isolation -e ."
else  # no setuptools / wheel there: a copy laid out as the wheel lays it out
  site=$(mktemp -d)
  cp -r fastddpm "$site/fastddpm" && cp -r kernels "$site/fastddpm/kernels"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export FASTDDPM_INSTALL="pip install failed ($(tail -n 1 "$out/.pip.log" | cut -c1-200)); a copy on PYTHONPATH: $site"
fi
rm -f "$out/.pip.log"

# A Triton cache compiled ahead for sm_90 (benchmarks/triton_cache.py), if it travelled here.
if [ ${#rehearsal[@]} -eq 0 ] && [ -d benchmarks/triton-cache-sm90 ] && [ -z "${TRITON_CACHE_DIR:-}" ]; then
  export TRITON_CACHE_DIR=/tmp/fastddpm-triton-cache
  mkdir -p "$TRITON_CACHE_DIR" && cp -r benchmarks/triton-cache-sm90/. "$TRITON_CACHE_DIR"/
  export FASTDDPM_TRITON_CACHE_CARRIED="benchmarks/triton-cache-sm90 ($(ls benchmarks/triton-cache-sm90 | wc -l) entries)"
fi
python -m benchmarks.gpu_run "${rehearsal[@]}" "$out" "$@"
