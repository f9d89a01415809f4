#!/usr/bin/env bash
# One call on a lent GPU machine (10 minutes a call): install, then one stage.
#   bash benchmarks/run_gpu.sh tests     # every test, GPU-only ones included
#   bash benchmarks/run_gpu.sh bench     # the benchmark suite without the torch.compile rows
#   bash benchmarks/run_gpu.sh compile   # only the torch.compile rows (minutes of compilation)
# Results: benchmarks/results/cuda-latest.json, copied to $OUT when set, then
#   python benchmarks/report.py <json> --readme README.md --png docs/results.png
set -euo pipefail
stage=${1:-tests}
pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "$stage" in
  tests)   python -m pytest tests -x -q -p no:cacheprovider ;;
  bench)   FASTDDPM_BENCH_COMPILE=0 python -m pytest benchmarks -q -p no:cacheprovider ;;
  compile) FASTDDPM_BENCH_JSON=benchmarks/results/cuda-compile.json \
             python -m pytest benchmarks -q -p no:cacheprovider -k "compile" ;;
  *) echo "stage must be tests, bench or compile; got $stage" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then cp benchmarks/results/cuda-*.json "$OUT"/ 2>/dev/null || true; fi
