#!/usr/bin/env bash
# Everything a session with a GPU should run (GPU time is scarce; see ../shared/PERF.md), in
# two parts that each fit one device call, the second meant for the same warm machine (it
# reuses the extension the first compiled into .torch_ext):
#   OUT=$OUT BUDGET=450 bash tools/gpu_check.sh 1   # compile beside gpt-fast 7B, kernels vs twins + goals,
#                                                   # Llama-2-7B, GPU tests
#   OUT=$OUT BUDGET=300 bash tools/gpu_check.sh 2   # TinyLlama beside gpt-fast: batch-1 decode, the
#                                                   # nano-vllm workload; the host's time per step
#   OUT=$OUT BUDGET=540 bash tools/gpu_check.sh all # both, one call
# gpt-fast, the peer every decode figure stands beside, comes from ../shared/tools/peers; where
# the device gets only the checkout, copy it in first (git-ignored; pass .peers to the call's carry):
#   cp -r ../shared/tools/peers .peers
# Full outputs land in $OUT (default ./gpu_out), one file per step; a summary prints last.
# Each step gets at most its cap and never more than what is left of BUDGET seconds.
set -u
cd "$(dirname "$0")/.."
PART=${1:-1}
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
start=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}          # H100/H200: build one architecture
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}  # compile once, reuse in later steps
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PEER=.peers/gptfast_peer.py
[ -f "$PEER" ] || PEER=../shared/tools/peers/gptfast_peer.py

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
names=""
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    { nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
        >"$OUT/env.txt" 2>&1
    # 0. Compile the extension in the background (CPU only, ~2 min) while the GPU measures
    #    what needs no kernels of ours: gpt-fast's batch-1 decode (its torch.compile takes
    #    60-110 s of CPU too), then 2:4 sparse against dense matmuls.
    $PY -c "import kernels; kernels.cuda_extension()" >"$OUT/compile.txt" 2>&1 &
    compile=$!
    step gptfast_7b 170 $PY "$PEER" llama-2-7b
    step sparse 90 $PY -c "
import torch, sys; sys.path.insert(0, 'tools'); import bench
for r in bench.bench_sparse_speed(torch.device('cuda'))['rows']:
    print(r['shape'], r['rows'], bench.sparse_speed_text(r))"
    wait $compile
    echo "compile: rc=$? after $(($(date +%s) - start)) s from the start" | tee -a "$OUT/summary.txt"
    # 1. Every kernel against its twin; the GPU tests (engine on CUDA vs CPU, CUDA graphs vs
    #    eager, prefill kernel in the engine, 2:4); then each kernel at its goal's size.
    step kernels 60 $PY kernels.py
    step gpu_tests 120 $PY -m pytest -q -x tests/test_kernels_gpu.py -k "not every_kernel"
    step goals 90 $PY tools/kernel_bench.py goals
    # 2. Llama-2-7B shape, bf16, batch 1: decode with and without CUDA graphs against the copy
    #    roofline, where a step's time goes, int8/int4 decode and prefill against bf16 (and
    #    decode at batch 16 and 64, issue 34's engine rows).
    step llama7b 200 $PY tools/bench.py latency profile quant --model random:llama-2-7b --dtype bfloat16 \
        --max-model-len 1024 --out "$OUT/llama7b.json"
    #    The same batch-1 decode with its bf16 matmuls of up to 16 rows on dense_mma instead of
    #    cuBLAS (kernels.DENSE_MMA_MAX_ROWS; goals has the kernel beside cuBLAS), the output and
    #    down projections adding and norming in their own launch.
    step llama7b_dense_mma 70 env NANOSERVE_DENSE_MMA_ROWS=16 $PY tools/bench.py latency --model random:llama-2-7b \
        --dtype bfloat16 --max-model-len 1024 --out "$OUT/llama7b_dense_mma.json"
    #    A 4,096-token prompt's time to first token against SDPA over the same layers (issue 34).
    step prefill4k 60 $PY tools/bench.py prefill --model random:llama-2-7b --dtype bfloat16 --max-model-len 4097
    names="gptfast_7b sparse kernels gpu_tests goals llama7b llama7b_dense_mma prefill4k"
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    # 3. TinyLlama shape: batch-1 decode, a step's profile and the nano-vllm workload (256
    #    requests, 100-1024 tokens); the last two with async scheduling and synchronous steps.
    step tinyllama 190 $PY tools/bench.py latency profile throughput --model random:tinyllama-1.1b \
        --dtype bfloat16 --no-transformers --out "$OUT/tinyllama.json"
    step gptfast_tiny 130 $PY "$PEER" tinyllama-1.1b
    #    TinyLlama's batch-1 decode with its bf16 matmuls on dense_mma, whose output and down
    #    projections then add and norm in their own launch (kernels.NORM_FOLD_MAX_ROWS).
    step tinyllama_dense_mma 60 env NANOSERVE_DENSE_MMA_ROWS=16 $PY tools/bench.py latency \
        --model random:tinyllama-1.1b --dtype bfloat16 --no-transformers --out "$OUT/tinyllama_dense_mma.json"
    # 4. The engine's own time per decode step, model stubbed (issue 32), on this machine's host.
    step host 60 $PY tools/bench.py host --out "$OUT/host.json"
    names="$names tinyllama gptfast_tiny tinyllama_dense_mma host"
fi

echo
for f in $names; do
    [ -f "$OUT/$f.txt" ] && { echo "== $f"; grep -v '^\[bench\]\|USDT' "$OUT/$f.txt" | tail -n 40; }
done
echo "== summary"
cat "$OUT/summary.txt"
# At most 8 files come back from a device call: pack them when there are more.
if (($(ls "$OUT" | wc -l) > 8)); then
    tar czf /tmp/gpu_results.tgz -C "$OUT" . && rm -f "$OUT"/*.txt "$OUT"/*.json && mv /tmp/gpu_results.tgz "$OUT/" \
        && echo "(all outputs packed in gpu_results.tgz)"
fi
