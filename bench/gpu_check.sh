#!/usr/bin/env bash
# The GPU check of the two-process design (docs/budget.md, bench/RESULTS.md): on a lent
# GPU machine, in under 8 minutes, one table of steps/s for
#   12 layers x 12 heads, d_model 768,  L=1024, bf16 autocast, batch 1
#   24 layers x 16 heads, d_model 1024, L=2048, bf16 autocast, batch 1
# plain (a), idle (b: Dashboard.start, history on, nobody watching) and watched (c: one
# viewer on every layer and head at 10 fps), and the same two with the server in threads
# of the training process (B, C: the design before), windows interleaved in one run, with
# the dashboard's own figures (CPU accounting, and the slowdown it measured) beside them.
# Target: idle >= 0.98x, watched >= 0.97x.
#
# The device image has torch but not the web stack: fetch the wheels here first (once),
#     bash bench/gpu_wheels.sh            # -> .whl/, ignored by git
# then, with the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package from the tree (server/ is attnscope): an editable-free install into /tmp/site
"$PY" -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . \
    >/dev/null
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import torch, attnscope; assert torch.cuda.is_available(), "no CUDA here"
print("torch", torch.__version__, torch.cuda.get_device_name(0), "attnscope", attnscope.__version__)'
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv || true
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
common=(--device cuda --bf16 --threads 4 --repeats 2 --seconds 6 --warmup 150 --modes abcBC)
"$PY" bench/scale.py "${common[@]}" --seq 1024 2>&1 | tee "$OUT/gpu-12x12-L1024.txt"
"$PY" bench/scale.py "${common[@]}" --layers 24 --heads 16 --d-model 1024 --seq 2048 \
    2>&1 | tee "$OUT/gpu-24x16-L2048.txt"
echo
echo "== the two tables =="
for f in "$OUT"/gpu-*.txt; do
    echo "$(basename "$f")"
    sed -n '/^| mode/,$p' "$f"
done
