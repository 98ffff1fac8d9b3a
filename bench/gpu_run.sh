#!/usr/bin/env bash
# Everything that needs a GPU, in one run from the source tree (no install; the GPU machine has
# torch, triton, typer, rich, safetensors, pytest and pytest-benchmark). Writes logs and JSON to
# $OUT (default bench/gpu-out) and renders them into $OUT/RESULTS.md; copy the JSON files into
# bench/ and rerun `stemgen bench-report` there to publish them in bench/RESULTS.md.
#   bash bench/gpu_run.sh            # about 6-8 minutes on one H100 (estimate)
set -uo pipefail
OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
py=${PYTHON:-python3}
status=0
step() {  # step LOGNAME COMMAND...: run, log to $OUT/LOGNAME.log, remember a failure
    local log=$1; shift
    echo "== $*"
    "$@" 2>&1 | tee "$OUT/$log.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "!! failed (exit $rc): $*"; status=1; }
}

$py - <<'PY' | tee "$OUT/versions.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
# 1. correctness on the real hardware: kernels vs references (bf16 attention included), sync-free loop
step tests $py -m pytest -q -rs tests/test_triton_kernels.py tests/test_sync_free.py tests/test_cuda_graphs.py \
    tests/test_parity.py tests/test_scheduler.py
# 2. kernels vs their references and torch SDPA at StemGen shapes
step kernels $py -m pytest -q bench/test_kernels_bench.py --benchmark-json "$OUT/gpu-kernels.json" \
    --benchmark-columns=mean,median,min,rounds
# 3. the paper config, 20 s, steps 128,64,32,32, multi-source CFG: engine vs baseline at batch 1
step paper $py -m stemgen bench --batch 1 --json "$OUT/gpu-paper-20s.json"
# 3b. the same with the trunk replayed from CUDA graphs (engine only)
step graphs $py -m stemgen bench --batch 1 --no-baseline --cuda-graphs --json "$OUT/gpu-paper-20s-graphs.json"
# 3c. where a step's time goes (top kernels), eager and with CUDA graphs
step profile $py bench/profile_step.py
step profile-graphs $py bench/profile_step.py --cuda-graphs
# 4. throughput against batch size (engine only) to find where it saturates
step sweep $py -m stemgen bench --batch 1,2,4,8,16,32 --no-baseline --json "$OUT/gpu-paper-20s-sweep.json"
files=$(ls "$OUT"/gpu-*.json 2>/dev/null)
[ -n "$files" ] && step report $py -m stemgen bench-report $files --out "$OUT/RESULTS.md" --title "GPU benchmark results"
exit $status
