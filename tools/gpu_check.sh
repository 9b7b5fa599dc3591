#!/usr/bin/env bash
# Everything a session with a GPU should run, in one call (GPU time is scarce; see
# ../shared/PERF.md): build and self-check the CUDA kernels, the GPU tests, then the
# figures the README's GPU section and issue 9 ask for. Full outputs land in $OUT
# (default ./gpu_out), one file per step; a summary prints last. Each step gets at most
# its cap and never more than what is left of BUDGET seconds, so the whole run fits one
# device call:  OUT=$OUT BUDGET=540 bash tools/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
start=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}          # H100/H200: build one architecture
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}  # compile once, reuse in later steps
PY=${PYTHON:-python3}

step() {  # step NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - start)))
    if ((left < 20)); then
        echo "$name: skipped, budget spent" | tee -a "$OUT/summary.txt"
        return
    fi
    ((cap > left)) && cap=$left
    local t0
    t0=$(date +%s)
    timeout "$cap" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc=$rc after $(($(date +%s) - t0)) s (cap $cap s)" | tee -a "$OUT/summary.txt"
}

: >"$OUT/summary.txt"
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
    >"$OUT/env.txt" 2>&1
# 1. Kernels against their twins (also builds the extension, ~1 min).
step kernels 200 $PY kernels.py
# 2. GPU tests: kernels, engine on CUDA vs CPU, CUDA graphs vs eager, prefill kernel in the engine.
step gpu_tests 150 $PY -m pytest -q -x tests/test_kernels_gpu.py
# 3. Llama-2-7B shape, bf16, batch 1: decode with and without CUDA graphs against the copy
#    roofline (goal >= 205 tok/s), and int8/int4 decode and prefill against bf16 (goal >= 3x).
step llama7b 240 $PY tools/bench.py latency quant --model random:llama-2-7b --dtype bfloat16 --max-model-len 1024 \
    --out "$OUT/llama7b.json"
# 4. TinyLlama shape: batch-1 decode (goal >= 800 tok/s) and the nano-vllm workload.
step tinyllama 200 $PY tools/bench.py latency throughput --model random:tinyllama-1.1b --dtype bfloat16 \
    --out "$OUT/tinyllama.json"

echo
for f in kernels gpu_tests llama7b tinyllama; do
    [ -f "$OUT/$f.txt" ] && { echo "== $f"; grep -v '^\[bench\]' "$OUT/$f.txt" | tail -n 25; }
done
echo "== summary"
cat "$OUT/summary.txt"
