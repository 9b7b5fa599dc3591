"""The CUDA kernels' benchmark: what ptxas made of each kernel, and each kernel's speed at
its goal's sizes.

    python tools/kernel_bench.py ptxas   # compile for sm_90 (TORCH_CUDA_ARCH_LIST), no GPU needed (a CUDA
                                         # build of torch and nvcc): each kernel's registers, spills and
                                         # static shared memory; exit 1 if one spills (CI's compile check)
    python tools/kernel_bench.py sass quant_mma   # the same compile, disassembled (cuobjdump): the
                                         # instructions of each kernel's inner loop (per code for the
                                         # quantized mma kernel)
    python tools/kernel_bench.py goals   # on a GPU: each kernel at its goal's sizes (issue 16), CUDA events

Correctness is kernels.py's self-check: `python kernels.py` on a GPU, and on the CPU under the
emulator, `python ../shared/tools/kemu/run_self_check.py`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kernels import (QUANT_GEMM_MAX_ROWS, QUANT_MMA_MAX_ROWS, _decode_device, _dense_mma_tiles,  # noqa: E402
                     _quant_gemm_splits, _quant_gemm_tiles, _quant_mma_splits, _random_paged, _tensor_cores,
                     cuda_extension, decode_partition, gather_kv_ref, quant_linear)


def time_cuda(fn, reps: int = 30, trials: int = 5) -> float:
    """Seconds per call of fn(i) (i = 0, 1, ...: the caller rotates its inputs so that
    repeated calls do not run from L2), by CUDA events: the median of `trials` means.
    The reps calls are captured once as a CUDA graph and replayed, so the figure is the
    GPU's time without the host's dispatch of each call (15-25 us of Python for a small
    kernel); if capture fails, the calls are timed as launched."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                     # warm-up off the capture (lazy init)
        fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(reps):
                fn(i)
        run = graph.replay
    except RuntimeError:                                # not capturable: time the launches
        def run():
            for i in range(reps):
                fn(i)
    means = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        means.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(means)[trials // 2]


def gpu_goals(device: str = "cuda") -> list[tuple[str, str]]:
    """Each kernel at the sizes its goal names (issue 16), timed with CUDA events, against
    this GPU's measured copy bandwidth (bytes read + written) and cuBLAS/SDPA where they do
    the same work -> rows (what, figure and goal). Inputs rotate through copies totalling
    several times the L2, so a repeated call reads device memory, as the model does."""
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    l2 = props.L2_cache_size
    copies = lambda nbytes: max(1, -(-4 * l2 // max(1, nbytes)))        # sets needed to defeat L2
    rows = []
    a = torch.empty(1 << 28, device=dev).uniform_()                  # 1 GiB
    b = torch.empty_like(a)
    # The ceiling is what the SMs reach copying, since the kernels below read through the SMs
    # too. A plain b.copy_(a) captured in a graph becomes a memcpy node that the copy engines
    # run, measured 1.5x slower than an SM copy on an H200 (2,768 against 4,177 GB/s), so the
    # copy here is an elementwise kernel; the copy engines' figure is shown beside it.
    copy_bw = 2 * a.numel() * 4 / time_cuda(lambda i: torch.mul(a, 1.0, out=b), reps=10)
    engine_bw = 2 * a.numel() * 4 / time_cuda(lambda i: b.copy_(a), reps=10)
    rows.append(("device-to-device copy by the SMs (read + write)",
                 f"{copy_bw / 1e9:.0f} GB/s: every '% of copy' below divides by this "
                 f"(a memcpy on the copy engines: {engine_bw / 1e9:.0f} GB/s)"))
    del a, b
    bf16 = torch.bfloat16

    # Decode attention, Llama-3-8B's attention shape (32 query heads over 8 KV heads, head_dim
    # 128), bf16 cache of 16-token blocks: bytes = the K and V rows the batch attends to.
    # The split counters are one buffer, as the model runner's (every launch leaves it zero).
    Hkv, G, hd, bs = 8, 4, 128, 16
    ext = cuda_extension()
    counters = torch.zeros(64 * 32, device=dev, dtype=torch.int32)
    for S, ctx in ((64, 2048), (1, 32768)):
        kv_bytes = 2 * S * ctx * Hkv * hd * 2
        sets = [_random_paged(S, [ctx] * S, Hkv, G, hd, bs, bf16, device) for _ in range(copies(kv_bytes))]
        part = decode_partition(S, Hkv, G, hd, ctx, *_decode_device(dev))
        t = time_cuda(lambda i: ext.paged_decode(*sets[i % len(sets)], ctx, hd ** -0.5, part, counters))
        rows.append((f"paged_decode bf16 {S} x {ctx} tokens, 32/8 heads, hd 128 ({-(-ctx // part)} splits)",
                     f"{t * 1e6:.1f} us, {kv_bytes / t / 1e9:.0f} GB/s = {100 * kv_bytes / t / copy_bw:.0f}% "
                     f"of copy (goal >= 80%)"))
        del sets
    # Short contexts at batch 1, as a decode graph runs them (the grid sized for the context
    # bucket, a power of two): TinyLlama's attention (32/4 heads, hd 64) at 200 and 1,000
    # tokens, Llama-2-7B's (32/32, hd 128) at 300. Goal: within 1.5x of the KV bytes at copy
    # bandwidth plus one launch (a one-element kernel in the same graph); beside it the same
    # call with other keys per split, unsplit last (which sets kernels.decode_min_part). A
    # call reads little, so as many calls as copies
    # of its cache (up to 1,000): in a decode step the weights between two layers' attention
    # have pushed the cache out of L2.
    one = torch.zeros(1, device=dev)
    launch = time_cuda(lambda i: one.add_(1.0), reps=50)
    for kv, grp, dim, ctx, bucket in ((4, 8, 64, 200, 256), (4, 8, 64, 1000, 1024), (32, 1, 128, 300, 512)):
        kv_bytes = 2 * ctx * kv * dim * 2
        sets = [_random_paged(1, [ctx], kv, grp, dim, bs, bf16, device) for _ in range(min(1000, copies(kv_bytes)))]
        part = decode_partition(1, kv, grp, dim, bucket, *_decode_device(dev))
        by_part = {p: time_cuda(lambda i: ext.paged_decode(*sets[i], bucket, dim ** -0.5, p, counters),
                                reps=len(sets)) for p in sorted({32, 64, 128, 256, part, bucket})}
        t, ideal = by_part[part], kv_bytes / copy_bw + launch
        rows.append((f"paged_decode bf16 1 x {ctx} tokens (bucket {bucket}), {kv * grp}/{kv} heads, hd {dim} "
                     f"({-(-bucket // part)} splits of {part} keys)",
                     f"{t * 1e6:.1f} us = {t / ideal:.2f}x the KV bytes at copy + one launch "
                     f"({ideal * 1e6:.1f} us, launch {launch * 1e6:.1f}; goal <= 1.5x); by keys per split: "
                     + ", ".join(f"{p} {tp * 1e6:.1f} us" for p, tp in by_part.items())))
        del sets

    # Prefill: one 4,096-token prompt, causal, 32/8 heads, hd 128, against PyTorch's SDPA
    # (FlashAttention-2 inside) on the same tokens laid out contiguously.
    T = 4096
    _, kc, vc, bt, _ = _random_paged(1, [T], Hkv, G, hd, bs, bf16, device)
    q = torch.randn(T, Hkv * G, hd, device=dev, dtype=bf16)
    starts = torch.tensor([0, T], device=dev, dtype=torch.int32)
    lens = torch.tensor([T], device=dev, dtype=torch.int32)
    flops = 4 * T * (T / 2) * Hkv * G * hd                 # QK^T and PV over the causal half
    t = time_cuda(lambda i: cuda_extension().paged_prefill(q, kc, vc, bt, starts, lens, T, hd ** -0.5,
                                                                  _tensor_cores(q.device), False), reps=5)
    k = gather_kv_ref(kc, bt[0], T).transpose(0, 1)[None]            # (1, Hkv, T, hd)
    v = gather_kv_ref(vc, bt[0], T).transpose(0, 1)[None]
    qs = q.transpose(0, 1)[None]                                      # (1, H, T, hd)
    sdpa = lambda i: torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
    ts = time_cuda(sdpa, reps=5)
    tcc = time_cuda(lambda i: cuda_extension().paged_prefill(q, kc, vc, bt, starts, lens, T, hd ** -0.5, False,
                                                             False), reps=2)   # the CUDA-core kernel, for the record
    qh, kh, vh = q.half(), kc.half(), vc.half()                      # fp16: the same kernel
    th = time_cuda(lambda i: cuda_extension().paged_prefill(qh, kh, vh, bt, starts, lens, T, hd ** -0.5, True,
                                                            False), reps=5)
    rows.append((f"paged_prefill bf16 {T}-token prompt, 32/8 heads, hd 128",
                 f"{flops / t / 1e12:.1f} TFLOP/s (goal >= 300; PyTorch SDPA {flops / ts / 1e12:.0f} TFLOP/s, "
                 f"the CUDA-core kernel {flops / tcc / 1e12:.1f}, fp16 {flops / th / 1e12:.1f})"))
    del kc, vc, q, k, v, qs, qh, kh, vh

    # Weight-only int4 (groups of 128) and int8 (per channel): Llama-2-7B's projection shapes
    # through quant_linear's path for each row count (the mma kernel, its tiled version,
    # dequantize + cuBLAS), against the same product in bf16 by cuBLAS; up to 16 rows the GEMV
    # too, past 16 the other of the two big-row paths, which sets QUANT_GEMM_MAX_ROWS, and the
    # mma kernel run in chunks of 16 rows (each chunk decodes the codes again), which would
    # set how far QUANT_MMA_MAX_ROWS reaches.
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for bits, group in ((4, 128), (8, 0)):
            packed = N * (K // 2 if bits == 4 else K) + N * (K // (group or K)) * 2      # codes + scales
            ws = [(torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8) if bits == 4 else
                   torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8),
                   torch.rand(N, K // (group or K), device=dev, dtype=bf16) / 50) for _ in range(copies(packed))]
            dense = [torch.randn(N, K, device=dev, dtype=bf16) for _ in range(copies(2 * N * K))]
            for M in ((1, 4, 16, 32, 64, 128, 256, 2048) if bits == 4 else (1,)):   # 32: the 32-row tile
                x = torch.randn(M, K, device=dev, dtype=bf16)
                cache: dict = {}                             # the layer's (its split counters)
                tq = time_cuda(lambda i: quant_linear(x, *ws[i % len(ws)], None, bits, group, cache), reps=20)
                td = time_cuda(lambda i: x @ dense[i % len(dense)].T, reps=20)
                if M <= QUANT_MMA_MAX_ROWS:                  # the mma kernel; the GEMV beside it
                    tg = time_cuda(lambda i: cuda_extension().quant_gemv(x, *ws[i % len(ws)], None, bits, group, 0),
                                   reps=20)
                    # The plan before two tiles a warp and K splits: one tile (picked below ~2
                    # blocks of 32 channels per SM), K unsplit. One tile issues ~1.3x the
                    # instructions per byte of two (sm_90 SASS, bf16 int4: 0.25 a byte at
                    # 1-8 rows, about what an SM issues at copy bandwidth).
                    splits = _quant_mma_splits(M, N, K, bits, x.device)
                    tiles = _dense_mma_tiles(N, x.device)
                    to = time_cuda(lambda i: cuda_extension().quant_mma(x, *ws[i % len(ws)], None, bits, group,
                                                                        tiles, 1, None, False), reps=20)
                    figure = (f"{packed / tq / 1e9:.0f} GB/s = {100 * packed / tq / copy_bw:.0f}% of copy (goal >= 80%); "
                              f"bf16 cuBLAS {2 * N * K / td / 1e9:.0f} GB/s; int{bits} at {td / tq:.2f}x bf16's speed; "
                              f"the GEMV {packed / tg / 1e9:.0f} GB/s; two tiles a warp, K in {splits} "
                              f"split{'s' * (splits > 1)} (the mma kernel with {tiles} tile{'s' * (tiles > 1)}, "
                              f"unsplit: {packed / to / 1e9:.0f} GB/s)")
                else:
                    splits = _quant_gemm_splits(M, N, K, bits, x.device)
                    counters = torch.zeros(_quant_gemm_tiles(M, N), device=dev, dtype=torch.int32)
                    fused = lambda i: cuda_extension().quant_gemm(x, *ws[i % len(ws)], None, bits, group, splits,
                                                                  counters, False)
                    dequant = lambda i: x @ cuda_extension().dequantize(*ws[i % len(ws)], None, bits, group, K).T
                    other = time_cuda(dequant if M < QUANT_GEMM_MAX_ROWS else fused, reps=20)
                    msplits = _quant_mma_splits(M, N, K, bits, x.device)
                    mcounters = torch.zeros(-(-M // 16) * -(-N // 32), device=dev, dtype=torch.int32)
                    chunks = time_cuda(lambda i: cuda_extension().quant_mma(x, *ws[i % len(ws)], None, bits, group,
                                                                            2, msplits, mcounters, False), reps=20)
                    figure = (f"{2 * M * N * K / tq / 1e12:.0f} TFLOP/s ({packed / tq / 1e9:.0f} GB/s of weights), "
                              f"{tq / td:.2f}x bf16 cuBLAS's time "
                              f"({2 * M * N * K / td / 1e12:.0f} TFLOP/s; goal <= 1.1x); "
                              f"{'dequantize + cuBLAS' if M < QUANT_GEMM_MAX_ROWS else 'the tiled mma kernel'} "
                              f"{other / td:.2f}x; the mma kernel in chunks of 16 rows {chunks / td:.2f}x")
                rows.append((f"W{bits}A16 {'g' + str(group) if group else 'per channel'} {N}x{K}, {M} rows", figure))
            del ws, dense

    # The fold: attention's output projection and the MLP's down projection followed by add +
    # RMSNorm, in one launch (quant_mma_add_norm: the last block norms the rows one after
    # another) against the two launches it replaces (quant_linear, then rms_norm with the
    # residual), for Llama-2-7B's and TinyLlama's shapes in int4 g128 and int8 per channel.
    # Where the fold stops paying, by rows, sets NORM_FOLD_MAX_ROWS (now 4).
    for N, K in ((4096, 4096), (4096, 11008), (2048, 2048), (2048, 5632)):
        for bits, group in ((4, 128), (8, 0)):
            packed = N * (K // 2 if bits == 4 else K) + N * (K // (group or K)) * 2
            ws = [(torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8) if bits == 4 else
                   torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8),
                   torch.rand(N, K // (group or K), device=dev, dtype=bf16) / 50) for _ in range(copies(packed))]
            w = torch.randn(N, device=dev, dtype=bf16)
            by_rows = []
            for M in (1, 2, 4, 8, 16):
                x = torch.randn(M, K, device=dev, dtype=bf16)
                res = torch.randn(M, N, device=dev, dtype=bf16)
                cache: dict = {}
                splits = _quant_mma_splits(M, N, K, bits, x.device)
                counters = torch.zeros(-(-N // 32) + 1, device=dev, dtype=torch.int32)
                tf = time_cuda(lambda i: cuda_extension().quant_mma_add_norm(x, *ws[i % len(ws)], None, bits, group,
                                                                             splits, counters, res, w, 1e-5), reps=20)
                tt = time_cuda(lambda i: cuda_extension().rms_norm(quant_linear(x, *ws[i % len(ws)], None, bits, group,
                                                                                cache), w, res, 1e-5), reps=20)
                by_rows.append(f"{M} row{'s' * (M > 1)} {tf * 1e6:.1f} us against {tt * 1e6:.1f} "
                               f"(the fold {tt / tf:.2f}x as fast)")
            rows.append((f"W{bits}A16 {'g' + str(group) if group else 'per channel'} {N}x{K} + residual + RMSNorm: "
                         f"one launch (the fold) against two", "; ".join(by_rows)))
            del ws

    # The SiLU epilogue: the fused gate/up matmul storing silu(gate) x up (quant_mma_silu_and_mul)
    # against quant_linear then silu_and_mul, for Llama-2-7B's and TinyLlama's gate/up in int4.
    for N, K in ((22016, 4096), (11264, 2048)):
        packed = N * K // 2 + N * (K // 128) * 2
        ws = [(torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8),
               torch.rand(N, K // 128, device=dev, dtype=bf16) / 50) for _ in range(copies(packed))]
        by_rows = []
        for M in (1, 4, 16):
            x = torch.randn(M, K, device=dev, dtype=bf16)
            cache: dict = {}
            splits = _quant_mma_splits(M, N, K, 4, x.device)
            counters = torch.zeros(-(-N // 16) + 1, device=dev, dtype=torch.int32)
            tf = time_cuda(lambda i: cuda_extension().quant_mma_silu_and_mul(x, *ws[i % len(ws)], None, 4, 128, splits,
                                                                             counters), reps=20)
            tt = time_cuda(lambda i: cuda_extension().silu_and_mul(
                *quant_linear(x, *ws[i % len(ws)], None, 4, 128, cache).chunk(2, dim=-1)), reps=20)
            by_rows.append(f"{M} row{'s' * (M > 1)} {tf * 1e6:.1f} us against {tt * 1e6:.1f} "
                           f"(the fold {tt / tf:.2f}x as fast)")
        rows.append((f"W4A16 g128 gate/up {N}x{K} + SiLU x up: one launch against two", "; ".join(by_rows)))
        del ws

    # Dense bf16 at decode sizes: the mma kernel on the weights as they are (dense_mma: its K
    # split ends inside the block) against cuBLAS, whose decode-sized GEMMs add a split-K
    # reduce kernel (issue 33's profile: 114 us a 7B step). Whether the model should route its
    # 1-16-row bf16 matmuls through dense_mma is this row's question.
    for N, K in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (32000, 4096)):
        dense = [torch.randn(N, K, device=dev, dtype=bf16) for _ in range(copies(2 * N * K))]
        for M in (1, 4, 16):
            x = torch.randn(M, K, device=dev, dtype=bf16)
            tiles = _dense_mma_tiles(N, x.device)                         # what kernels.linear picks
            td = time_cuda(lambda i: x @ dense[i % len(dense)].T, reps=20)
            tm = time_cuda(lambda i: cuda_extension().dense_mma(x, dense[i % len(dense)], tiles, False), reps=20)
            to = time_cuda(lambda i: cuda_extension().dense_mma(x, dense[i % len(dense)], 3 - tiles, False), reps=20)
            rows.append((f"dense bf16 {N}x{K}, {M} rows: dense_mma against cuBLAS",
                         f"{2 * N * K / tm / 1e9:.0f} GB/s = {100 * 2 * N * K / tm / copy_bw:.0f}% of copy "
                         f"({tiles} tile{'s' * (tiles > 1)} a warp; {3 - tiles}: {2 * N * K / to / 1e9:.0f} GB/s); "
                         f"cuBLAS {2 * N * K / td / 1e9:.0f} GB/s = {100 * 2 * N * K / td / copy_bw:.0f}%; "
                         f"dense_mma at {td / tm:.2f}x cuBLAS's speed"))
        del dense
    # The fold on dense weights (dense_mma_add_norm) for the output and down projections'
    # shapes, against dense_mma then rms_norm and against cuBLAS then rms_norm (the bf16
    # model's path while DENSE_MMA_MAX_ROWS is 0).
    for N, K in ((4096, 4096), (4096, 11008), (2048, 2048), (2048, 5632)):
        dense = [torch.randn(N, K, device=dev, dtype=bf16) for _ in range(copies(2 * N * K))]
        w = torch.randn(N, device=dev, dtype=bf16)
        tiles = _dense_mma_tiles(N, dev)
        counters = torch.zeros(-(-N // 16) + 1, device=dev, dtype=torch.int32)
        by_rows = []
        for M in (1, 4):
            x, res = torch.randn(M, K, device=dev, dtype=bf16), torch.randn(M, N, device=dev, dtype=bf16)
            tf = time_cuda(lambda i: cuda_extension().dense_mma_add_norm(x, dense[i % len(dense)], tiles, counters,
                                                                         res, w, 1e-5), reps=20)
            tm = time_cuda(lambda i: cuda_extension().rms_norm(cuda_extension().dense_mma(x, dense[i % len(dense)],
                                                                                          tiles, False), w, res, 1e-5),
                           reps=20)
            tc = time_cuda(lambda i: cuda_extension().rms_norm(x @ dense[i % len(dense)].T, w, res, 1e-5), reps=20)
            by_rows.append(f"{M} row{'s' * (M > 1)} {tf * 1e6:.1f} us against {tm * 1e6:.1f} (dense_mma, rms_norm) "
                           f"and {tc * 1e6:.1f} (cuBLAS, rms_norm)")
        rows.append((f"dense bf16 {N}x{K} + residual + RMSNorm: one launch (the fold) against two", "; ".join(by_rows)))
        del dense
    return rows


def _compile(tmp: str) -> str:
    """Compile the extension from scratch into the folder tmp (in a child process: no GPU
    needed) with ptxas -v -> the compiler's output."""
    env = dict(os.environ, NANOSERVE_PTXAS_VERBOSE="1", TORCH_EXTENSIONS_DIR=tmp)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    r = subprocess.run([sys.executable, "-c", "import kernels; kernels.cuda_extension()"], env=env,
                       cwd=ROOT, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"the CUDA extension did not compile:\n{log[-4000:]}")
    return log


def compile_with_ptxas_verbose() -> str:
    """Compile the extension in a temporary folder -> ptxas -v's output."""
    with tempfile.TemporaryDirectory() as tmp:
        return _compile(tmp)


def _cuda_tool(name: str) -> str | None:
    """A CUDA binary tool: on PATH, in the toolkit, or in the nvidia-* wheels a CUDA build of
    torch installs (nvidia/cu13/bin, nvidia/cuda_cuobjdump/bin, ...)."""
    from torch.utils.cpp_extension import CUDA_HOME
    dirs = [os.path.join(CUDA_HOME, "bin")] if CUDA_HOME else []
    try:
        import nvidia
        dirs += [str(b) for root in nvidia.__path__ for b in sorted(Path(root).glob("*/bin"))]
    except ImportError:
        pass
    found = shutil.which(name) or next((os.path.join(d, name) for d in dirs if os.path.isfile(os.path.join(d, name))),
                                       None)
    return found


def compile_and_disassemble() -> str:
    """Compile the extension in a temporary folder -> its sm_90 code as cuobjdump -sass prints
    it (cuobjdump calls nvdisasm, which must sit beside it or on PATH)."""
    cuobjdump = _cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("kernel_bench: sass needs cuobjdump (the CUDA toolkit's, or a CUDA build of torch's "
                           "nvidia-* wheels)")
    with tempfile.TemporaryDirectory() as tmp:
        _compile(tmp)
        (lib,) = Path(tmp).glob("*/*.so")
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(cuobjdump), os.environ.get("PATH", "")]))
        r = subprocess.run([cuobjdump, "-sass", str(lib)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"cuobjdump failed:\n{r.stderr[-2000:]}")
    return r.stdout


def sass_loops(sass: str) -> list[tuple[str, int, dict[str, int]]]:
    """cuobjdump -sass text -> per kernel its longest loop (the instructions from a backward
    branch's target to the branch): (mangled name, instructions, count per opcode, without
    its modifiers and predicate). A kernel without a loop has 0 instructions."""
    kernels, name, code = [], None, []

    def close():
        if name is None:
            return
        best: list[str] = []
        for addr, op in code:
            target = re.search(r"BRA\s.*?0x([0-9a-f]+)", op)
            if target and int(target.group(1), 16) < addr:
                body = [o for a, o in code if int(target.group(1), 16) <= a <= addr]
                best = max(best, body, key=len)
        counts: dict[str, int] = {}
        for op in best:
            opcode = re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0]
            counts[opcode] = counts.get(opcode, 0) + 1
        kernels.append((name, len(best), counts))

    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            close()
            name, code = m.group(1), []
        elif m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line):
            code.append((int(m.group(1), 16), m.group(2)))
    close()
    return kernels


def quant_mma_codes_per_iteration(name: str) -> int | None:
    """Codes one lane converts per iteration of quant_mma_kernel's loop, from its demangled
    name (quant_mma_kernel<T, BITS, J, U, ...>: U steps of J tiles, two channels each, a
    16-byte load of 32 int4 or 16 int8 codes, or 8 dense weights, per channel); None for
    another kernel."""
    m = re.search(r"quant_mma_kernel<[^,]+, (\d+), (\d+), (\d+),", name)
    if not m:
        return None
    bits, j, u = map(int, m.groups())
    return u * j * 2 * (128 // bits)


def print_sass_report(pattern: str) -> int:
    """The inner loop of each kernel whose demangled name contains pattern: its instructions,
    the most frequent opcodes, and for the mma kernel instructions per code."""
    if torch.version.cuda is None:
        print("kernel_bench: sass needs a CUDA build of torch", file=sys.stderr)
        return 2
    loops = sass_loops(compile_and_disassemble())
    for name, (_, length, counts) in zip(demangle([n for n, _, _ in loops]), loops):
        if pattern not in name:
            continue
        top = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda c: -c[1])[:8])
        codes = quant_mma_codes_per_iteration(name)
        per_code = f"  {length / codes:.2f} per code" if codes and length else ""
        print(f"{name[:90]:90s} loop {length:4d} instructions{per_code}  ({top})")
    return 0


def ptxas_report(log: str) -> list[tuple[str, int, int, int]]:
    """ptxas -v output -> per kernel (demangled name, registers, spill store + load bytes,
    static shared memory bytes); then each device function that kernels call (not inlined)
    and that spills, with 0 registers and 0 shared memory (ptxas reports only its frame)."""
    rows, name, spills, current = [], None, {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"Function properties for (\w+)", line):
            current = m.group(1)
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and current:
            spills[current] = max(spills.get(current, 0), int(m.group(1)) + int(m.group(2)))   # over architectures
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((name, int(m.group(1)), spills.get(name, 0), int(smem.group(1)) if smem else 0))
            name = None
    kernels = {r[0] for r in rows}
    rows += [(f, 0, sp, 0) for f, sp in spills.items() if sp and f not in kernels]
    names = demangle([r[0] for r in rows])
    return [(n, *r[1:]) for n, r in zip(names, rows)]


def demangle(names: list[str]) -> list[str]:
    """C++ symbol names as c++filt prints them, where it is installed (else as they are)."""
    if not shutil.which("c++filt") or not names:
        return names
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


def print_ptxas_report() -> int:
    """The compile check: each kernel's registers and spills -> exit status (1 on a spill)."""
    if torch.version.cuda is None:
        print("kernel_bench: torch is a CPU build; skipping the CUDA compile check "
              "(the reference path serves the CPU)")
        return 0
    t = time.perf_counter()
    report = ptxas_report(compile_with_ptxas_verbose())
    for name, regs, spill, smem in report:
        print(f"{name[:110]:110s} {regs:4d} registers  {spill:5d} B spilled  {smem:6d} B static smem")
    spilling = [n for n, _, sp, _ in report if sp]
    print(f"kernel_bench: CUDA extension compiled in {time.perf_counter() - t:.0f} s for "
          f"sm_{os.environ.get('TORCH_CUDA_ARCH_LIST', '9.0').replace('.', '')}, {len(report)} kernels, "
          f"{len(spilling)} spilling")
    return 1 if spilling or not report else 0


def print_gpu_goals() -> int:
    if not torch.cuda.is_available():
        print("kernel_bench: goals: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"At the goals' sizes on {torch.cuda.get_device_name()} (torch {torch.__version__}):")
    for what, figure in gpu_goals():
        print(f"{what:70s} {figure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("ptxas", "sass", "goals"),
                    help="ptxas: the compile report; sass: each kernel's inner loop; goals: timings on a GPU")
    ap.add_argument("pattern", nargs="?", default="", help="sass: only kernels whose name contains this")
    a = ap.parse_args(argv)
    if a.what == "ptxas":
        return print_ptxas_report()
    return print_sass_report(a.pattern) if a.what == "sass" else print_gpu_goals()


if __name__ == "__main__":
    sys.exit(main())
