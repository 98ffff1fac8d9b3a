#!/usr/bin/env bash
# Everything that needs a GPU, in one run from the source tree (no install; the GPU machine has
# torch, triton, typer, rich, safetensors, pytest and pytest-benchmark). Writes to $OUT (default
# bench/gpu-out) gpu-run.log (every step's output), the JSON files and RESULTS.md
# rendered from them; copy the JSON files into bench/ and rerun `stemgen bench-report` there to
# publish them in bench/RESULTS.md.
#   bash bench/gpu_run.sh            # about 8-10 minutes on one H200 (estimate: 4 minutes the first time,
#                                    # before the attention sweep's configurations and their tests)
#   Within a 10-minute command limit, two calls (files come back from each; OUT=$OUT):
#   ONLY="tests attn paper graphs attn-paper" bash bench/gpu_run.sh
#   ONLY="kernels profile profile-graphs sweep sweep-graphs e2e report" bash bench/gpu_run.sh
#   SMOKE=1 bash bench/gpu_run.sh    # the same steps on a CPU with tiny shapes: checks the script only
#   ONLY="tests kernels" bash ...     # only these steps (tests kernels attn paper graphs attn-paper profile profile-graphs
#                                     # sweep sweep-graphs e2e magnet report), e.g. to split the work over two 10-minute calls
set -uo pipefail
OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# run from the source tree: no C++ extension is built here (its tests skip, saying so)
export STEMGEN_NO_NATIVE=1
py=${PYTHON:-python3}
tests=(tests/test_op_*.py tests/test_backend.py tests/test_sync_free.py tests/test_cuda_graphs.py tests/test_parity.py
       tests/test_scheduler.py tests/test_magnet.py)
if [ "${SMOKE:-0}" = 1 ]; then   # check this script's plumbing on a CPU: tiny shapes, interpreter, no graphs
    export TRITON_INTERPRET=1 STEMGEN_BENCH_SMOKE=1
    tests=(tests/test_sync_free.py); size=(--config tiny --duration 1 --steps 2,1,1,1 --device cpu)
    prof=(--config tiny --device cpu --frames 20 --steps 2); graphs=(); eager=()
else
    unset TRITON_INTERPRET
    size=(); prof=(); graphs=(--cuda-graphs); eager=(--no-cuda-graphs)
fi
status=0
LOG="$OUT/gpu-run.log"   # one log for every step: few files to fetch from a lent machine
: > "$LOG"
step() {  # step NAME COMMAND...: run, append its output to the log, remember a failure
    local name=$1; shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "== [$name] $*" | tee -a "$LOG"
    if declare -F "$1" >/dev/null; then "$@" 2>&1 | tee -a "$LOG"   # a function of this script
    else timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | tee -a "$LOG"; fi  # no step can eat a lent machine's time
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "!! [$name] failed (exit $rc)" | tee -a "$LOG"; status=1; }
}

$py - <<'PY' | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
# 1. correctness on the real hardware: kernels vs references (bf16 attention included), sync-free loop
step tests $py -m pytest -q -rs "${tests[@]}"
# 2. kernels vs their references and torch SDPA at StemGen shapes
step kernels $py -m pytest -q bench/test_ops_bench.py --benchmark-json "$OUT/gpu-kernels.json" \
    --benchmark-columns=mean,median,min,rounds
# 2b. the attention op's configurations (RoPE placement, masking, TMA, tiles) against SDPA, GPU time by
#     CUDA events in CUDA graphs; the best over all shapes (attn-sweep.json, rewritten after each one)
rm -f "$OUT/attn-sweep.json"
STEP_TIMEOUT=${ATTN_TIMEOUT:-420} step attn $py bench/attn_sweep.py --json "$OUT/attn-sweep.json" \
    $([ "${SMOKE:-0}" = 1 ] && echo --smoke)
# 3. the paper config, 20 s, steps 128,64,32,32, multi-source CFG: engine vs baseline at batch 1
step paper $py -m stemgen bench --batch 1 "${size[@]}" "${eager[@]}" --json "$OUT/gpu-paper-20s.json"
# 3b. the same with the trunk replayed from CUDA graphs (engine only)
[ ${#graphs[@]} -gt 0 ] && step graphs $py -m stemgen bench --batch 1 --no-baseline "${graphs[@]}" \
    --json "$OUT/gpu-paper-20s-graphs.json"
# 3b'. the same with the attention sweep's best configuration (step attn), if it is not the engine's
attn_best() {
    local best
    best=$($py -c "import json, sys; r = json.load(open(sys.argv[1])); b = r.get('best', {}).get('config', '')
print(b if b and b != r['default'] else '')" "$OUT/attn-sweep.json") || return 1
    if [ -z "$best" ]; then echo "the engine's attention configuration is the sweep's best (or no sweep ran)"; return 0; fi
    echo "STEMGEN_FLASH_CONFIG=$best"
    # STEMGEN_BACKEND=triton: a failed self-check under this configuration is an error, not the PyTorch ops
    local backend=triton; [ "${SMOKE:-0}" = 1 ] && backend=auto   # (the smoke run's bench runs on the CPU)
    STEMGEN_BACKEND=$backend STEMGEN_FLASH_CONFIG=$best timeout "${STEP_TIMEOUT:-300}" $py -m stemgen bench --batch 1 \
        --no-baseline "${size[@]}" "${graphs[@]}" --json "$OUT/gpu-paper-20s-graphs-attn-best.json"
}
[ -f "$OUT/attn-sweep.json" ] && step attn-paper attn_best
# 3c. where a step's time goes (top kernels), eager and with CUDA graphs
step profile $py bench/profile_step.py "${prof[@]}"
[ ${#graphs[@]} -gt 0 ] && step profile-graphs $py bench/profile_step.py "${graphs[@]}"
# 4. throughput against batch size (engine only) to find where it saturates
step sweep $py -m stemgen bench --batch 1,2,4,8,16,32 "${size[@]}" --no-baseline "${eager[@]}" \
    --json "$OUT/gpu-paper-20s-sweep.json"
[ ${#graphs[@]} -gt 0 ] && step sweep-graphs $py -m stemgen bench --batch 1,4,16 --no-baseline "${graphs[@]}" \
    --json "$OUT/gpu-paper-20s-sweep-graphs.json"
# 5. `stemgen generate` end to end on the shipped demo model (codec included), whole process each time:
#    a 20 s synthetic context; the first run pays Triton's compiles, then warm, eager and with graphs.
#    Reading audio needs soundfile, which the GPU machines lack: download its wheels for Python 3.12
#    (soundfile, cffi, pycparser) into .whl/ and carry that folder; they are installed to /tmp.
e2e() {
    local ctx=/tmp/stemgen-ctx.wav
    $py - "$ctx" <<'PY' || return 1
import math, struct, sys, wave
sr, n = 32000, 32000 * 20
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(sr)
    w.writeframes(b"".join(struct.pack("<h", int(8000 * (math.sin(2 * math.pi * 110 * i / sr)
                  * (1 if (i // 8000) % 2 == 0 else 0.3) + 0.5 * math.sin(2 * math.pi * 165 * i / sr))))
                  for i in range(n)))
PY
    local run t0 t1
    local runs=("cold cuda --no-cuda-graphs" "warm cuda --no-cuda-graphs" "graphs cuda --cuda-graphs")
    [ "${SMOKE:-0}" = 1 ] && runs=("cpu cpu")
    for run in "${runs[@]}"; do
        set -- $run
        t0=$(date +%s.%N)
        timeout "${STEP_TIMEOUT:-300}" $py -m stemgen generate "$ctx" -i bass -o /tmp/stemgen-bass.wav -m demo \
            --device "$2" "${@:3}" \
            > /tmp/stemgen-e2e.log 2>&1 || { cat /tmp/stemgen-e2e.log; return 1; }
        t1=$(date +%s.%N)
        echo "e2e $1 device=$2 ${*:3}: $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s wall (20 s context, demo model, default steps)"
    done
}
if [ -d .whl ] && ! $py -c "import soundfile" 2>/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/stemgen-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/stemgen-site"
fi
step e2e e2e
# 6. MAGNeT on the GPU: a random MAGNeT-small engine model (d 1024, 24 layers), 10 s, steps 20,10,10,10,
#    bf16, batch 1 and 16 (engine only: audiocraft is not on the GPU machine unless carried)
if [ "${SMOKE:-0}" = 1 ]; then mag=(--device cpu --seconds 1 --steps 1,1,1,1 --batch 1 --engine-dtypes float32
                                  --random-size 64,2,4)
else mag=(--device cuda --batch 1,16 --engine-dtypes bfloat16); fi
step magnet $py bench/magnet_vs_audiocraft.py --random-small "$OUT/magnet-model" "${mag[@]}" --json "$OUT/magnet-small.json"
rm -rf "$OUT/magnet-model"
files=$(ls "$OUT"/gpu-*.json 2>/dev/null)
[ -n "$files" ] && step report $py -m stemgen bench-report $files --out "$OUT/RESULTS.md" --title "GPU benchmark results"
exit $status
