#!/usr/bin/env bash
# Issue 24's GPU checks and figures in ONE device run (sized for 6-7 minutes on one H100 or H200, not yet run; nothing is fetched
# there): tests/test_gpu.py, then benchmarks/align_ray.py (prepare img/s per core today vs now and B/32's score
# difference; B/32 and L/14 raw vs in the pipeline, decode on the CPU and on the GPU, GPU busy from NVML).
#
#   here, once:  bash benchmarks/gpu_wheels.sh      (fills .whl/: Ray, trimmed, and pydantic for Python 3.12)
#   then:        run(command="bash benchmarks/gpu_feed.sh", carry=[".whl"], timeout_s=560)
#
# Logs land in $OUT (test_gpu.log, align_ray.log); the figures are the lines after "prepare on one core" and the
# "goals" block at the end. SIZES / DECODE / BATCH override the benchmark's defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-feed-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export PAIRFORGE_CACHE=/tmp/pairforge-cache PREFECT_HOME=/tmp/prefect-home
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ carried: run bash benchmarks/gpu_wheels.sh here first (Ray and pydantic are not in the GPU image)"
  export PYTHONPATH=$PWD
fi
"$PY" - <<'EOF' || exit 1
import importlib
for m in ("torch", "torchvision", "transformers", "ray", "pydantic", "pyarrow", "PIL", "pynvml"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}", end="; ")
    except Exception as e:
        print(f"{m} MISSING ({type(e).__name__})", end="; ")
import torch
print(f"\nCUDA: {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
from stages.imaging import gpu_decode
print("GPU JPEG decoder:", gpu_decode.backend())
EOF
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader || true

echo "== tests/test_gpu.py"
timeout 170 "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra --durations=5" tests/test_gpu.py 2>&1 \
  | tee "$OUT/test_gpu.log" | grep -v -E " (INFO|WARNING) " | tail -25

echo "== benchmarks/align_ray.py"
timeout 400 "$PY" benchmarks/align_ray.py --scores --sizes "${SIZES:-clip-vit-b-32=40000,clip-vit-l-14=10000}" \
  --decode "${DECODE:-cpu,gpu}" --batch-size "${BATCH:-512}" --distinct "${DISTINCT:-1000}" 2>&1 | tee "$OUT/align_ray.log" \
  | grep -v -E " (INFO|WARNING) |UserWarning|warnings.warn|core_worker" | tail -40
