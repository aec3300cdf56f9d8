#!/usr/bin/env bash
# One device call: GPU correctness tests at real sizes, then the side-by-side benchmark.
# Usage (repo root): bash bench/gpu_check.sh [--quick] [--sweep] [--variants]   (writes JSON/logs under $OUT or bench/results)
set -o pipefail
export PYTHONUNBUFFERED=1
OUTDIR="${OUT:-bench/results}"
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUTDIR/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  python3 -m pytest -q -m gpu tests/test_arrow_triton.py tests/test_engine_triton.py tests/test_attention_api.py -p no:cacheprovider 2>&1 | tee "$OUTDIR/pytest_gpu.log" | tail -25
fi
python3 bench/bench_arrow.py "$OUTDIR/bench_arrow.json" "$@" 2>&1 | tee "$OUTDIR/bench.log"
