"""kernels.py: the compute kernels nanoserve's model runs on, each with its PyTorch twin.

Every op here has one *reference* function written in plain PyTorch. The reference is
the CPU path and the oracle a hand-written CUDA kernel is tested against. One dispatch
function per op (after the kernels) decides, once and visibly, which path runs; the
self-check at the end runs every kernel against its twin.

Layouts used throughout (the paged KV cache is vLLM's idea, PagedAttention):
    k_cache, v_cache : (num_blocks, block_size, n_kv_heads, head_dim)  one layer's pool
    block_tables     : (num_seqs, max_blocks_per_seq) int32, logical block -> physical block
    slot_mapping     : (num_tokens,) int64, flat slot = block_id * block_size + offset
A sequence's token at position p lives in physical block block_tables[s, p // block_size],
at offset p % block_size. Blocks need not be contiguous: that is what removes
fragmentation (no per-sequence max-length reservation).

This module imports neither nanoserve nor quant (imports point one way).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- norms and MLP

def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 as Hugging Face Llama does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor,
                           eps: float) -> tuple[Tensor, Tensor]:
    """residual += x; return (rms_norm(residual), residual). Fused so a kernel reads x once."""
    residual = residual + x
    return rms_norm_ref(residual, weight, eps), residual


def silu_and_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU activation: silu(gate) * up, both (T, F). silu(x) = x * sigmoid(x)."""
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- rotary embedding

def rope_tables(inv_freq: Tensor, max_positions: int, scale: float = 1.0,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """cos and sin tables (max_positions, head_dim) for per-pair frequencies inv_freq
    (head_dim / 2,), times `scale` (YaRN's attention factor; 1 otherwise)."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq.double())
    angles = torch.cat([angles, angles], dim=-1)                    # (P, head_dim)
    return (scale * angles.cos()).float().to(device), (scale * angles.sin()).float().to(device)


def rope_cos_sin(head_dim: int, max_positions: int, theta: float,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Tables for plain RoPE. Frequency i rotates dims (i, i + head_dim/2) by angle p * theta^(-2i/d)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return rope_tables(inv_freq, max_positions, 1.0, device)


def rotary_embedding_ref(q: Tensor, k: Tensor, positions: Tensor, cos: Tensor,
                         sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate-half RoPE (the Hugging Face convention): x*cos + rotate_half(x)*sin.

    q: (T, n_heads, head_dim), k: (T, n_kv_heads, head_dim), positions: (T,).
    Because a rotation by angle p*w makes q_m . k_n depend only on m - n, attention
    sees relative positions although each token is rotated by its absolute one.
    """
    c = cos[positions].unsqueeze(1)                                 # (T, 1, head_dim)
    s = sin[positions].unsqueeze(1)

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * c + torch.cat([-x2, x1], dim=-1) * s).to(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------- paged KV cache

def reshape_and_cache_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                          slot_mapping: Tensor) -> None:
    """Write this step's K and V into their slots of the paged cache (in place).

    k, v: (T, n_kv_heads, head_dim); caches: (num_blocks, block_size, n_kv, head_dim).
    A negative slot marks a padding token (a CUDA-graph batch padded to its bucket).
    """
    num_blocks, block_size = k_cache.shape[:2]
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:     # slot -1: a padding token, not written
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slot_mapping] = v


def rope_and_cache_ref(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                       k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """RoPE on q and k, then k and v written to their cache slots; returns the rotated q."""
    q, k = rotary_embedding_ref(q, k, positions, cos, sin)
    reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def gather_kv_ref(cache: Tensor, block_table: Tensor, length: int) -> Tensor:
    """One sequence's first `length` cached vectors, walking its block table. (length, n_kv, hd)"""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                        query_start_loc: Tensor, context_lens: Tensor, scale: float) -> Tensor:
    """Causal attention of a flat batch of queries over the paged KV cache.

    q:               (T, n_heads, head_dim)  queries of all sequences, concatenated
    block_tables:    (S, max_blocks) int32
    query_start_loc: (S + 1,) int, sequence s owns queries [start[s], start[s+1])
    context_lens:    (S,) int, tokens in the cache for s, *including* this step's queries
    returns          (T, n_heads, head_dim)

    The q_len queries of sequence s sit at the last q_len positions of its context, so
    query i (0-based) may see keys 0 .. context_len - q_len + i. One function serves
    decode (q_len = 1), prefill chunks and speculative verification (q_len = k + 1).

    Grouped-query attention: n_heads = n_kv_heads * G. The G query heads of a group
    share one cached K/V head, so the cache is G times smaller than multi-head attention.
    This is the plain math, one sequence at a time: the oracle for every attention kernel.
    """
    T, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    for s in range(block_tables.shape[0]):
        start, end, ctx = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(context_lens[s])
        n = end - start
        if n == 0:
            continue
        k = gather_kv_ref(k_cache, block_tables[s], ctx).float()               # (L, n_kv, hd)
        v = gather_kv_ref(v_cache, block_tables[s], ctx).float()
        qs = q[start:end].float().view(n, n_kv, group, head_dim)              # (n, n_kv, G, hd)
        scores = torch.einsum("qkgd,lkd->kgql", qs, k) * scale                # (n_kv, G, n, L)
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None]   # (n, L) future keys
        scores = scores.masked_fill(mask, float("-inf"))
        o = torch.einsum("kgql,lkd->qkgd", scores.softmax(-1), v)             # (n, n_kv, G, hd)
        out[start:end] = o.reshape(n, n_heads, head_dim).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- the CPU path
# On a CPU a small model's decode step is a few hundred tensor ops, and every op costs a
# few microseconds of dispatch whatever its size: fixed per-layer costs, not FLOPs or
# bytes, set the speed (what CUDA graphs remove on a GPU). So the CPU path computes once
# per step what every layer would otherwise recompute -- each token's cos/sin rows, the
# gather index of every sequence's keys, the padding mask -- and a layer's attention is
# then a few large ops. Each function below is tested against its twin above.

class DecodeBatch(NamedTuple):
    """Up to 32 single-query sequences attended together, padded to the longest context.
    (NamedTuples, not dataclasses: kemu's run_self_check.py loads this module without entering
    it in sys.modules, and @dataclass then fails.)"""
    rows: Tensor | None   # (B,) their rows of q; None: rows 0 .. B-1 in order (the whole step)
    index: Tensor         # (B * Hkv * L,) rows of the cache viewed as (slots * Hkv, hd), ordered
                          # (sequence, kv head, position): one index_select yields K as (B, Hkv, L, hd)
    pad: Tensor | None    # (B, 1, 1, L) True at positions past a sequence's context; None if none
    length: int           # L, the longest context in the batch


class CpuStepPlan(NamedTuple):
    """What one forward step's layers share on the CPU, built once by plan_cpu_step."""
    cos: Tensor                                     # (T, 1, hd) cos at each token's position
    sin: Tensor                                     # (T, 1, hd) sin, rotate_half's sign folded in
    slots: Tensor                                   # (T,) cache slot of each new token's K/V
    decode: list[DecodeBatch]
    multi: list[tuple[int, int, Tensor, int]]       # (lo, hi, block table (1, nb), context) per
                                                    # multi-query sequence (prefill_attention_cpu)


@functools.lru_cache(maxsize=None)
def _slot_row_offsets(block_size: int, n_kv_heads: int) -> Tensor:
    """(Hkv, 1, block_size): j Hkv + h, the row of head h at offset j within a block."""
    return (torch.arange(block_size) * n_kv_heads + torch.arange(n_kv_heads)[:, None])[:, None, :]


def plan_cpu_step(q_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                  positions: Tensor, slots: Tensor, cos: Tensor, sin: Tensor, block_size: int,
                  n_kv_heads: int) -> CpuStepPlan:
    """Host lists of the step (each sequence's query count, context length after this step,
    block table) -> the plan every layer's rope_and_cache_cpu and paged_attention_cpu use.

    Single-query sequences (decodes) go in batches of 32 in order of context length, so a
    batch pads little; a step of at most 32 decodes alone keeps its order (no scatter)."""
    half = cos.shape[1] // 2
    c = cos.index_select(0, positions).unsqueeze(1)                         # (T, 1, hd)
    s = sin.index_select(0, positions).unsqueeze(1)                        # a copy: negated in place
    s[..., :half].neg_()                                                    # rotate_half's sign
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    single = [i for i, n in enumerate(q_lens) if n == 1]
    in_order = len(single) == len(q_lens) <= 32
    if not in_order:
        single.sort(key=lambda i: context_lens[i])
    offsets = _slot_row_offsets(block_size, n_kv_heads)                    # (Hkv, 1, block_size)
    decode = []
    for b in range(0, len(single), 32):
        batch = single[b:b + 32]
        lens = [context_lens[i] for i in batch]
        L = max(lens)
        nb = (L + block_size - 1) // block_size
        table = torch.tensor([(block_tables[i] + [0] * nb)[:nb] for i in batch])          # (B, nb)
        # Row of (block t, offset j, head h) in the (slots * Hkv, hd) view: (t bs + j) Hkv + h.
        index = table.mul_(block_size * n_kv_heads).view(len(batch), 1, nb, 1) + offsets   # (B, Hkv, nb, bs)
        index = index.view(len(batch), n_kv_heads, nb * block_size).narrow(2, 0, L).flatten()  # (B Hkv L,)
        pad = None
        if min(lens) < L:
            pad = (torch.arange(L)[None, :] >= torch.tensor(lens)[:, None])[:, None, None, :]   # (B, 1, 1, L)
        decode.append(DecodeBatch(rows=None if in_order else torch.tensor([starts[i] for i in batch]),
                                  index=index, pad=pad, length=L))
    multi = [(starts[i], starts[i + 1], torch.tensor([block_tables[i]], dtype=torch.int32), context_lens[i])
             for i, n in enumerate(q_lens) if n > 1]
    return CpuStepPlan(cos=c, sin=s, slots=slots, decode=decode, multi=multi)


def plan_from_tensors(block_tables: Tensor, query_start_loc: Tensor, context_lens: Tensor,
                      positions: Tensor, slots: Tensor, cos: Tensor, sin: Tensor, block_size: int,
                      n_kv_heads: int) -> CpuStepPlan:
    """plan_cpu_step for a caller that holds the step as tensors (tests, kernels' users)."""
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    return plan_cpu_step(q_lens, context_lens.tolist(), block_tables.tolist(), positions, slots,
                         cos, sin, block_size, n_kv_heads)


def rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm_ref in fp32, bit for bit, with one temporary instead of five (PyTorch's own
    F.rms_norm, a composite of the same ops on the CPU, measured no faster here)."""
    r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()                  # (T, 1)
    return torch.mul(x, r).mul_(weight)


def rope_and_cache_cpu(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                       plan: CpuStepPlan) -> Tensor:
    """rope_and_cache_ref's result, bit for bit, in five ops for q and k together, with
    the cos/sin rows gathered once per step: x cos + rotate_half(x) sin equals
    x cos + swap_halves(x) sin', sin' = [-sin_lo, sin_hi], and swapping the halves of the
    last dimension is one flip of a (2, hd/2) view."""
    T, H, hd = q.shape
    qk = torch.cat([q, k], dim=1).float()                                   # (T, H + Hkv, hd)
    swapped = qk.view(T, -1, 2, hd // 2).flip(2).view_as(qk)
    qk = (qk * plan.cos + swapped * plan.sin).to(q.dtype)
    k = qk[:, H:]                                                           # (T, Hkv, hd)
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, plan.slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, plan.slots, v)
    return qk[:, :H]


def prefill_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, context: int,
                          scale: float) -> Tensor:
    """One sequence's n queries (n, H, hd), the last n of its `context` tokens, over its
    cached keys and values -> (n, H, hd), in fp32 as the twin computes: PyTorch's fused CPU
    attention (SDPA's flash kernel, which takes the 4-D layout; 3-D inputs fall back to the
    plain math), so the (n x context) score matrix of a long prompt is never made (measured
    12x faster than the twin on a 2,047-token prompt's layer, one thread). The mask is
    causal from the bottom right: query i sees keys up to context - n + i."""
    n = q.shape[0]
    k = gather_kv_ref(k_cache, table, context).float().transpose(0, 1)[None]     # (1, Hkv, context, hd)
    v = gather_kv_ref(v_cache, table, context).float().transpose(0, 1)[None]
    qs = q.float().transpose(0, 1)[None]                                          # (1, H, n, hd)
    if n == context:                                                               # no cached prefix
        o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        visible = torch.arange(context)[None, :] <= torch.arange(context - n, context)[:, None]   # (n, context)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1).to(q.dtype)                                        # (n, H, hd)


def paged_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: CpuStepPlan,
                        scale: float) -> Tensor:
    """paged_attention_ref's result on the CPU path. A decode batch is six ops for all its
    sequences and heads: gather K and V head-major, scores = q K^T as one batched matmul
    over (sequence, KV head) with the G query heads of a KV head as the rows (GQA), mask
    the padding, softmax, times V. Multi-query sequences (prefill chunks, verification
    windows) go one at a time through prefill_attention_cpu."""
    T, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    k_rows, v_rows = k_cache.view(-1, head_dim), v_cache.view(-1, head_dim)   # (slots * Hkv, hd)
    out = None
    for d in plan.decode:
        qd = q if d.rows is None else q.index_select(0, d.rows)
        B = qd.shape[0]
        qd = qd.float().reshape(B * n_kv, group, head_dim)                   # (B Hkv, G, hd)
        k = k_rows.index_select(0, d.index).float().view(B * n_kv, d.length, head_dim)   # (B Hkv, L, hd)
        v = v_rows.index_select(0, d.index).float().view(B * n_kv, d.length, head_dim)
        scores = torch.bmm(qd, k.transpose(1, 2)).mul_(scale)               # (B Hkv, G, L)
        if d.pad is not None:
            scores.view(B, n_kv, group, d.length).masked_fill_(d.pad, float("-inf"))
        o = torch.bmm(scores.softmax(-1), v).view(B, n_heads, head_dim).to(q.dtype)   # (B, H, hd)
        if d.rows is None:
            out = o
        else:
            out = torch.empty_like(q) if out is None else out
            out.index_copy_(0, d.rows, o)
    for lo, hi, table, ctx in plan.multi:
        out = torch.empty_like(q) if out is None else out
        out[lo:hi] = prefill_attention_cpu(q[lo:hi], k_cache, v_cache, table[0], ctx, scale)
    return out if out is not None else torch.empty_like(q)


# ----------------------------------------------------------------------------- quantized linear

def dequantize_ref(codes: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int) -> Tensor:
    """Integer codes (out, in), any integer dtype -> weights (out, in) in scales' dtype:
    s * q, or s * (q - z).

    scales, zeros: (out, n_groups); group g covers input channels [g*G, (g+1)*G).
    """
    G = group_size or codes.shape[1]
    s = scales.repeat_interleave(G, dim=1)[:, :codes.shape[1]]              # (out, in)
    if zeros is None:
        return codes.to(scales.dtype) * s
    z = zeros.repeat_interleave(G, dim=1)[:, :codes.shape[1]]
    return (codes.to(scales.dtype) - z) * s


def unpack_int4(packed: Tensor, in_features: int, signed: bool) -> Tensor:
    """(out, ceil(in/2)) uint8, byte = low | high << 4 -> (out, in) int8 codes. Signed
    codes are stored offset by 8 (quant.pack_int4)."""
    lo, hi = packed & 0xF, packed >> 4
    u = torch.stack([lo, hi], dim=-1).flatten(1)[:, :in_features].to(torch.int8)
    return u - 8 if signed else u


def quant_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                     group_size: int) -> Tensor:
    """y = x W_hat^T with W_hat dequantized on the fly: (..., in) -> (..., out).

    qweight: (out, ceil(in/2)) uint8 packed for bits <= 4, else (out, in) int8/uint8.
    A W4A16 kernel does the same while reading only the packed 4-bit codes from memory,
    which is why int4 speeds up memory-bound decode."""
    codes = unpack_int4(qweight, x.shape[-1], zeros is None) if bits <= 4 else qweight
    return F.linear(x, dequantize_ref(codes, scales, zeros, group_size).to(x.dtype))


def pack_for_cpu(qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                 in_features: int, dtype: torch.dtype) -> tuple | None:
    """Repack a quantized weight for PyTorch's own CPU weight-only kernels (the ones
    gpt-fast uses), or None where they do not take this layout and the twin runs.

    int8, symmetric, per channel: torch._weight_int8pack_mm(x, codes (N, K) int8, scales (N,)).
    int4, groups of 32/64/128/256: torch._weight_int4pack_mm_for_cpu(x, packed, G, sz),
      sz (K / G, N, 2) = (scale, zero) per group and channel, computing w = (q - 8) scale + zero
      for q in 0..15. Our symmetric codes are stored offset by 8 (w = (q - 8) s): zero = 0;
      asymmetric ones mean w = (q - z) s = (q - 8) s + (8 - z) s: zero = (8 - z) s.
    Shapes: N a multiple of 16 and K of 64 (the kernels' tiling; other K gave wrong
    results or crashed in torch 2.13), so e.g. stories260K's FFN (172) stays on the twin.
    """
    N, K = qweight.shape[0], in_features
    if qweight.is_cuda or N % 16 or K % 64:
        return None
    if bits == 8 and zeros is None and scales.shape[1] == 1 and hasattr(torch, "_weight_int8pack_mm"):
        return ("int8", qweight.to(torch.int8).contiguous(), scales[:, 0].to(dtype).contiguous())
    if bits == 4 and group_size in (32, 64, 128, 256) and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        codes = unpack_int4(qweight, K, signed=False).to(torch.int32)                # (N, K) in 0..15
        zero = torch.zeros_like(scales) if zeros is None else (8 - zeros) * scales     # (N, K / G)
        sz = torch.stack([scales.t(), zero.t()], dim=-1).to(dtype).contiguous()       # (K / G, N, 2)
        return ("int4", torch._convert_weight_to_int4pack_for_cpu(codes, 8), sz, group_size)
    return None


def quant_linear_cpu(x: Tensor, packed: tuple) -> Tensor:
    """(..., K) -> (..., N) through PyTorch's CPU weight-only kernels (pack_for_cpu)."""
    x2 = x.reshape(-1, x.shape[-1])                                                    # (rows, K)
    if packed[0] == "int8":
        y = torch._weight_int8pack_mm(x2, packed[1], packed[2])
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, packed[1], packed[3], packed[2])
    return y.view(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------- CUDA kernels
# One extension, built on first use for the current device's architecture and cached by
# torch (TORCH_EXTENSIONS_DIR). Every kernel below has its reference twin above; the
# dispatch functions at the bottom choose between them.

CUDA_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_pipeline.h>

// fp32, fp16 and bf16: the dtypes the model runs in (double would only add instantiations).
#define DISPATCH(T, NAME, ...) AT_DISPATCH_SWITCH(T, NAME, \
    AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
    AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
    AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
// A failed launch (bad configuration, no image for this GPU) raises at the launch, not at
// some later call. The fallback is for kemu, the CPU emulator: it checks launches itself and
// its headers lack c10/cuda's macro.
#ifndef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#endif
// More than 48 KB of dynamic shared memory needs an opt-in per kernel, which persists: made
// once per call site and dtype (a static in each DISPATCH case), and again only for more.
#define ALLOW_SMEM(KERNEL, BYTES) do { \
    static size_t allowed_ = 48 * 1024; \
    if ((BYTES) > allowed_) { \
      TORCH_CHECK(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(BYTES)) == 0, \
                  #KERNEL ": cannot use ", (BYTES), " bytes of shared memory on this GPU"); \
      allowed_ = (BYTES); \
    } } while (0)

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}
// Sum over the block; every thread gets the result. blockDim.x a multiple of 32, <= 1024.
// Two barriers: the first keeps a previous call's readers ahead of this call's writers.
__device__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < (int)(blockDim.x >> 5); ++i) s += sh[i];
  return s;
}

// ---------------------------------------------------------------- RMSNorm, fused add + RMSNorm
// One block per row: y = w * x / sqrt(mean(x^2) + eps), statistics in fp32.
template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out,        // [rows, D]
                                T* __restrict__ res_out,    // [rows, D] or null: x + residual
                                const T* __restrict__ x,    // [rows, D]
                                const T* __restrict__ res,  // [rows, D] or null
                                const T* __restrict__ w,    // [D]
                                int D, float eps) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    T v = x[row * D + i];
    if (res) { v = from_f<T>(to_f(v) + to_f(res[row * D + i])); res_out[row * D + i] = v; }
    float f = to_f(v);
    ss += f * f;
  }
  float inv = rsqrtf(block_sum(ss, sh) / D + eps);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float f = to_f(res ? res_out[row * D + i] : x[row * D + i]);
    out[row * D + i] = from_f<T>(to_f(w[i]) * to_f(from_f<T>(f * inv)));
  }
}

// The same for rows of 16-byte chunks (D a multiple of 8 in 16-bit types, 4 in fp32; rows
// 16-byte aligned), built for latency: at batch 1 a norm is one 4,096-wide row, and the
// kernel's time is its chain of dependent steps, not bytes. Each thread issues all its
// loads (x, residual, weight: up to RN_CHUNKS 16-byte chunks each) at once, keeps the sum
// x + residual in registers for the second pass instead of re-reading it. Same roundings
// as the kernel above.
//
// One row by one block, as a device function: a quantized matmul's launch ends with the
// norm of its output through it too (quant_mma's fold, below). Thread i takes chunks i,
// i + blockDim.x, ..., so the sums and their order depend on the block's size alone, and
// RN_THREADS threads sum exactly as a smaller block of one chunk a thread does (the extra
// threads add zeros). rms_norm launches RN_THREADS (or fewer) wherever the fold can run, so
// that the fold and the two launches it replaces give the same bits.
constexpr int RN_CHUNKS = 4, RN_THREADS = 256;

template <typename T>
__device__ void rms_norm_row(T* __restrict__ out, T* __restrict__ res_out, const T* __restrict__ x,
                             const T* __restrict__ res, const T* __restrict__ w, int D, float eps, float* sh) {
  constexpr int PER = 16 / sizeof(T);
  const int n = D / PER;                                  // 16-byte chunks in the row
  uint4 v[RN_CHUNKS], wv[RN_CHUNKS];
#pragma unroll
  for (int c = 0; c < RN_CHUNKS; ++c) {                   // every load first; x and residual from
    const int k = threadIdx.x + c * blockDim.x;           // L2 (another block of a fold wrote x)
    if (k < n) {
      v[c] = __ldcg(reinterpret_cast<const uint4*>(x) + k);
      wv[c] = reinterpret_cast<const uint4*>(w)[k];
      if (res) {
        const uint4 r = __ldcg(reinterpret_cast<const uint4*>(res) + k);
        T* e = reinterpret_cast<T*>(&v[c]);
        const T* re = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < PER; ++i) e[i] = from_f<T>(to_f(e[i]) + to_f(re[i]));   // rounded, as stored
      }
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < RN_CHUNKS; ++c) {
    const int k = threadIdx.x + c * blockDim.x;
    if (k < n) {
      if (res) reinterpret_cast<uint4*>(res_out)[k] = v[c];
      const T* e = reinterpret_cast<const T*>(&v[c]);
#pragma unroll
      for (int i = 0; i < PER; ++i) ss += to_f(e[i]) * to_f(e[i]);
    }
  }
  const float inv = rsqrtf(block_sum(ss, sh) / D + eps);
#pragma unroll
  for (int c = 0; c < RN_CHUNKS; ++c) {
    const int k = threadIdx.x + c * blockDim.x;
    if (k < n) {
      uint4 o;
      T* oe = reinterpret_cast<T*>(&o);
      const T* e = reinterpret_cast<const T*>(&v[c]);
      const T* we = reinterpret_cast<const T*>(&wv[c]);
#pragma unroll
      for (int i = 0; i < PER; ++i) oe[i] = from_f<T>(to_f(we[i]) * to_f(from_f<T>(to_f(e[i]) * inv)));
      reinterpret_cast<uint4*>(out)[k] = o;
    }
  }
}

template <typename T>
__global__ void rms_norm_vec_kernel(T* __restrict__ out, T* __restrict__ res_out, const T* __restrict__ x,
                                    const T* __restrict__ res, const T* __restrict__ w, int D, float eps) {
  __shared__ float sh[32];
  const int64_t base = (int64_t)blockIdx.x * D;
  rms_norm_row(out + base, res ? res_out + base : nullptr, x + base, res ? res + base : nullptr, w, D, eps, sh);
}

std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> residual,
                                    double eps) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "rms_norm: CUDA tensors expected");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: last dim of x must equal len(weight)");
  TORCH_CHECK(!residual.has_value() || residual->sizes() == x.sizes(), "rms_norm: residual must have x's shape");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  x = x.contiguous();
  auto w_ = w.to(x.scalar_type()).contiguous();
  int D = x.size(-1);
  int64_t rows = x.numel() / D;
  auto out = torch::empty_like(x);
  torch::Tensor res, res_out;
  if (residual.has_value()) { res = residual->contiguous(); res_out = torch::empty_like(x); }
  if (rows > 0 && D > 0) DISPATCH(x.scalar_type(), "rms_norm", [&] {
    constexpr int PER = 16 / sizeof(scalar_t);
    const int chunks = D / PER;
    const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(w_.data_ptr()) % 16 == 0 &&
                         (!res.defined() || reinterpret_cast<uintptr_t>(res.data_ptr()) % 16 == 0);
    if (D % PER == 0 && aligned && chunks <= 1024 * RN_CHUNKS) {
      const int threads = std::min(chunks <= RN_THREADS * RN_CHUNKS ? RN_THREADS : 1024, (chunks + 31) / 32 * 32);
      rms_norm_vec_kernel<scalar_t><<<rows, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          out.data_ptr<scalar_t>(), res.defined() ? res_out.data_ptr<scalar_t>() : nullptr,
          x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
          w_.data_ptr<scalar_t>(), D, (float)eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int threads = std::min(1024, ((D + 31) / 32) * 32);
    rms_norm_kernel<scalar_t><<<rows, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), res.defined() ? res_out.data_ptr<scalar_t>() : nullptr,
        x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
        w_.data_ptr<scalar_t>(), D, (float)eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (res.defined()) return {out, res_out};
  return {out};
}

// ---------------------------------------------------------------- SiLU and multiply
// silu(g) x u of one gate and up value as stored (T), rounded as stored: one function, so that
// a matmul that ends in it (quant_mma's SiLU epilogue) gives this kernel's bits.
template <typename T>
__device__ __forceinline__ T silu_mul(T g, T u) {
  const float a = to_f(g);
  return from_f<T>(to_f(from_f<T>(a / (1.f + __expf(-a)))) * to_f(u));
}

template <typename T>
__global__ void silu_mul_kernel(T* __restrict__ out, const T* __restrict__ g, const T* __restrict__ u, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = silu_mul(g[i], u[i]);
}

torch::Tensor silu_and_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_and_mul: gate and up must have the same shape");
  const at::cuda::OptionalCUDAGuard guard(device_of(gate));
  gate = gate.contiguous(); up = up.contiguous();
  auto out = torch::empty_like(gate);
  int64_t n = gate.numel();
  int blocks = (int)std::min<int64_t>((n + 255) / 256, 65535);
  if (n > 0) DISPATCH(gate.scalar_type(), "silu_and_mul", [&] {
    silu_mul_kernel<scalar_t><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------- RoPE + write K/V to the paged cache
// Rotate-half RoPE: for i < hd/2, (x1, x2) = (x[i], x[i + hd/2]) ->
// (x1 cos - x2 sin, x2 cos + x1 sin). Rotated K and V go straight to their cache slots.
// Element d of a head x rotated, rounded to T as stored. c, s: the position's row of the
// tables, whose two halves are equal. The roundings are spelled out (no FMA contraction left
// to the compiler), so the decode kernel's own RoPE gives this kernel's values to the bit.
template <typename T>
__device__ __forceinline__ T rope_at(const T* x, int d, int hd, const float* c, const float* s) {
  const int half = hd / 2;
  const float a = to_f(x[d]), b = to_f(x[d < half ? d + half : d - half]);
  const float bs = __fmul_rn(b, s[d]);
  return from_f<T>(__fmaf_rn(a, c[d], d < half ? -bs : bs));
}

template <typename T>
__global__ void rope_cache_kernel(T* __restrict__ q_out,          // [T, H, hd]
                                  const T* __restrict__ q,        // [T, H, hd]
                                  const T* __restrict__ k,        // [T, Hkv, hd]
                                  const T* __restrict__ v,        // [T, Hkv, hd]
                                  const int64_t* __restrict__ pos,  // [T]
                                  const float* __restrict__ cos_t,  // [P, hd]
                                  const float* __restrict__ sin_t,  // [P, hd]
                                  T* __restrict__ k_cache,        // [blocks, block_size, Hkv, hd]
                                  T* __restrict__ v_cache,        // [blocks, block_size, Hkv, hd]
                                  const int64_t* __restrict__ slots,  // [T]
                                  int H, int Hkv, int hd, int64_t n_pos, int64_t n_slots) {
  const int64_t t = blockIdx.x;
  const int half = hd / 2;
  const int64_t p = pos[t], slot = slots[t];
  // Values only the device knows: a position past the RoPE table, or a slot past the pool,
  // is a bug upstream; stop (the host checks everything it can without a sync).
  CUDA_KERNEL_ASSERT(p >= 0 && p < n_pos && slot < n_slots);
  const float *c = cos_t + p * hd, *s = sin_t + p * hd;
  for (int j = threadIdx.x; j < (H + Hkv) * half; j += blockDim.x) {
    int h = j / half, i = j % half;
    if (h < H) {
      const T* src = q + (t * H + h) * hd;
      T* dst = q_out + (t * H + h) * hd;
      dst[i] = rope_at(src, i, hd, c, s);
      dst[i + half] = rope_at(src, i + half, hd, c, s);
    } else if (slot >= 0) {
      h -= H;
      const T* src = k + (t * Hkv + h) * hd;
      T* dst = k_cache + (slot * Hkv + h) * hd;
      dst[i] = rope_at(src, i, hd, c, s);
      dst[i + half] = rope_at(src, i + half, hd, c, s);
      const T* vs = v + (t * Hkv + h) * hd;
      T* vd = v_cache + (slot * Hkv + h) * hd;
      vd[i] = vs[i];
      vd[i + half] = vs[i + half];
    }
  }
}

torch::Tensor rope_and_cache(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor positions,
                             torch::Tensor cos_t, torch::Tensor sin_t, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor slot_mapping) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "rope_and_cache: q [T,H,hd], k/v [T,Hkv,hd]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "rope_and_cache: caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "rope_and_cache: cache dtype must match q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == k.size(1) &&
              k_cache.size(3) == q.size(2) && k.size(2) == q.size(2) && k.size(0) == q.size(0),
              "rope_and_cache: caches [blocks, block_size, Hkv, hd] must match k [T, Hkv, hd] and q [T, H, hd]");
  TORCH_CHECK(q.size(2) % 2 == 0 && cos_t.dim() == 2 && cos_t.sizes() == sin_t.sizes() && cos_t.size(1) == q.size(2),
              "rope_and_cache: cos/sin tables must be [positions, head_dim], head_dim even");
  TORCH_CHECK(positions.numel() == q.size(0) && slot_mapping.numel() == q.size(0),
              "rope_and_cache: one position and one slot per token");
  const at::cuda::OptionalCUDAGuard guard(device_of(q));
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  auto pos = positions.to(torch::kInt64).contiguous();
  auto slots = slot_mapping.to(torch::kInt64).contiguous();
  auto c = cos_t.to(torch::kFloat32).contiguous(), s = sin_t.to(torch::kFloat32).contiguous();
  auto q_out = torch::empty_like(q);
  int T = q.size(0), H = q.size(1), hd = q.size(2), Hkv = k.size(1);
  if (T == 0) return q_out;
  int threads = std::min(1024, (((H + Hkv) * hd / 2 + 31) / 32) * 32);
  DISPATCH(q.scalar_type(), "rope_and_cache", [&] {
    rope_cache_kernel<scalar_t><<<T, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        q_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        pos.data_ptr<int64_t>(), c.data_ptr<float>(), s.data_ptr<float>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), H, Hkv, hd, c.size(0),
        k_cache.size(0) * k_cache.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return q_out;
}

// ---------------------------------------------------------------- paged decode attention (Flash-Decoding)
// One query token per sequence. Grid (sequence, KV head, split): a block reads its KV
// head's cache once for all G = H / Hkv query heads of the group (GQA), over one
// partition of the context, and the last of a group's splits to finish merges them:
//   m = max_s m_s,  l = sum_s l_s e^(m_s - m),  o = sum_s o_s l_s e^(m_s - m) / l.
// "Last" is counted in global memory (counters, one per (sequence, KV head), zero at the
// launch and left zero by the merging block), so a split costs a partial result's write
// and read, not a second kernel: splitting pays as soon as it puts idle SMs to work.
// Decode attention is memory-bound (each cached byte is used G times), so the block is
// laid out for bytes in flight: a key's row (head_dim values) is read by lpk lanes with
// one 16-byte load each, a warp covers 32 / lpk rows per load, eight warps per block.
// Each lane keeps PD_UNROLL rows' loads in flight (issued together, used after), and the
// next PD_UNROLL rows are issued before the current ones are used (software pipelining, for
// groups up to 4: the loads of step i + 1 fly while step i multiplies and shuffles, so a warp
// is not idle for a whole memory latency per step); the first V rows are issued before the
// softmax. The partition's block-table entries are read once into shared memory, not once
// per key, and a power-of-two block size turns a key's block and offset into a shift.
// GM, the group G rounded up to 1, 2, 4 or 8, sizes the per-lane query and accumulator
// registers (a group of 4 does not hold 8 heads' worth) and the reduce-scatter below.
//
// ROPE: the step's RoPE and cache write happen here instead of in rope_cache_kernel (one
// launch less per layer). q, k and v arrive as projected, unrotated; a decode token sits at
// position ctx - 1. Every block rotates its group's queries (rope_at: the same values
// rope_cache_kernel stores); the block of the split holding the new token rotates its KV
// head's k, writes k and v to the token's cache slot, and reads that row from shared memory
// rather than from the cache it has just written (no other block reads it this step).
constexpr int PD_THREADS = 256, PD_MAX_G = 8, PD_UNROLL = 4;

// Whether this block is the last of its group's splits to arrive here, called by every
// thread of each split's block once its partial results are written: every thread fences its
// own writes (visible GPU-wide before the count moves), one thread counts the split in, and
// the block whose count completes the group goes on to read all the group's partials (from
// L2, __ldcg: other SMs wrote them). That block resets the count, which nothing else of this
// launch touches again, for the next launch (a CUDA graph's replay, the next layer).
__device__ __forceinline__ bool last_of_splits(int* count, int splits) {
  __shared__ int last_sh[1];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();          // the release for the block's writes, which the barrier ordered before it
    const bool last = atomicAdd(count, 1) == splits - 1;
    if (last) *count = 0;
    __threadfence();
    last_sh[0] = last;
  }
  __syncthreads();
  return last_sh[0];
}

// Once a split's partials (o, m, l) are written, by a block of paged_decode_kernel: the last
// of its group's (sequence, KV head) splits merges them into out. A call, not inlined
// (noinline, GNU's spelling of __noinline__): inlined at the kernel's two exits it cost the
// groups of 8 a register spill (two blocks per SM allow 128 registers).
template <typename T>
__device__ __attribute__((noinline)) void merge_splits_if_last(
    T* __restrict__ out, const float* __restrict__ o_part, const float* __restrict__ m_part,
    const float* __restrict__ l_part, int* __restrict__ counters, int H, int Hkv, int hd, int splits,
    float* m_sh, float* l_sh) {                        // m_sh, l_sh: [G] of the block's shared memory
  const int s = blockIdx.x, kvh = blockIdx.y, G = H / Hkv;
  if (!last_of_splits(counters + (int64_t)s * Hkv + kvh, splits)) return;
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  const int64_t row0 = ((int64_t)s * H + (int64_t)kvh * G) * splits;   // (s, h0, split 0)
  for (int g = threadIdx.x >> 5; g < G; g += nw) {   // a warp per head: its m and l
    const int64_t row = row0 + (int64_t)g * splits;
    float m = -INFINITY;
    for (int j = lane; j < splits; j += 32) m = fmaxf(m, __ldcg(m_part + row + j));
    m = warp_max(m);
    float l = 0.f;                                   // empty splits (l = 0, m = -inf) skipped
    for (int j = lane; j < splits; j += 32) {
      const float w = __ldcg(l_part + row + j);
      if (w > 0.f) l += w * __expf(__ldcg(m_part + row + j) - m);
    }
    l = warp_sum(l);
    if (lane == 0) { m_sh[g] = m; l_sh[g] = l; }
  }
  __syncthreads();
  T* out_g = out + ((int64_t)s * H + (int64_t)kvh * G) * hd;
  for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
    const int g = i / hd, d = i % hd;
    const int64_t row = row0 + (int64_t)g * splits;
    float acc = 0.f;
    for (int j = 0; j < splits; ++j) {
      const float w = __ldcg(l_part + row + j);
      if (w > 0.f) acc += __ldcg(o_part + (row + j) * hd + d) * w * __expf(__ldcg(m_part + row + j) - m_sh[g]);
    }
    out_g[i] = from_f<T>(l_sh[g] > 0.f ? acc / l_sh[g] : 0.f);   // every split empty: context 0 -> 0
  }
}

template <typename T, int GM, bool ROPE>
__global__ void __launch_bounds__(PD_THREADS, 2)     // two blocks per SM: at most 128 registers
paged_decode_kernel(T* __restrict__ out,             // [S, H, hd], when splits == 1
                    float* __restrict__ o_part,      // [S, H, splits, hd] normalised
                    float* __restrict__ m_part,      // [S, H, splits]
                    float* __restrict__ l_part,      // [S, H, splits]
                    int* __restrict__ counters,      // [S, Hkv] splits done, when splits > 1
                    const T* __restrict__ q,         // [S, H, hd], rows q_stride apart
                    const T* __restrict__ k_cache,   // [blocks, block_size, Hkv, hd]
                    const T* __restrict__ v_cache,   // [blocks, block_size, Hkv, hd]
                    const int* __restrict__ tables,  // [S, max_blocks]
                    const int* __restrict__ ctx_lens,  // [S]
                    int H, int Hkv, int hd, int block_size,
                    int bs_shift,                    // log2(block_size), or -1
                    int max_blocks, int part, int splits, int max_context, float scale,
                    int64_t q_stride,                // elements from one token's q to the next's
                    // ROPE only (null otherwise): the new tokens' k and v, [S, Hkv, hd] rows
                    // q_stride apart; their cache slots (-1: a padding row, not written) of
                    // n_slots; the cos/sin tables [n_pos, hd]; the caches again, to write the
                    // token's row.
                    const T* __restrict__ k_new, const T* __restrict__ v_new,
                    const int64_t* __restrict__ slots, int64_t n_slots, const float* __restrict__ cos_t,
                    const float* __restrict__ sin_t, int64_t n_pos, T* k_dst, T* v_dst) {
  constexpr int VEC = 16 / sizeof(T);                // cache values per 16-byte load
  extern __shared__ float smem[];
  const int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int G = H / Hkv, nw = blockDim.x >> 5;       // G <= GM
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int lpk = hd / VEC;                          // lanes sharing one row (a power of two <= 32)
  const int kpw = 32 / lpk;                          // rows a warp reads per load
  const int sub = lane / lpk, d0 = (lane % lpk) * VEC;   // this lane's row in the pass, first dim
  float* q_sh = smem;                                // [G, hd]
  float* logits = q_sh + G * hd;                     // [G, part]
  float* o_sh = logits + G * part;                   // [nw, G, hd] each warp's partial P V
  int* blk_sh = reinterpret_cast<int*>(o_sh + nw * G * hd);   // [part / block_size + 2] physical blocks
  const int ctx = ctx_lens[s];
  CUDA_KERNEL_ASSERT(ctx >= 0 && ctx <= max_context);   // the splits cover max_context keys only
  const int start = split * part, end = min(ctx, start + part);
  const int64_t base = ((int64_t)s * H + (int64_t)kvh * G) * splits + split;   // index of (s, h0, split)
  T* out_g = out + ((int64_t)s * H + (int64_t)kvh * G) * hd;                  // this group's heads
  __shared__ float m_sh[PD_MAX_G], l_sh[PD_MAX_G];   // per query head: softmax max and sum
  if (start >= end) {                  // nothing here: an empty partition (or a padding row)
    if (splits == 1) {                 // context 0: attention over no keys is 0 (as the twin)
      for (int i = threadIdx.x; i < G * hd; i += blockDim.x) out_g[i] = from_f<T>(0.f);
      return;
    }
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      m_part[base + (int64_t)g * splits] = -INFINITY;
      l_part[base + (int64_t)g * splits] = 0.f;
    }
    merge_splits_if_last(out, o_part, m_part, l_part, counters, H, Hkv, hd, splits, m_sh, l_sh);
    return;
  }
  const T* q_g = q + (int64_t)s * q_stride + (int64_t)kvh * G * hd;   // this group's G heads
  // With ROPE: the new token's rotated k and its v ([0] and [1], 16-byte pieces), which the
  // block holding its row (end == ctx) serves from here; -1: no row of this block is new.
  __shared__ uint4 fresh[2][ROPE ? 32 : 1];
  const int new_row = ROPE && end == ctx ? ctx - 1 : -1;
  if constexpr (ROPE) {
    const int64_t p = ctx - 1;                       // a decode token's position
    CUDA_KERNEL_ASSERT(p < n_pos);
    const float *c = cos_t + p * hd, *sn = sin_t + p * hd;
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x)
      q_sh[i] = to_f(rope_at(q_g + i / hd * hd, i % hd, hd, c, sn)) * scale;
    if (new_row >= 0) {
      const int64_t slot = slots[s];
      CUDA_KERNEL_ASSERT(slot < n_slots);              // a slot past the pool: a bug upstream
      const T* k_s = k_new + (int64_t)s * q_stride + (int64_t)kvh * hd;
      const T* v_s = v_new + (int64_t)s * q_stride + (int64_t)kvh * hd;
      for (int p16 = threadIdx.x; p16 < hd / VEC; p16 += blockDim.x) {   // a 16-byte piece each
        uint4 kp, vp;
        T *ke = reinterpret_cast<T*>(&kp), *ve = reinterpret_cast<T*>(&vp);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          ke[e] = rope_at(k_s, p16 * VEC + e, hd, c, sn);
          ve[e] = v_s[p16 * VEC + e];
        }
        fresh[0][p16] = kp;
        fresh[1][p16] = vp;
        if (slot >= 0) {
          reinterpret_cast<uint4*>(k_dst + (slot * Hkv + kvh) * hd)[p16] = kp;
          reinterpret_cast<uint4*>(v_dst + (slot * Hkv + kvh) * hd)[p16] = vp;
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) q_sh[i] = to_f(q_g[i]) * scale;
  }
  const int blk0 = start / block_size;               // the partition's first logical block
  for (int b = blk0 + threadIdx.x; b <= (end - 1) / block_size; b += blockDim.x)
    blk_sh[b - blk0] = tables[(int64_t)s * max_blocks + b];
  __syncthreads();
  // PD_UNROLL rows from t0 (this lane's: t0 + u * stride + sub) of a cache into registers,
  // zeros past the end. Key t's row: block table entry, offset in the block, this KV head;
  // the new token's (ROPE) from shared memory.
  const int stride = nw * kpw;                       // rows the block covers per load
  const int step = stride * PD_UNROLL;               // rows per step of the loops below
  auto load_rows = [&](const T* cache, int which, int t0, uint4 (&raw)[PD_UNROLL]) {   // which: K 0, V 1
#pragma unroll
    for (int u = 0; u < PD_UNROLL; ++u) {
      const int t = t0 + u * stride + sub;
      raw[u] = make_uint4(0u, 0u, 0u, 0u);
      if (ROPE && t == new_row) {
        raw[u] = fresh[which][d0 / VEC];
      } else if (t < end) {
        const int lb = bs_shift >= 0 ? t >> bs_shift : t / block_size;   // logical block
        const int64_t slot = (int64_t)blk_sh[lb - blk0] * block_size + (t - lb * block_size);
        raw[u] = *reinterpret_cast<const uint4*>(cache + (slot * Hkv + kvh) * hd + d0);
      }
    }
  };
  float qr[GM][VEC];                                 // this lane's dims of the G queries, in registers
#pragma unroll
  for (int g = 0; g < GM; ++g)
#pragma unroll
    for (int e = 0; e < VEC; ++e) qr[g][e] = g < G ? q_sh[g * hd + d0 + e] : 0.f;
  // S = q k^T for the G heads: each lane multiplies its VEC dims, the row's lpk lanes sum
  // (one shuffle tree per head; for 2+ heads over at least as many lanes a reduce-scatter,
  // fewer shuffles).
  const bool scatter = GM >= 2 && lpk >= GM;         // uniform over the block
  const int first = start + wid * kpw;               // warp-uniform
  // Eight heads' queries and partial sums leave no registers for a second set of rows within
  // the 128 that two blocks per SM allow (ptxas spills), so GM = 8 loads the next step's rows
  // after the current step, unpipelined.
  constexpr bool PIPELINE = GM <= 4;
  uint4 cur[PD_UNROLL], nxt[PD_UNROLL] = {};
  // At the top of the step at t0: the next step's rows into nxt, in flight during this step.
  auto prefetch = [&](const T* cache, int which, int t0) {
    if (PIPELINE && t0 + step < end) load_rows(cache, which, t0 + step, nxt);
  };
  // At its end: the next step's rows into cur (from nxt, or loaded now without pipelining).
  auto advance = [&](const T* cache, int which, int t0) {
    if (!PIPELINE) {
      if (t0 + step < end) load_rows(cache, which, t0 + step, cur);
    } else {
#pragma unroll
      for (int u = 0; u < PD_UNROLL; ++u) cur[u] = nxt[u];
    }
  };
  if (first < end) load_rows(k_cache, 0, first, cur);
  for (int t0 = first; t0 < end; t0 += step) {
    prefetch(k_cache, 0, t0);
#pragma unroll
    for (int u = 0; u < PD_UNROLL; ++u) {
      const int t = t0 + u * stride + sub;
      const T* kv = reinterpret_cast<const T*>(&cur[u]);
      if (scatter) {
        float a[GM];                                 // this lane's partial dot product per head
#pragma unroll
        for (int g = 0; g < GM; ++g) {
          a[g] = 0.f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) a[g] += qr[g][e] * to_f(kv[e]);
        }
        // Reduce-scatter over the row's lanes: at each step a lane keeps half of its heads
        // and sends the other half to its partner (lane ^ o), so GM heads cost GM - 1
        // shuffles, not GM x log2(lpk); then the lpk / GM lanes holding a head sum it.
#pragma unroll
        for (int st = 0, n = GM / 2; n >= 1; ++st, n >>= 1) {
          const int o = lpk >> (st + 1);
          const bool upper = lane & o;
#pragma unroll
          for (int i = 0; i < n; ++i) {
            const float keep = upper ? a[i + n] : a[i], give = upper ? a[i] : a[i + n];
            a[i] = keep + __shfl_xor_sync(0xffffffff, give, o);
          }
        }
        for (int o = lpk / (2 * GM); o > 0; o >>= 1) a[0] += __shfl_xor_sync(0xffffffff, a[0], o);
        int g = 0;                                   // the head this lane now holds
#pragma unroll
        for (int st = 0, n = GM / 2; n >= 1; ++st, n >>= 1) g |= lane & (lpk >> (st + 1)) ? n : 0;
        if (t < end && g < G && (lane & (lpk / GM - 1)) == 0) logits[g * part + (t - start)] = a[0];
      } else {
#pragma unroll
        for (int g = 0; g < GM; ++g) {
          if (g >= G) break;
          float a = 0.f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) a += qr[g][e] * to_f(kv[e]);
          for (int o = lpk >> 1; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
          if (t < end && d0 == 0) logits[g * part + (t - start)] = a;
        }
      }
    }
    advance(k_cache, 0, t0);
  }
  if (first < end) load_rows(v_cache, 1, first, cur);   // the first V rows fly during the softmax
  __syncthreads();
  // Softmax statistics per query head: one warp per head.
  for (int g = wid; g < G; g += nw) {
    float m = -INFINITY;
    for (int t = lane; t < end - start; t += 32) m = fmaxf(m, logits[g * part + t]);
    m = warp_max(m);
    float l = 0.f;
    for (int t = lane; t < end - start; t += 32) {
      float p = __expf(logits[g * part + t] - m);     // P = exp(S - m), l = rowsum(P)
      logits[g * part + t] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) { m_sh[g] = m; l_sh[g] = l; }
  }
  __syncthreads();
  // O = P V with the same layout: each lane accumulates its VEC dims for the G heads over
  // the rows it reads; then the rows of a pass (shuffles) and the warps (shared memory) sum.
  float acc[GM][VEC];
#pragma unroll
  for (int g = 0; g < GM; ++g)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[g][e] = 0.f;
  for (int t0 = first; t0 < end; t0 += step) {
    prefetch(v_cache, 1, t0);
#pragma unroll
    for (int u = 0; u < PD_UNROLL; ++u) {
      const int t = t0 + u * stride + sub;
      if (t >= end) break;                           // later u are past the end too
      const T* vv = reinterpret_cast<const T*>(&cur[u]);
#pragma unroll
      for (int g = 0; g < GM; ++g) {
        if (g >= G) break;
        const float p = logits[g * part + (t - start)];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] += p * to_f(vv[e]);
      }
    }
    advance(v_cache, 1, t0);
  }
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    if (g >= G) break;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      for (int o = lpk; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffff, acc[g][e], o);
      if (sub == 0) o_sh[(wid * G + g) * hd + d0 + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
    const int g = i / hd, d = i % hd;
    float o = 0.f;
    for (int w = 0; w < nw; ++w) o += o_sh[(w * G + g) * hd + d];
    if (splits == 1) out_g[i] = from_f<T>(o / l_sh[g]);   // one split: no merge
    else o_part[(base + (int64_t)g * splits) * hd + d] = o / l_sh[g];
  }
  if (splits == 1) return;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    m_part[base + (int64_t)g * splits] = m_sh[g];
    l_part[base + (int64_t)g * splits] = l_sh[g];
  }
  merge_splits_if_last(out, o_part, m_part, l_part, counters, H, Hkv, hd, splits, m_sh, l_sh);
}

// The split counters of a launch whose splits the last one to finish merges (last_of_splits),
// one per group of splits: the caller's (int32 zeros, which every launch leaves zero, so that
// one buffer serves every launch and a CUDA graph replays on it without a memset), checked
// even where nothing splits; else zeroed here, where something does.
torch::Tensor split_counters(const c10::optional<torch::Tensor>& counters, int64_t groups, bool splits,
                             const torch::Tensor& x, const char* name) {
  if (!counters.has_value()) return splits ? torch::zeros({groups}, x.options().dtype(torch::kInt32)) : torch::Tensor();
  const torch::Tensor& c = *counters;
  TORCH_CHECK(c.scalar_type() == torch::kInt32 && c.is_contiguous() && c.device() == x.device() && c.numel() >= groups,
              name, ": counters must be int32 zeros, contiguous, on the input's device, at least ", groups, " of them");
  return c;
}

// The launch for both forms. qkv: [S, H(+ 2 Hkv), hd], contiguous; rope: its k and v follow
// q in each row, and the kernel applies RoPE and writes them to the cache (slots, cos, sin).
static torch::Tensor launch_paged_decode(torch::Tensor qkv, int64_t H, torch::Tensor k_cache, torch::Tensor v_cache,
                                         torch::Tensor block_tables, torch::Tensor context_lens,
                                         int64_t max_context, double scale, int64_t part,
                                         c10::optional<torch::Tensor> counters, bool rope,
                                         torch::Tensor slots, torch::Tensor cos_t, torch::Tensor sin_t) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: caches must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == qkv.size(2) &&
              k_cache.scalar_type() == qkv.scalar_type(), "paged_decode: caches [blocks, block_size, Hkv, hd] of q's dtype");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
              "paged_decode: the caches must be 16-byte aligned (16-byte loads)");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == qkv.size(0) && context_lens.numel() == qkv.size(0),
              "paged_decode: one block table row and one context length per sequence");
  TORCH_CHECK(max_context >= 0 && part > 0, "paged_decode: max_context >= 0 and part > 0");
  const at::cuda::OptionalCUDAGuard guard(device_of(qkv));
  auto tables = block_tables.to(torch::kInt32).contiguous();
  auto lens = context_lens.to(torch::kInt32).contiguous();
  int S = qkv.size(0), hd = qkv.size(2);
  int block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(H > 0 && H % Hkv == 0 && H / Hkv <= PD_MAX_G, "paged_decode: H must be a multiple of Hkv, G <= 8");
  TORCH_CHECK(qkv.size(1) == (rope ? H + 2 * Hkv : H), "paged_decode: q must be [S, H, hd] (with RoPE [S, H + 2 Hkv, hd])");
  const int lpk = hd * (int)qkv.element_size() / 16;   // lanes per cached row
  TORCH_CHECK(hd * qkv.element_size() % 16 == 0 && lpk <= 32 && (lpk & (lpk - 1)) == 0,
              "paged_decode: head_dim x element size must be 16 bytes times a power of two <= 32");
  int splits = std::max<int64_t>(1, (max_context + part - 1) / part);
  TORCH_CHECK(splits <= 65535, "paged_decode: max_context / part must be <= 65535 splits");
  auto out = torch::empty({S, H, hd}, qkv.options());
  if (S == 0) return out;
  // Partials only when there is something to merge: one split writes out directly. The
  // split counters: the caller's (zero, as every launch leaves them), else zeroed here.
  auto f32 = qkv.options().dtype(torch::kFloat32);
  auto o_part = torch::empty({splits > 1 ? S : 0, H, splits, hd}, f32);
  auto m_part = torch::empty({splits > 1 ? S : 0, H, splits}, f32);
  auto l_part = torch::empty({splits > 1 ? S : 0, H, splits}, f32);
  const torch::Tensor count = split_counters(counters, (int64_t)S * Hkv, splits > 1, qkv, "paged_decode");
  int G = H / Hkv;
  size_t smem = (size_t)(G * hd + G * part + (PD_THREADS / 32) * G * hd) * sizeof(float) +
                (size_t)(part / block_size + 2) * sizeof(int);
  dim3 grid(S, Hkv, splits);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int bs_shift = (block_size & (block_size - 1)) == 0 ? __builtin_ctz(block_size) : -1;
  const int64_t q_stride = qkv.size(1) * hd;
  DISPATCH(qkv.scalar_type(), "paged_decode", [&] {
    const scalar_t* q_ptr = qkv.data_ptr<scalar_t>();
    const int64_t* slot_ptr = rope ? slots.data_ptr<int64_t>() : nullptr;
    const float* cos_ptr = rope ? cos_t.data_ptr<float>() : nullptr;
    const float* sin_ptr = rope ? sin_t.data_ptr<float>() : nullptr;
    scalar_t* k_dst = rope ? k_cache.data_ptr<scalar_t>() : nullptr;
    scalar_t* v_dst = rope ? v_cache.data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto gm, auto with_rope) {     // std::integral_constant<int, GM>, <bool, ROPE>
      auto kernel = paged_decode_kernel<scalar_t, decltype(gm)::value, decltype(with_rope)::value>;
      ALLOW_SMEM(kernel, smem);
      kernel<<<grid, PD_THREADS, smem, stream>>>(
          out.data_ptr<scalar_t>(), o_part.data_ptr<float>(), m_part.data_ptr<float>(), l_part.data_ptr<float>(),
          splits > 1 ? count.data_ptr<int>() : nullptr, q_ptr, k_cache.data_ptr<scalar_t>(),
          v_cache.data_ptr<scalar_t>(), tables.data_ptr<int>(), lens.data_ptr<int>(), (int)H, Hkv, hd, block_size,
          bs_shift, (int)tables.size(1), (int)part, splits, (int)max_context, (float)scale, q_stride,
          rope ? q_ptr + H * hd : nullptr,
          rope ? q_ptr + (H + Hkv) * hd : nullptr, slot_ptr, k_cache.size(0) * k_cache.size(1), cos_ptr, sin_ptr,
          rope ? cos_t.size(0) : 0, k_dst, v_dst);
    };
    auto with_group = [&](auto with_rope) {
      if (G == 1) launch(std::integral_constant<int, 1>(), with_rope);
      else if (G == 2) launch(std::integral_constant<int, 2>(), with_rope);
      else if (G <= 4) launch(std::integral_constant<int, 4>(), with_rope);
      else launch(std::integral_constant<int, 8>(), with_rope);
    };
    if (rope) with_group(std::true_type());
    else with_group(std::false_type());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, int64_t max_context,
                           double scale, int64_t part, c10::optional<torch::Tensor> counters) {
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be [S, H, hd]");
  torch::Tensor none;
  return launch_paged_decode(q.contiguous(), q.size(1), k_cache, v_cache, block_tables, context_lens, max_context,
                             scale, part, counters, false, none, none, none);
}

// Decode attention with the step's RoPE and cache write folded in (one launch instead of
// rope_and_cache's and this one's): qkv [S, H + 2 Hkv, hd] the projections as they come
// (q's H heads, then k's and v's Hkv), slot_mapping [S] the new tokens' slots, cos/sin
// [positions, hd]. Each token is at position context_lens - 1.
torch::Tensor paged_decode_rope(torch::Tensor qkv, int64_t n_heads, torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor block_tables, torch::Tensor context_lens,
                                torch::Tensor slot_mapping, torch::Tensor cos_t, torch::Tensor sin_t,
                                int64_t max_context, double scale, int64_t part,
                                c10::optional<torch::Tensor> counters) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 2 == 0, "paged_decode_rope: qkv must be [S, H + 2 Hkv, hd], hd even");
  TORCH_CHECK(cos_t.dim() == 2 && cos_t.sizes() == sin_t.sizes() && cos_t.size(1) == qkv.size(2),
              "paged_decode_rope: cos/sin tables must be [positions, head_dim]");
  TORCH_CHECK(slot_mapping.numel() == qkv.size(0), "paged_decode_rope: one slot per token");
  auto slots = slot_mapping.to(torch::kInt64).contiguous();
  auto c = cos_t.to(torch::kFloat32).contiguous(), s = sin_t.to(torch::kFloat32).contiguous();
  return launch_paged_decode(qkv.contiguous(), n_heads, k_cache, v_cache, block_tables, context_lens, max_context,
                             scale, part, counters, true, slots, c, s);
}

// ---------------------------------------------------------------- paged prefill / verification attention
// Several queries per sequence (a prefill chunk, or the k + 1 positions of a speculative
// window) against the paged cache, causal, FlashAttention style: the block keeps a tile
// of queries on chip and streams K/V tiles past it, keeping per row a running max m, a
// running sum l and an unnormalised output o (online softmax):
//   m' = max(m, max_j s_j),  l' = l e^(m - m') + sum_j e^(s_j - m'),  o' = o e^(m - m') + sum_j e^(s_j - m') v_j
// so the (queries x context) score matrix never exists in memory.
// Grid (query tile, sequence, KV head): tiles in x, whose limit is 2^31 - 1. A tile holds PF_ROWS rows = (query token, head)
// pairs of one KV head's group: PF_ROWS / G tokens x the G heads sharing that K/V head,
// so each K/V tile is read once for the whole group (GQA). Each warp owns PF_RPW rows;
// for a row, lane j scores key j of the tile, then the lanes share p_j by shuffles and
// each accumulates its own slice of head_dim. CUDA cores only: the readable form of the
// algorithm, and the path for fp32, head sizes other than 64/128 and GPUs before Ampere;
// fp16/bf16 at head_dim 64/128 take the tensor-core kernel below (prefill is compute-bound).
constexpr int PF_ROWS = 64, PF_BK = 32, PF_WARPS = 8, PF_RPW = PF_ROWS / PF_WARPS, PF_MAXC = 8;

template <typename T>
__global__ void paged_prefill_kernel(T* __restrict__ out,              // [T, H, hd]
                                     const T* __restrict__ q,          // [T, H, hd]
                                     const T* __restrict__ k_cache,    // [blocks, block_size, Hkv, hd]
                                     const T* __restrict__ v_cache,    // [blocks, block_size, Hkv, hd]
                                     const int* __restrict__ tables,   // [S, max_blocks]
                                     const int* __restrict__ q_start,  // [S + 1]
                                     const int* __restrict__ ctx_lens,  // [S]
                                     int H, int Hkv, int hd, int block_size, int max_blocks,
                                     int tile_tokens, float scale) {
  extern __shared__ float smem[];
  const int s = blockIdx.y, kvh = blockIdx.z, G = H / Hkv;
  const int q0 = q_start[s], q_len = q_start[s + 1] - q0;
  const int t0 = blockIdx.x * tile_tokens;           // first query of the tile, within the sequence
  if (t0 >= q_len) return;                           // this sequence has fewer tiles
  const int n_tok = min(tile_tokens, q_len - t0), rows = n_tok * G;
  const int past = ctx_lens[s] - q_len;              // query i sits at position past + i
  const int ld = hd + 1;                             // padded K rows: lane j reads row j without bank conflicts
  float* q_sh = smem;                                // [PF_ROWS, hd], row r = (token r / G, head r % G)
  float* k_sh = q_sh + PF_ROWS * hd;                 // [PF_BK, hd + 1]
  float* v_sh = k_sh + PF_BK * ld;                   // [PF_BK, hd]
  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    int r = i / hd, d = i % hd;
    int64_t tok = q0 + t0 + r / G, h = (int64_t)kvh * G + r % G;
    q_sh[i] = to_f(q[(tok * H + h) * hd + d]) * scale;
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  float m[PF_RPW], l[PF_RPW], acc[PF_RPW][PF_MAXC];
#pragma unroll
  for (int i = 0; i < PF_RPW; ++i) {
    m[i] = -INFINITY; l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < PF_MAXC; ++c) acc[i][c] = 0.f;
  }
  const int kv_end = past + t0 + n_tok;              // keys [0, kv_end) are visible to some row
  for (int kb = 0; kb < kv_end; kb += PF_BK) {
    __syncthreads();                                 // Q is loaded; the last K/V tile is consumed
    for (int i = threadIdx.x; i < PF_BK * hd; i += blockDim.x) {
      int j = i / hd, d = i % hd, t = kb + j;
      float kx = 0.f, vx = 0.f;
      if (t < kv_end) {
        int blk = tables[(int64_t)s * max_blocks + t / block_size];
        int64_t off = (((int64_t)blk * block_size + t % block_size) * Hkv + kvh) * hd + d;
        kx = to_f(k_cache[off]);
        vx = to_f(v_cache[off]);
      }
      k_sh[j * ld + d] = kx;
      v_sh[j * hd + d] = vx;
    }
    __syncthreads();
    const int key = kb + lane;
#pragma unroll
    for (int i = 0; i < PF_RPW; ++i) {
      const int r = wid * PF_RPW + i;                // the same for the whole warp
      if (r >= rows) break;
      const int qpos = past + t0 + r / G;
      float sc = -INFINITY;                          // causal mask: key j visible iff j <= qpos
      if (key <= qpos) {
        float a = 0.f;
        for (int d = 0; d < hd; ++d) a += q_sh[r * hd + d] * k_sh[lane * ld + d];
        sc = a;
      }
      const float m_new = fmaxf(m[i], warp_max(sc));
      if (m_new == -INFINITY) continue;              // every key of this tile is in the row's future
      const float p = __expf(sc - m_new);            // 0 for masked keys
      const float alpha = __expf(m[i] - m_new);      // rescales what was accumulated under the old max
      l[i] = l[i] * alpha + warp_sum(p);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < PF_MAXC; ++c) acc[i][c] *= alpha;
      for (int j = 0; j < PF_BK; ++j) {
        const float pj = __shfl_sync(0xffffffff, p, j);
#pragma unroll
        for (int c = 0; c < PF_MAXC; ++c) {
          int d = lane + 32 * c;
          if (d < hd) acc[i][c] += pj * v_sh[j * hd + d];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < PF_RPW; ++i) {
    const int r = wid * PF_RPW + i;
    if (r >= rows) break;
    int64_t tok = q0 + t0 + r / G, h = (int64_t)kvh * G + r % G;
#pragma unroll
    for (int c = 0; c < PF_MAXC; ++c) {
      int d = lane + 32 * c;
      if (d < hd) out[(tok * H + h) * hd + d] = from_f<T>(l[i] > 0.f ? acc[i][c] / l[i] : 0.f);  // no visible key: 0
    }
  }
}

// ---------------------------------------------------------------- paged prefill on tensor cores
// The same computation as above, for fp16/bf16 and head_dim 64 or 128, in FlashAttention-2's
// structure on mma.sync (m16n8k16, fp32 accumulation; the register layouts below): per block a
// tile of TC_BM rows (query token x group head, as above), 16 per warp; K/V tiles of TC_BN
// keys stream past, double-buffered with cp.async (the copy of tile j + 1 is in flight while
// tile j is computed). Per warp and tile, in registers:
//   S = Q K^T               [16, BN]: Q's A fragments loaded once (ldmatrix), K's B
//                           fragments by ldmatrix from the K tile
//   online softmax in fp32  on S's accumulators: lane 4g + t holds rows g and g + 8, and a
//                           row's values sit in the 4 lanes of a quad, so its max and sum
//                           take two shuffles
//   O = diag(alpha) O + P V [16, HD]: P's A fragments are S's accumulators rounded to 16 bits
//                           (two adjacent 8-key accumulator tiles have the layout of one
//                           16-key A fragment), V's B fragments by ldmatrix.trans
// Only K, V and Q's one load pass through shared memory, and the block meets once per tile
// (the buffer swap). Work per tile and warp: 2 x 16 x BN x HD multiply-adds on tensor cores
// against 16 x BN exponentials on CUDA cores.
// 128 rows and 8 warps: each K/V tile copied into shared memory serves twice the rows a
// 64-row tile would (half the L2 reads and copies per row), at the same warps per SM (the
// registers allow one such block per SM, or two of 64 rows).
constexpr int TC_BM = 128, TC_BN = 64, TC_WARPS = TC_BM / 16;

template <typename T> struct mma_type;           // c10's 16-bit types -> CUDA's
template <> struct mma_type<c10::Half> { using type = __half; };
template <> struct mma_type<c10::BFloat16> { using type = __nv_bfloat16; };

// mma.sync.m16n8k16 with 16-bit A and B and fp32 C, in the register layout the PTX ISA fixes
// (g = lane / 4, t = lane % 4; a register holds two 16-bit values, the lower k in its low half):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]   (B is k x n: b holds column n = g)
//   d[0], d[1] = D[g][2t, 2t+1]                        d[2], d[3] = D[g+8][2t, 2t+1]
// The portable twin computes D += A B from the same registers with warp shuffles, in fp32 with
// k ascending (the tensor core's summation order and internal precision differ: rounding
// only). kemu runs the twin; on a GPU the self-check runs the kernels both ways (PORTABLE).
__device__ __forceinline__ float2 pair_to_float2(uint32_t u, __half) {
  return __half22float2(*reinterpret_cast<__half2*>(&u));
}
__device__ __forceinline__ float2 pair_to_float2(uint32_t u, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}
__device__ __forceinline__ uint32_t float2_to_pair(float lo, float hi, __half) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t float2_to_pair(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The twin is a call (noinline): inlined into a kernel with many accumulators, its shuffles
// scheduled side by side spilled registers in sm_90 code (the tiled quantized kernel's).
template <typename W>
__device__ __attribute__((noinline)) void mma_16816_twin(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x & 31, quad = lane & ~3, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h)                 // k 0-7 (a[0], a[1], b[0]), then k 8-15 (a[2], a[3], b[1])
#pragma unroll
    for (int s = 0; s < 4; ++s) {             // lane quad + s holds k = 2s, 2s + 1 (+ 8h)
      float2 ar[2], bc[2];                    // A's rows g, g + 8 and B's columns 2t, 2t + 1 at those k
#pragma unroll
      for (int r = 0; r < 2; ++r) ar[r] = pair_to_float2(__shfl_sync(0xffffffffu, a[2 * h + r], quad + s), W());
#pragma unroll
      for (int c = 0; c < 2; ++c)             // column n is held by lanes 4n .. 4n + 3
        bc[c] = pair_to_float2(__shfl_sync(0xffffffffu, b[h], 4 * (2 * t + c) + s), W());
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        d[i] = fmaf(ar[i >> 1].x, bc[i & 1].x, d[i]);
        d[i] = fmaf(ar[i >> 1].y, bc[i & 1].y, d[i]);
      }
    }
}

template <typename W, bool PORTABLE>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!PORTABLE) {
#define MMA_16816(TYPE)                                                                                      \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 "                             \
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"                           \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
    if constexpr (std::is_same<W, __half>::value) MMA_16816("f16");
    else MMA_16816("bf16");
#undef MMA_16816
    return;
  }
#endif
  mma_16816_twin<W>(d, a, b);
}

// ldmatrix.x4: four 8 x 8 tiles of 16-bit values from shared memory into one register each,
// in the fragment layout above: of tile j, lane 4g + t gets row g's values 2t and 2t + 1, or
// with TRANS row 2t's and row 2t + 1's value g (the tile transposed). row(j, i) is the
// address of tile j's row i (16-byte aligned); on the GPU lane l passes row(l / 8, l % 8) and
// the instruction gathers. The twin reads each lane's four pairs itself.
template <bool TRANS, bool PORTABLE, typename Row>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], Row row) {
  const int lane = threadIdx.x & 31;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!PORTABLE) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row(lane >> 3, lane & 7)));
    if constexpr (TRANS)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    return;
  }
#endif
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (TRANS) {
      const uint32_t lo = reinterpret_cast<const uint16_t*>(row(j, 2 * t))[g];
      const uint32_t hi = reinterpret_cast<const uint16_t*>(row(j, 2 * t + 1))[g];
      r[j] = lo | hi << 16;
    } else {
      r[j] = reinterpret_cast<const uint32_t*>(row(j, g))[t];
    }
  }
}

template <int HD> constexpr size_t prefill_tc_smem(size_t elem) {
  return (size_t)(TC_BM + 4 * TC_BN) * (HD + 8) * elem;            // Q, 2 x K, 2 x V (rows padded by 16 bytes)
}

template <typename T, int HD, bool PORTABLE>
__global__ void __launch_bounds__(TC_WARPS * 32)
paged_prefill_tc_kernel(T* __restrict__ out,              // [T, H, HD]
                        const T* __restrict__ q,          // [T, H, HD], 16-byte aligned
                        const T* __restrict__ k_cache,    // [blocks, block_size, Hkv, HD], 16-byte aligned
                        const T* __restrict__ v_cache,
                        const int* __restrict__ tables,   // [S, max_blocks]
                        const int* __restrict__ q_start,  // [S + 1]
                        const int* __restrict__ ctx_lens,  // [S]
                        int H, int Hkv, int block_size, int max_blocks, int tile_tokens, float scale_log2) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800     // mma.sync on 16-bit types and cp.async: sm_80+ (the host checks)
  using W = typename mma_type<T>::type;
  constexpr int LDH = HD + 8;                                     // a row padded by 16 bytes: ldmatrix's 8 rows
                                                                  // fall on 8 different bank quads
  constexpr int PER16 = 16 / sizeof(T), CHUNKS = HD / PER16;      // 16-byte pieces of one row
  constexpr int KF = HD / 16, NS = TC_BN / 8, NO = HD / 8;        // S's k-steps, S's and O's 8-column tiles
  extern __shared__ __align__(128) uint8_t tc_smem[];
  W* q_sh = reinterpret_cast<W*>(tc_smem);                        // [BM, LDH]
  W* k_sh = q_sh + TC_BM * LDH;                                   // [2][BN, LDH]
  W* v_sh = k_sh + 2 * TC_BN * LDH;                               // [2][BN, LDH]

  const int s = blockIdx.y, kvh = blockIdx.z, G = H / Hkv;
  const int q0 = q_start[s], q_len = q_start[s + 1] - q0;
  const int t0 = blockIdx.x * tile_tokens;
  if (t0 >= q_len) return;                                        // this sequence has fewer tiles
  const int n_tok = min(tile_tokens, q_len - t0), rows = n_tok * G;
  const int past = ctx_lens[s] - q_len;                           // query i sits at position past + i
  const int kv_end = max(past + t0 + n_tok, 0);                   // keys [0, kv_end) are visible to some row
  const int n_tiles = (kv_end + TC_BN - 1) / TC_BN;
  const uint4 zero16 = make_uint4(0u, 0u, 0u, 0u);

  // K/V tile j -> buffer b: one block-table lookup per key row, 16-byte cp.async copies;
  // keys past kv_end are zero-filled (their p is 0, and 0 x stale data could be NaN).
  auto load_kv = [&](int j, int b) {
    W* kd = k_sh + b * TC_BN * LDH;
    W* vd = v_sh + b * TC_BN * LDH;
    for (int i = threadIdx.x; i < TC_BN * CHUNKS; i += blockDim.x) {
      const int r = i / CHUNKS, c = i % CHUNKS, t = j * TC_BN + r;
      if (t < kv_end) {
        const int blk = tables[(int64_t)s * max_blocks + t / block_size];
        const int64_t off = (((int64_t)blk * block_size + t % block_size) * Hkv + kvh) * HD + c * PER16;
        __pipeline_memcpy_async(kd + r * LDH + c * PER16, k_cache + off, 16);
        __pipeline_memcpy_async(vd + r * LDH + c * PER16, v_cache + off, 16);
      } else {
        *reinterpret_cast<uint4*>(kd + r * LDH + c * PER16) = zero16;
        *reinterpret_cast<uint4*>(vd + r * LDH + c * PER16) = zero16;
      }
    }
    __pipeline_commit();
  };
  if (n_tiles > 0) load_kv(0, 0);                                 // in flight while Q loads
  for (int i = threadIdx.x; i < TC_BM * CHUNKS; i += blockDim.x) {
    const int r = i / CHUNKS, c = i % CHUNKS;
    uint4 v = zero16;                                             // padding rows: Q = 0, never written out
    if (r < rows) {
      const int64_t tok = q0 + t0 + r / G, h = (int64_t)kvh * G + r % G;
      v = reinterpret_cast<const uint4*>(q + (tok * H + h) * HD)[c];
    }
    *reinterpret_cast<uint4*>(q_sh + r * LDH + c * PER16) = v;
  }
  __syncthreads();                                                // the Q tile is in place

  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // Q's A fragments, per k-step f: tiles (rows 0-7 | 8-15) x (dims 16f | 16f + 8).
  const W* qw = q_sh + w * 16 * LDH;
  uint32_t qf[KF][4];
#pragma unroll
  for (int f = 0; f < KF; ++f)
    ldsm_x4<false, PORTABLE>(qf[f], [&](int j, int i) { return qw + (i + 8 * (j & 1)) * LDH + 16 * f + 8 * (j >> 1); });
  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[n][i] = 0.f;
  // This lane's rows g and g + 8 (r = 0, 1): key u is visible iff u <= qpos[r]. Running max
  // (log2 domain: scale_log2 = scale x log2 e) and this lane's share of the running sum.
  const int qpos[2] = {past + t0 + (w * 16 + g) / G, past + t0 + (w * 16 + g + 8) / G};
  const int qpos_first = past + t0 + w * 16 / G;                  // the warp's first row's
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  for (int j = 0; j < n_tiles; ++j) {
    const int b = j & 1;
    if (j + 1 < n_tiles) { load_kv(j + 1, b ^ 1); __pipeline_wait_prior(1); }  // tile j landed, j + 1 in flight
    else __pipeline_wait_prior(0);
    __syncthreads();                                              // ... for every thread's copies
    const W* kt = k_sh + b * TC_BN * LDH;
    const W* vt = v_sh + b * TC_BN * LDH;
    // S = Q K^T: B's column n is key n, so K's rows are read as they lie: tiles (keys 8n |
    // 8n + 8) x (dims 16f | 16f + 8) give two 8-key tiles' fragments per ldmatrix.
    float sc[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[n][i] = 0.f;
#pragma unroll
    for (int n = 0; n < NS; n += 2)
#pragma unroll
      for (int f = 0; f < KF; ++f) {
        uint32_t kf[4];
        ldsm_x4<false, PORTABLE>(kf, [&](int jj, int i) {
          return kt + (8 * (n + (jj >> 1)) + i) * LDH + 16 * f + 8 * (jj & 1); });
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        mma_16816<W, PORTABLE>(sc[n], qf[f], b0);
        mma_16816<W, PORTABLE>(sc[n + 1], qf[f], b1);
      }
    // Online softmax: sc[n][i] is row g + 8 (i >> 1) and key j BN + 8n + 2t + (i & 1). The max
    // is taken of the raw scores (scale > 0 keeps their order) and the scale folded into the
    // exponent's FMA; a tile whose every key the warp's first row sees needs no mask (its rows
    // are in order of position).
    const bool masked = (j + 1) * TC_BN - 1 > qpos_first;         // the same for the whole warp
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (masked && j * TC_BN + 8 * n + 2 * t + (i & 1) > qpos[i >> 1]) sc[n][i] = -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], sc[n][i]);
      }
    float m_use[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r] * scale_log2);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;                // no visible key yet: p = 0, not NaN
      alpha[r] = exp2f(m_run[r] - m_use[r]);                      // rescales what the old max weighted
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
    // P as A fragments, one per 16 keys: accumulator tiles 2kk and 2kk + 1.
    uint32_t pf[NS / 2][4];
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      float p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        p[i] = exp2f(fmaf(sc[n][i], scale_log2, -m_use[i >> 1]));  // masked: exp2(-inf) = 0
        l_run[i >> 1] += p[i];
      }
      pf[n >> 1][2 * (n & 1)] = float2_to_pair(p[0], p[1], W());
      pf[n >> 1][2 * (n & 1) + 1] = float2_to_pair(p[2], p[3], W());
    }
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i >> 1];
    // O += P V: B's row k is key k, so V's tiles are read transposed: (keys 16kk | 16kk + 8)
    // x (dims 8n | 8n + 8) give two 8-dim tiles' fragments per ldmatrix.
#pragma unroll
    for (int kk = 0; kk < NS / 2; ++kk)
#pragma unroll
      for (int n = 0; n < NO; n += 2) {
        uint32_t vf[4];
        ldsm_x4<true, PORTABLE>(vf, [&](int jj, int i) {
          return vt + (16 * kk + 8 * (jj & 1) + i) * LDH + 8 * (n + (jj >> 1)); });
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        mma_16816<W, PORTABLE>(o[n], pf[kk], b0);
        mma_16816<W, PORTABLE>(o[n + 1], pf[kk], b1);
      }
    __syncthreads();                                              // buffer b is free for tile j + 2
  }
  // O / l (a row that saw no key: 0): the row's sum is its quad's four shares.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = w * 16 + g + 8 * r;
    if (row >= rows) continue;
    const int64_t tok = q0 + t0 + row / G, h = (int64_t)kvh * G + row % G;
    T* dst = out + (tok * H + h) * HD + 2 * t;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      dst[8 * n] = from_f<T>(o[n][2 * r] * inv);
      dst[8 * n + 1] = from_f<T>(o[n][2 * r + 1] * inv);
    }
  }
#endif
}

template <typename T, int HD, bool PORTABLE>
void launch_prefill_tc(dim3 grid, torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                       const torch::Tensor& v_cache, const torch::Tensor& tables, const torch::Tensor& starts,
                       const torch::Tensor& lens, int tile_tokens, double scale) {
  const size_t smem = prefill_tc_smem<HD>(sizeof(T));
  ALLOW_SMEM((paged_prefill_tc_kernel<T, HD, PORTABLE>), smem);
  const float scale_log2 = (float)(scale * 1.4426950408889634);   // e^x = 2^(x log2 e)
  paged_prefill_tc_kernel<T, HD, PORTABLE><<<grid, TC_WARPS * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<T>(), q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), tables.data_ptr<int>(),
      starts.data_ptr<int>(), lens.data_ptr<int>(), (int)q.size(1), (int)k_cache.size(2), (int)k_cache.size(1),
      (int)tables.size(1), tile_tokens, scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

torch::Tensor paged_prefill(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor query_start_loc,
                            torch::Tensor context_lens, int64_t max_query_len, double scale, bool tensor_cores,
                            bool portable) {
  TORCH_CHECK(q.dim() == 3, "paged_prefill: q must be [T, H, hd]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_prefill: caches must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2) &&
              k_cache.scalar_type() == q.scalar_type(), "paged_prefill: caches [blocks, block_size, Hkv, hd] of q's dtype");
  TORCH_CHECK(block_tables.dim() == 2 && query_start_loc.numel() == block_tables.size(0) + 1 &&
              context_lens.numel() == block_tables.size(0),
              "paged_prefill: S block table rows, S + 1 query starts, S context lengths");
  TORCH_CHECK(block_tables.size(0) <= 65535, "paged_prefill: at most 65535 sequences per call");
  const at::cuda::OptionalCUDAGuard guard(device_of(q));
  q = q.contiguous();
  auto tables = block_tables.to(torch::kInt32).contiguous();
  auto starts = query_start_loc.to(torch::kInt32).contiguous();
  auto lens = context_lens.to(torch::kInt32).contiguous();
  int S = tables.size(0), H = q.size(1), hd = q.size(2);
  int block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= PF_ROWS, "paged_prefill: H must be a multiple of Hkv, G <= 64");
  TORCH_CHECK(hd <= 32 * PF_MAXC, "paged_prefill: head_dim must be <= 256");
  TORCH_CHECK(scale > 0, "paged_prefill: scale must be positive");
  // Tensor cores for fp16/bf16 at head_dim 64 or 128 with 16-byte aligned caches (cp.async
  // copies 16 bytes) on a GPU that has them for bf16 (tensor_cores: compute capability 8.0+);
  // the CUDA-core kernel for the rest (fp32, other head sizes, older GPUs).
  const bool tc = tensor_cores && (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) && (hd == 64 || hd == 128) &&
                  reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0;
  if (tc && reinterpret_cast<uintptr_t>(q.data_ptr()) % 16) q = q.clone();   // 16-byte loads of Q rows
  auto out = torch::empty_like(q);
  if (q.size(0) == 0 || S == 0) return out;
  int tile_tokens = (tc ? TC_BM : PF_ROWS) / (H / Hkv);     // a tile: whole groups of query heads
  dim3 grid((std::max<int64_t>(max_query_len, 1) + tile_tokens - 1) / tile_tokens, S, Hkv);
  if (tc) {
    const bool f16 = q.scalar_type() == at::kHalf;
    // portable: the mma and ldmatrix twins, for the self-check; at head_dim 64 only (at 128
    // the twins' registers spill).
    TORCH_CHECK(!portable || hd == 64, "paged_prefill: the portable twins run at head_dim 64");
    auto* launch = portable ? (f16 ? launch_prefill_tc<c10::Half, 64, true> : launch_prefill_tc<c10::BFloat16, 64, true>)
                 : f16 ? (hd == 64 ? launch_prefill_tc<c10::Half, 64, false> : launch_prefill_tc<c10::Half, 128, false>)
                       : (hd == 64 ? launch_prefill_tc<c10::BFloat16, 64, false>
                                   : launch_prefill_tc<c10::BFloat16, 128, false>);
    launch(grid, out, q, k_cache, v_cache, tables, starts, lens, tile_tokens, scale);
    return out;
  }
  size_t smem = (size_t)(PF_ROWS * hd + PF_BK * (hd + 1) + PF_BK * hd) * sizeof(float);
  DISPATCH(q.scalar_type(), "paged_prefill", [&] {
    ALLOW_SMEM(paged_prefill_kernel<scalar_t>, smem);
    paged_prefill_kernel<scalar_t><<<grid, PF_WARPS * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), tables.data_ptr<int>(), starts.data_ptr<int>(), lens.data_ptr<int>(),
        H, Hkv, hd, block_size, (int)tables.size(1), tile_tokens, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------- W4A16 / W8A16 for small batches
// y[m, n] = sum_k x[m, k] * s[n, k / G] * (q[n, k] - z[n, k / G]). This GEMV on CUDA cores
// serves 1-16 rows where the mma kernel below does not: fp32 x, GPUs before Ampere, int4
// groups of 32 or 64 inputs. At batch 1 the weights are
// the only bytes that matter (1/4 (int4) or 1/2 (int8) of a bf16 GEMV's), and a kernel that
// streams them at the bandwidth must also keep up in instructions: at 80% of an H200's measured
// 4.2 TB/s copy bandwidth an SM (132 at 1.98 GHz) takes in about 26 int4 codes per clock and
// issues 128 thread-instructions per clock, so a code may cost about 5 instructions in all.
// Decoding each code on its own costs 7-9 (in sm_90 code: a shift, two logic ops and an fp32
// subtract to make it a float, a shift or permute to widen its x, the FMA; an integer division
// per chunk), which measured 13-23% of the copy bandwidth on an H200. This kernel (about 4.3
// instructions per int4 code and 4.2-4.6 per int8 code in its sm_90 loop):
// - makes codes two per instruction (CodeDecoder below: one logic op and one half2 op per pair);
// - stages x once per block in shared memory as fp32, so the loop reads it ready to use (one
//   16-byte shared load per 4 codes and row) instead of widening it per code and per channel;
// - gives each warp two output channels, so each x value read from shared memory feeds two FMAs;
// - folds the zero point out of the loop: sum_k (c_k - z) x_k = sum_k c_k x_k - z sum_k x_k,
//   with sum_k x_k per 16-byte chunk computed once per block when x is staged;
// - finds a chunk's group by a shift where the group holds a power of two of chunks.
// Each lane loads 16 bytes of weights at a time (32 int4 or 16 int8 codes, all in one group),
// GEMV_UNROLL such loads per channel before it uses the first; M, the row count rounded up to
// 1/2/4/8/16, is a template argument so that batch 1 does no work for absent rows.
constexpr int GEMV_CODES_ALIGN = 32;        // K and the group size must be multiples of this
constexpr int GEMV_UNROLL = 4;              // 16-byte weight loads in flight per lane and channel
constexpr int GEMV_WARPS = 8;               // 2 output channels each
constexpr int GEMV_SMEM_FLOATS = 12 * 1024; // x's staged tile, 48 KB: no opt-in needed

__device__ __forceinline__ __half2 u32_as_half2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// A 16-byte chunk's 32 (int4) or 16 (int8) codes (low nibble / byte first: the packing's
// order) as exact fp16 pairs c - z, two codes per instruction (the conversion Marlin and
// tinygemm use): the fp16 0x6400 is 1024, and its 10 mantissa bits each weigh exactly 1, so a
// code OR-ed into the mantissa reads as 1024 + c. One logic op puts nibbles 0 and 4 of a
// 32-bit word into the two halves of 0x64006400, and one __hsub2 of 1024 + z leaves (c0 - z,
// c4 - z) exactly. Nibbles 1 and 5 are masked in place (bits 4-7 of each half): 1024 + 16 c,
// which one __hfma2 by 1/16 minus 64 + z turns into c - z; the word shifted by 8 gives nibbles
// 2, 6 and 3, 7 the same way. int8: __byte_perm sets 0x64 above two bytes at once (1024 + b,
// exact). z is an integer below 1024, as every format here stores it: a zero point, or the
// storage offset (symmetric int4 codes are stored plus 8; signed int8 with its sign bit
// flipped reads as c + 128), or both. The pairs, per step st of 4 codes a pair each:
//   int4: b[2i + h] = (nibbles 2h, 2h + 4), (2h + 1, 2h + 5) of word i
//   int8: b[i] = (bytes 0, 1), (bytes 2, 3) of word i
// magic is 0x64006400, passed in by the host as a kernel argument: a LOP3 takes one 32-bit
// immediate, and with the mask and the constant both known at compile time ptxas emits an
// AND and an OR per pair (seen in the sm_90 code) instead of one LOP3 with the constant in a
// register. Made once per thread where z is fixed: the constants stay in registers.
constexpr uint32_t FP16_1024_PAIR = 0x64006400u;
template <int BITS>
struct HalfCodes {
  static constexpr int STEPS = BITS == 4 ? 8 : 4;
  __half2 zsub, zhi, sixteenth;
  uint32_t magic, flip;
  __device__ __forceinline__ HalfCodes(float z, uint32_t magic_, uint32_t flip_)
      : zsub(__float2half2_rn(1024.f + z)), zhi(__float2half2_rn(-64.f - z)), sixteenth(__float2half2_rn(0.0625f)),
        magic(magic_), flip(flip_) {}
  __device__ __forceinline__ static uint32_t bits_of(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }
  __device__ __forceinline__ void operator()(const uint4& q, uint32_t (&b)[STEPS][2]) const {
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (BITS == 4) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t w = words[i] >> (8 * h);
          b[2 * i + h][0] = bits_of(__hsub2(u32_as_half2((w & 0x000F000Fu) | magic), zsub));
          b[2 * i + h][1] = bits_of(__hfma2(u32_as_half2((w & 0x00F000F0u) | magic), sixteenth, zhi));
        }
      } else {
        const uint32_t w = words[i] ^ flip;
        b[i][0] = bits_of(__hsub2(u32_as_half2(__byte_perm(w, magic, 0x7150)), zsub));   // bytes 0, 1
        b[i][1] = bits_of(__hsub2(u32_as_half2(__byte_perm(w, magic, 0x7352)), zsub));   // bytes 2, 3
      }
    }
  }
};

// The chunk's codes as floats in k order, less the storage offset: HalfCodes' pairs widened
// (one FMA-pipe instruction, HADD2.F32, per pair on sm_80+). A checkpoint's zero points
// (asymmetric weights) are the caller's.
template <int BITS>
struct CodeDecoder {
  HalfCodes<BITS> pairs;
  __device__ __forceinline__ CodeDecoder(bool is_signed, uint32_t fp16_1024_pair)
      : pairs(is_signed ? (BITS == 8 ? 128.f : 8.f) : 0.f, fp16_1024_pair, BITS == 8 && is_signed ? 0x80808080u : 0u) {}
  __device__ __forceinline__ void operator()(const uint4& packed, float* c) const {
    uint32_t b[HalfCodes<BITS>::STEPS][2];
    pairs(packed, b);
#pragma unroll
    for (int st = 0; st < HalfCodes<BITS>::STEPS; ++st) {
      const float2 lo = __half22float2(u32_as_half2(b[st][0])), hi = __half22float2(u32_as_half2(b[st][1]));
      // int4: codes k, k + 4 and k + 1, k + 5 (k = 8i + 2h); int8: k, k + 1 and k + 2, k + 3.
      const int k = BITS == 4 ? 8 * (st >> 1) + 2 * (st & 1) : 4 * st;
      constexpr int PAIR = BITS == 4 ? 4 : 1, NEXT = BITS == 4 ? 1 : 2;
      c[k] = lo.x; c[k + PAIR] = lo.y;
      c[k + NEXT] = hi.x; c[k + NEXT + PAIR] = hi.y;
    }
  }
};

// A chunk's codes (CodeDecoder) -> (c - z) s as T, CODES values written as 16-byte stores
// to dst (16-byte aligned): the dequantized weights. As c s - z s: one FMA per code, z s
// once per chunk (not a subtraction and a multiply per code). z s is rounded to fp32:
// an error of at most 2^-24 z s <= 2^-16 (c - z) s for integer codes and zeros below 256,
// 32x below fp16's rounding error (2^-11) at worst; where c = z it leaves that residue, not 0.
template <typename T, int CODES>
__device__ __forceinline__ void store_dequantized(T* dst, const float* c, float z, float s) {
  constexpr int PER16 = 16 / sizeof(T);
  const float zs = z * s;
#pragma unroll
  for (int o = 0; o < CODES / PER16; ++o) {
    uint4 pack;
    T* e = reinterpret_cast<T*>(&pack);
#pragma unroll
    for (int i = 0; i < PER16; ++i) e[i] = from_f<T>(fmaf(c[o * PER16 + i], s, -zs));
    reinterpret_cast<uint4*>(dst)[o] = pack;
  }
}

// Shared memory: x's tile [rows][tile chunks][CODES + 4] fp32, each chunk followed by the
// sum of its x values (zero points) and padding: a chunk every CODES + 4 floats puts the 8
// lanes of a 16-byte load phase, which read consecutive chunks, on 8 different bank quads.
template <typename T, int BITS, int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
quant_gemv_kernel(T* __restrict__ y,              // [rows, N]
                  const T* __restrict__ x,        // [rows, K], 16-byte aligned rows
                  const uint8_t* __restrict__ qw, // int4: [N, K/2] packed; int8: [N, K]
                  const T* __restrict__ scales,   // [N, n_groups]
                  const T* __restrict__ zeros,    // [N, n_groups] or null
                  int rows, int N, int K, int n_groups,
                  int group_shift,                // chunk -> group: >> group_shift, or / chunks_per_group if < 0
                  int chunks_per_group, int tile_chunks, bool is_signed, uint32_t fp16_1024_pair) {
  constexpr int CODES = BITS == 4 ? 32 : 16;      // codes in one 16-byte load of weights
  constexpr int STRIDE = CODES + 4;               // floats per staged chunk
  constexpr int X_PER_VEC = 16 / sizeof(T);       // x values in one 16-byte load
  extern __shared__ __align__(16) float gemv_x[]; // [rows, tile_chunks, STRIDE]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * GEMV_WARPS + warp) * 2;      // this warp's channels: n0, n0 + 1
  const bool has[2] = {n0 < N, n0 + 1 < N};
  const int nvec = K / CODES;                     // 16-byte chunks in a row
  const CodeDecoder<BITS> decode(is_signed, fp16_1024_pair);
  const uint4* wrow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    wrow[h] = reinterpret_cast<const uint4*>(qw + (int64_t)min(n0 + h, N - 1) * (BITS == 4 ? K / 2 : K));
  float acc[2][M];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[h][m] = 0.f;
  // No early exit for absent channels: every warp takes part in the staging and its barriers.
  for (int t0 = 0; t0 < nvec; t0 += tile_chunks) {
    const int tc = min(tile_chunks, nvec - t0);   // chunks in this tile
    __syncthreads();                              // the previous tile is no longer read
    // Stage x[:, tile] as fp32, X_PER_VEC values per thread and step (all threads step
    // together: the chunk sums are taken by shuffles among the lanes holding one chunk).
    constexpr int VECS = CODES / X_PER_VEC;       // 16-byte loads of x per chunk: 2, 4 or 8
    const int total = rows * tc * VECS;
    for (int i0 = 0; i0 < total; i0 += blockDim.x) {
      const int i = i0 + threadIdx.x;
      const int m = i / (tc * VECS), r = i % (tc * VECS), ch = r / VECS, v = r % VECS;
      float f[X_PER_VEC], s = 0.f;
      if (i < total) {
        const uint4 raw = reinterpret_cast<const uint4*>(x + (int64_t)m * K + (int64_t)(t0 + ch) * CODES)[v];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < X_PER_VEC; ++j) { f[j] = to_f(e[j]); s += f[j]; }
        float4* dst = reinterpret_cast<float4*>(gemv_x + (m * tile_chunks + ch) * STRIDE + v * X_PER_VEC);
#pragma unroll
        for (int j = 0; j < X_PER_VEC / 4; ++j) dst[j] = make_float4(f[4 * j], f[4 * j + 1], f[4 * j + 2], f[4 * j + 3]);
      }
      if (zeros) {                                // VECS consecutive lanes hold one chunk (VECS divides 32)
#pragma unroll
        for (int o = 1; o < VECS; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (i < total && v == 0) gemv_x[(m * tile_chunks + ch) * STRIDE + CODES] = s;
      }
    }
    __syncthreads();
    for (int v0 = lane; v0 < tc; v0 += 32 * GEMV_UNROLL) {   // a warp reads 512 contiguous bytes per load
      uint4 packed[2][GEMV_UNROLL];
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u)        // all loads issued before the first is used
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int vi = v0 + u * 32;
          packed[h][u] = has[h] && vi < tc ? __ldcs(wrow[h] + t0 + vi) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u) {
        const int vi = v0 + u * 32;
        if (vi >= tc) break;
        const int chunk = t0 + vi;
        const int g = group_shift >= 0 ? chunk >> group_shift : chunk / chunks_per_group;
        float sc[2], z[2], c[2][CODES];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t gi = (int64_t)min(n0 + h, N - 1) * n_groups + g;
          sc[h] = to_f(scales[gi]);
          z[h] = zeros ? to_f(zeros[gi]) : 0.f;
          decode(packed[h][u], c[h]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m >= rows) break;
          const float* xs = gemv_x + (m * tile_chunks + vi) * STRIDE;
          float part[2] = {0.f, 0.f};
#pragma unroll
          for (int k = 0; k < CODES; k += 4) {
            const float4 xv = *reinterpret_cast<const float4*>(xs + k);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              part[h] = fmaf(c[h][k], xv.x, part[h]);
              part[h] = fmaf(c[h][k + 1], xv.y, part[h]);
              part[h] = fmaf(c[h][k + 2], xv.z, part[h]);
              part[h] = fmaf(c[h][k + 3], xv.w, part[h]);
            }
          }
          const float xsum = zeros ? xs[CODES] : 0.f;
#pragma unroll
          for (int h = 0; h < 2; ++h) acc[h][m] = fmaf(sc[h], fmaf(-z[h], xsum, part[h]), acc[h][m]);
        }
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[h][m]);
      if (lane == 0 && m < rows && has[h]) y[(int64_t)m * N + n0 + h] = from_f<T>(v);
    }
}

template <typename T, int BITS>
void launch_quant_gemv(T* y, const T* x, const uint8_t* qw, const T* sc, const T* zp, int rows, int N, int K,
                       int G, int n_groups, bool is_signed, int tile_chunks, cudaStream_t stream) {
  constexpr int CODES = BITS == 4 ? 32 : 16;
  const int per_group = G / CODES;                 // chunks per group; a power of two -> a shift
  int shift = -1;
  if (n_groups == 1) shift = 30;                   // one group: every chunk index < 2^30 maps to 0
  else if ((per_group & (per_group - 1)) == 0) for (shift = 0; (1 << shift) < per_group; ++shift) {}
  const int nvec = K / CODES;
  if (tile_chunks <= 0) tile_chunks = GEMV_SMEM_FLOATS / (rows * (CODES + 4));
  tile_chunks = std::max(1, std::min(tile_chunks, nvec));
  const size_t smem = (size_t)rows * tile_chunks * (CODES + 4) * sizeof(float);
  dim3 grid((N + 2 * GEMV_WARPS - 1) / (2 * GEMV_WARPS));
#define GEMV_CASE(MM) quant_gemv_kernel<T, BITS, MM><<<grid, GEMV_WARPS * 32, smem, stream>>>( \
      y, x, qw, sc, zp, rows, N, K, n_groups, shift, per_group, tile_chunks, is_signed, FP16_1024_PAIR)
  if (rows <= 1) GEMV_CASE(1);
  else if (rows <= 2) GEMV_CASE(2);
  else if (rows <= 4) GEMV_CASE(4);
  else if (rows <= 8) GEMV_CASE(8);
  else GEMV_CASE(16);
#undef GEMV_CASE
}

// The checks and conversions both entry points share: codes 16-byte aligned, scales and
// zeros in the activations' dtype, and whether the codes are signed.
struct QuantWeight {
  torch::Tensor qw, sc, z;
  int N, K, G, n_groups;
  bool is_signed;
};
static QuantWeight quant_weight(const char* name, const torch::Tensor& qweight, const torch::Tensor& scales,
                                const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group_size,
                                int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(bits == 4 || bits == 8, name, ": 4 or 8 bits");
  QuantWeight w;
  w.N = qweight.size(0); w.K = K; w.G = group_size > 0 ? group_size : K;
  TORCH_CHECK(K % GEMV_CODES_ALIGN == 0 && w.G % GEMV_CODES_ALIGN == 0,
              name, ": in_features and group_size must be multiples of 32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == (bits == 4 ? K / 2 : K),
              name, ": qweight shape does not match in_features ", K);
  w.n_groups = (K + w.G - 1) / w.G;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == w.N && scales.size(1) == w.n_groups,
              name, ": scales must be [out_features, ceil(in_features / group_size)]");
  TORCH_CHECK(!zeros.has_value() || zeros->sizes() == scales.sizes(), name, ": zeros must have scales' shape");
  w.sc = scales.to(dtype).contiguous();
  if (zeros.has_value()) w.z = zeros->to(dtype).contiguous();
  auto qw = qweight.contiguous();
  if (reinterpret_cast<uintptr_t>(qw.data_ptr()) % 16) qw = qw.clone();   // 16-byte loads
  w.qw = qw;
  w.is_signed = w.qw.scalar_type() == torch::kInt8 || (bits == 4 && !w.z.defined());
  return w;
}

// tile_chunks: x's shared-memory tile in 16-byte weight chunks (0: as many as fit in 48 KB;
// the self-check passes a small one to exercise several tiles).
torch::Tensor quant_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size, int64_t tile_chunks) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= 16, "quant_gemv: x must be [rows <= 16, K]");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  x = x.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) x = x.clone();   // 16-byte vector loads
  const QuantWeight w = quant_weight("quant_gemv", qweight, scales, zeros, bits, group_size, x.size(1),
                                     x.scalar_type());
  // Plain names: kemu, the CPU emulator, rewrites `name.data_ptr()` for its bounds checker
  // only where name is a plain identifier (w.qw.data_ptr() would not compile there).
  const torch::Tensor qw = w.qw, sc = w.sc, z = w.z;
  const int rows = x.size(0);
  auto y = torch::empty({rows, w.N}, x.options());
  if (rows == 0 || w.N == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  DISPATCH(x.scalar_type(), "quant_gemv", [&] {
    const scalar_t* zp = z.defined() ? z.data_ptr<scalar_t>() : nullptr;
    const uint8_t* qp = reinterpret_cast<const uint8_t*>(qw.data_ptr());
    if (bits == 4)
      launch_quant_gemv<scalar_t, 4>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), qp, sc.data_ptr<scalar_t>(),
                                     zp, rows, w.N, w.K, w.G, w.n_groups, w.is_signed, (int)tile_chunks, stream);
    else
      launch_quant_gemv<scalar_t, 8>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), qp, sc.data_ptr<scalar_t>(),
                                     zp, rows, w.N, w.K, w.G, w.n_groups, w.is_signed, (int)tile_chunks, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ---------------------------------------------------------------- W4A16 / W8A16 at 1-16 rows: codes dequantized into mma registers
// Marlin's way (Frantar et al., 2024): codes go from 16-byte loads straight into the
// registers of m16n8k16 mma.sync instructions, converted there two at a time, and x's rows
// likewise; nothing is staged in shared memory and the loop has no barrier. The operands are
// swapped (y^T = W x^T): the weights are A, 16 channels by 16 inputs, and x is B, 16 inputs by
// 8 rows, so a batch of up to 8 rows takes one mma per 16 channels and 16 inputs (9-16 rows:
// two, each code converted once for both), and no register holds padding: B's columns past
// x's rows repeat its last row, whose results are not stored. The loop's work per code is
// then nearly the same at every row count, where a CUDA-core GEMV spends an FMA per code and
// row: per pair of int4 codes a logic op and a half2 subtract or FMA (bf16: a shift too), and
// one mma per 8 codes a lane converts.
//
// The k order. mma's fragments fix which k each lane holds (at mma_16816 above), and a 16-byte load holds
// 32 (int4) or 16 (int8) consecutive k of one channel, while the cheap conversions make pairs
// of codes 4 apart (int4: nibbles p and p + 4 of a word) or adjacent (int8). A dot product
// does not depend on the order of its terms, so the lanes agree on an order of their own: the
// 4 lanes of a quad (t = 0..3) load 4 consecutive 16-byte pieces of a channel's row, and each
// mma k slot a lane holds takes the code the conversion put there; x's B registers are
// permuted the same way (two byte permutes per pair of int4 codes and row, none for int8).
// Neither the checkpoint nor x is rearranged in memory (Marlin repacks its weights instead).
//
// Scales. A holds c - z, exact small integers (the zero point, or the storage offset of
// symmetric codes, subtracted there); a loop step's 4 x CODES inputs lie in one group (the
// group size a multiple of that, 128 for int4 and 64 for int8, or one group per row, as
// Marlin requires too), so the step's mma products go to a fresh accumulator and enter the
// sum times their channel's scale in fp32: no rounding of (c - z) s to 16 bits, and no
// multiply per code.
//
// The block: 8 warps share 16 x J output channels (J tiles of 16) and split K between them,
// U loop steps at a time, and add their fp32 sums through shared memory at the end. Each
// lane has 2 x J x U = 4 loads in flight while it multiplies the previous ones. Quantized
// layers take J = 2 (U = 1): each x value a lane loads then feeds 32 channels, and the sm_90
// loop issues 0.18 (1-8 rows) or 0.21 (9-16) instructions per byte of int4 codes against one
// tile's 0.25 and 0.39, where an H200 SM has about 0.25 in the time a byte takes at copy
// bandwidth. A narrow layer then has fewer blocks than SMs want, so K is also split over
// blocks (gridDim.z): each split writes fp32 partial sums, and the last split of a tile to
// finish adds them in split order (last_of_splits, as decode attention merges its splits).
//
// Dense 16-bit weights (BITS = 16, dense_mma) take the same kernel with the conversion and
// the scales left out: a 16-byte load is 8 consecutive inputs of a channel, already A's
// pairs. At 1-16 rows it is a GEMV whose K split ends inside the block, where cuBLAS's
// decode-sized GEMMs add a split-K reduce kernel after most projections.
//
// The fold (quant_mma_add_norm). Attention's output projection and the MLP's down projection
// each feed "add + RMSNorm": the residual stream plus the projection, then the norm that is
// the next matmul's input. The launch can do both: every tile stores its outputs plus the
// residual, and the last tile of a chunk of rows to be stored (a counter after the splits',
// last_of_splits again) norms those rows, so a decode step launches two kernels a layer
// fewer. A norm needs its row's every output, which exist only once every tile is stored,
// hence one last block rather than the next matmul's prologue: there each block would read
// the whole row and sum its squares again, or, to skip that, multiply its x by the norm's
// weight inside the loop (about 20 more instructions a step on a loop at the SM's issue
// budget) and scale the sums by the row's 1 / rms at the end, with other roundings.
//
// The SiLU epilogue (quant_mma_silu_and_mul, template flag SILU). The MLP's fused gate/up
// weight is [gate; up]; a block's two tiles take the same 16 channels of each (rows F apart)
// and the block stores silu(gate) x up, so the activation needs no launch of its own and
// no [rows, 2F] product in memory. A flag of the template, not of the launch, so that the
// plain kernels carry none of its code: as a runtime switch it cost their 1-8-row int4 loop
// 11 instructions a step (sm_90) and one fp16 int8 kernel a spill.

// One 16-byte load of a channel's codes -> its A register pairs for STEPS mma k-steps ([st][0]
// for k slots 2t, 2t + 1 and [st][1] for 2t + 8, 2t + 9): c - z as exact 16-bit pairs, in
// HalfCodes' order (z: the zero point plus the storage offset).
//   fp16: HalfCodes itself.
//   bf16: 0x4300 is 128, whose 7 mantissa bits hold an int4 code exactly (each nibble shifted
//         down first: 16 c would not fit); an int8 code does not fit, so it goes through fp32's
//         2^23 the same way, and c - z (at most 255 in size: 8 significant bits) packs exactly.
template <typename W, int BITS> struct MmaCodes;
template <int BITS> struct MmaCodes<__half, BITS> : HalfCodes<BITS> {
  using HalfCodes<BITS>::HalfCodes;
};
template <int BITS> struct MmaCodes<__nv_bfloat16, BITS> {
  static constexpr int STEPS = BITS == 4 ? 8 : 4;
  __nv_bfloat162 zsub;
  float z;
  uint32_t magic, flip;
  __device__ __forceinline__ MmaCodes(float z_, uint32_t magic_, uint32_t flip_)
      : zsub(__float2bfloat162_rn(128.f + z_)), z(z_), magic(magic_), flip(flip_) {}
  __device__ __forceinline__ static uint32_t bits_of(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }
  __device__ __forceinline__ float int8_code(uint32_t w, int i) const {     // byte i of w, minus z
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 | i)) - (8388608.f + z);
  }
  __device__ __forceinline__ void operator()(const uint4& q, uint32_t (&b)[STEPS][2]) const {
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (BITS == 4) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {            // nibbles j, j + 4
          uint32_t u = ((words[i] >> (4 * j)) & 0x000F000Fu) | magic;
          b[2 * i + j / 2][j % 2] = bits_of(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&u), zsub));
        }
      } else {
        const uint32_t w = words[i] ^ flip;
        b[i][0] = bits_of(__floats2bfloat162_rn(int8_code(w, 0), int8_code(w, 1)));
        b[i][1] = bits_of(__floats2bfloat162_rn(int8_code(w, 2), int8_code(w, 3)));
      }
    }
  }
};

// Dense fp16/bf16 weights: a load's 8 values are the pairs of two k-steps, (2t, 2t + 1) and
// (2t + 8, 2t + 9) of the first taking values 0-1 and 2-3, of the second 4-5 and 6-7.
struct DenseCodes {
  static constexpr int STEPS = 2;
  __device__ __forceinline__ DenseCodes(float, uint32_t, uint32_t) {}
  __device__ __forceinline__ void operator()(const uint4& q, uint32_t (&b)[STEPS][2]) const {
    b[0][0] = q.x; b[0][1] = q.y;
    b[1][0] = q.z; b[1][1] = q.w;
  }
};
template <> struct MmaCodes<__half, 16> : DenseCodes { using DenseCodes::DenseCodes; };
template <> struct MmaCodes<__nv_bfloat16, 16> : DenseCodes { using DenseCodes::DenseCodes; };

// x's B registers for k-step st, in the order MmaCodes gives the codes: xw holds the lane's
// CODES inputs of one row as pairs (x[2i], x[2i + 1]); lo is b[0], hi b[1].
template <int BITS>
__device__ __forceinline__ void x_pairs(const uint32_t* xw, int st, uint32_t& lo, uint32_t& hi) {
  if constexpr (BITS == 4) {                  // step 2w + h: x[8w + 2h], x[8w + 2h + 4] and the next two
    const int i = 4 * (st >> 1) + (st & 1);
    lo = __byte_perm(xw[i], xw[i + 2], 0x5410);
    hi = __byte_perm(xw[i], xw[i + 2], 0x7632);
  } else {                                    // step w: x[4w], x[4w + 1] and x[4w + 2], x[4w + 3] (int8, dense)
    lo = xw[2 * st];
    hi = xw[2 * st + 1];
  }
}

// A finished output of the matmul, v (fp32), stored to y[i] as T; with a residual (the fold
// below), the sum x W^T + residual instead, rounded as the two ops round it: the product to
// T first, as the matmul alone stores it, then the sum, as fused add + RMSNorm stores it.
template <typename T>
__device__ __forceinline__ void store_out(T* __restrict__ y, const T* __restrict__ res, int64_t i, float v) {
  y[i] = res ? from_f<T>(to_f(from_f<T>(v)) + to_f(res[i])) : from_f<T>(v);
}

// The block that finished a tile's splits last (last_of_splits): y = the sum of the tile's
// fp32 partials ([splits, rows, N]), in split order, for rows row0 .. row0 + nr - 1 and the
// channels n0 .. n0 + width - 1 below N (plus the residual, with one).
template <typename T>
__device__ void add_split_sums(T* __restrict__ y, const T* __restrict__ res, const float* __restrict__ part, int rows,
                               int N, int row0, int nr, int n0, int width, int splits) {
  for (int e = threadIdx.x; e < nr * width; e += blockDim.x) {
    const int m = e / width, c = e % width;
    if (n0 + c >= N) continue;
    float v = 0.f;
    for (int z = 0; z < splits; ++z) v += __ldcg(part + ((int64_t)z * rows + row0 + m) * N + n0 + c);
    store_out(y, res, (int64_t)(row0 + m) * N + n0 + c, v);
  }
}

constexpr int QX_WARPS = 8;                   // warps per block, each on its own steps of K
constexpr uint32_t BF16_128_PAIR = 0x43004300u;
static_assert(QX_WARPS * 32 == RN_THREADS, "the fold norms its rows with the matmul's block: rms_norm's order");

// The SiLU epilogue's merge, by the block that finished a tile's splits last: y [rows, F] =
// silu(gate) x up of the tile's 16 channels n0 .. n0 + 15 below F, each side summed over the
// splits in split order ([splits, rows, 2F] partials, up F channels after gate) and rounded
// to T first, as the matmul alone stores it.
template <typename T>
__device__ void add_split_sums_silu(T* __restrict__ y, const float* __restrict__ part, int rows, int F, int row0,
                                    int nr, int n0, int splits) {
  for (int e = threadIdx.x; e < nr * 16; e += blockDim.x) {
    const int m = e / 16, c = e % 16;
    if (n0 + c >= F) continue;
    float v[2] = {0.f, 0.f};
    for (int j = 0; j < 2; ++j)
      for (int z = 0; z < splits; ++z) v[j] += __ldcg(part + ((int64_t)z * rows + row0 + m) * 2 * F + n0 + c + j * F);
    y[(int64_t)(row0 + m) * F + n0 + c] = silu_mul(from_f<T>(v[0]), from_f<T>(v[1]));
  }
}

// The fold's last step, by the block that finished the last channel tile of its rows
// (last_of_splits over the tiles): out = RMSNorm of rows row0 .. row0 + nr - 1 of y (the
// matmul's output plus the residual, as every tile stored it), a row after another, each
// by rms_norm_row (so with rms_norm's sums in rms_norm's order). A call, not inlined: the
// matmul's loop keeps its registers, and the norm's (a thread's 4 chunks of the row and of
// the weight, 8 16-byte values) are needed only after it.
template <typename T>
__device__ __attribute__((noinline)) void norm_rows(T* __restrict__ out, const T* __restrict__ y,
                                                    const T* __restrict__ w, int N, int row0, int nr, float eps) {
  __shared__ float sh[32];
  for (int m = row0; m < row0 + nr; ++m)
    rms_norm_row(out + (int64_t)m * N, static_cast<T*>(nullptr), y + (int64_t)m * N, static_cast<const T*>(nullptr),
                 w, N, eps, sh);
}

template <typename T, int BITS, int J, int U, bool R16, bool PORTABLE, bool SILU = false>
__global__ void __launch_bounds__(QX_WARPS * 32)
quant_mma_kernel(T* __restrict__ y,                // [rows, N]
                 float* __restrict__ part,         // [splits, rows, N] fp32 partial sums, with several splits
                 int* __restrict__ counters,       // [tiles x row chunks] splits done; the fold: then
                                                   // [row chunks] tiles stored
                 const T* __restrict__ x,          // [rows, K], 16-byte aligned rows
                 const uint8_t* __restrict__ qw,   // int4: [N, K/2] packed; int8: [N, K]; dense: [N, K] of T
                 const T* __restrict__ scales,     // [N, n_groups]; dense: null
                 const T* __restrict__ zeros,      // [N, n_groups] or null
                 int rows, int N, int K, int G, int n_groups,
                 int group_shift,                  // input -> group: >> group_shift, or / G if < 0
                 int supers_per_split, bool is_signed, uint32_t magic,
                 const T* __restrict__ res,        // [rows, N] residual, or null: y = x W^T + res
                 T* __restrict__ normed,           // [rows, N] or null: RMSNorm(y) by the weight norm_w
                 const T* __restrict__ norm_w, float eps,
                 int silu_F) {                     // SILU: the epilogue's F, N = 2 F (gate, then up)
  static_assert(!SILU || (J == 2 && BITS != 16), "the SiLU epilogue holds gate and up in a warp's two tiles");
  using W = typename mma_type<T>::type;
  using Codes = MmaCodes<W, BITS>;
  constexpr int CODES = 128 / BITS;               // codes in a lane's 16-byte load: 32, 16 (dense: 8)
  constexpr int STEPS = Codes::STEPS;             // mma k-steps per load (4 k slots a lane each)
  constexpr int SPAN = 4 * CODES;                 // inputs per loop step: a quad's 4 loads side by side
  constexpr int XV = CODES * sizeof(T) / 16;      // 16-byte loads of x per row and loop step
  constexpr int XH = R16 ? 2 : 1;                 // mma per tile and k-step: x's rows 0-7 (and 8-15)
  __shared__ float red[QX_WARPS][J][XH][4][32];   // each warp's sums, added over warps at the end
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // Tile j: channels n0 + 16 j .. + 15; with the SiLU epilogue (J = 2) gate's n0 .. n0 + 15
  // and up's, silu_F channels on, so that a block holds both sides of its 16 outputs.
  const int n0 = blockIdx.y * 16 * (SILU ? 1 : J);
  // Past 16 rows, blockIdx.x takes rows 16 x .. 16 x + 15 (row0 on, nr of them), each chunk
  // reading the codes again; x varies fastest, so a channel tile's chunks run side by side
  // and the later ones find its codes in L2.
  const int row0 = 16 * blockIdx.x, nr = min(16, rows - row0);
  const float off = is_signed ? (BITS == 4 ? 8.f : 128.f) : 0.f;
  const uint32_t flip = BITS == 8 && is_signed ? 0x80808080u : 0u;
  // This lane's channels: g and g + 8 of each tile (A's rows: codes, zero points, scales);
  // past N, the last channel (its results are not stored).
  const uint8_t* wrow[J][2];
  const T* zrow[J][2];
  const T* srow[J][2];
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = SILU ? min(n0 + g + 8 * h, silu_F - 1) + j * silu_F : min(n0 + 16 * j + g + 8 * h, N - 1);
      wrow[j][h] = qw + (int64_t)n * K * BITS / 8;
      zrow[j][h] = zeros ? zeros + (int64_t)n * n_groups : nullptr;
      srow[j][h] = scales ? scales + (int64_t)n * n_groups : nullptr;
    }
  // x's rows g (and g + 8): B's column g; past x's rows, its last row (B's column m gives D's
  // column m alone, and D's columns past x's rows are not stored).
  const T* xrow[XH];
#pragma unroll
  for (int r = 0; r < XH; ++r) xrow[r] = x + (int64_t)(row0 + min(g + 8 * r, nr - 1)) * K + t * CODES;
  float acc[J][XH][4];
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int r = 0; r < XH; ++r)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][r][i] = 0.f;
  const int steps = (K + SPAN - 1) / SPAN, supers = (steps + U - 1) / U;
  // This block's share of K: loop steps first * U .. last * U - 1 (blockIdx.z's split).
  const int first = blockIdx.z * supers_per_split, last = min(supers, first + supers_per_split);
  // The codes of loop steps sup * U .. + U - 1. A lane whose inputs lie past K (the last step
  // of a K that is not a multiple of SPAN, or a step past the last) reads the row's last
  // CODES codes instead: finite, and multiplied by x's zeros there.
  auto load = [&](int sup, uint4 (&w)[U][J][2]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = min((sup * U + u) * SPAN + t * CODES, K - CODES);     // this lane's first input
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          w[u][j][h] = __ldcs(reinterpret_cast<const uint4*>(wrow[j][h] + k * BITS / 8));
    }
  };
  uint4 cur[U][J][2], nxt[U][J][2];
  if (first + warp < last) load(first + warp, cur);
  for (int sup = first + warp; sup < last; sup += QX_WARPS) {
    if (sup + QX_WARPS < last) load(sup + QX_WARPS, nxt);       // in flight during this step's math
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k0 = (sup * U + u) * SPAN;      // the step's first input
      if (k0 >= K) break;                       // the same for every lane of the warp
      // x's rows at this lane's inputs (zero past K) -> the B registers of each k-step.
      uint32_t b[XH][STEPS][2];
#pragma unroll
      for (int r = 0; r < XH; ++r) {
        uint32_t xw[CODES / 2];
#pragma unroll
        for (int v = 0; v < XV; ++v) {
          const uint4 q = k0 + t * CODES < K ? __ldg(reinterpret_cast<const uint4*>(xrow[r] + k0) + v)
                                             : make_uint4(0u, 0u, 0u, 0u);
          xw[4 * v] = q.x; xw[4 * v + 1] = q.y; xw[4 * v + 2] = q.z; xw[4 * v + 3] = q.w;
        }
#pragma unroll
        for (int st = 0; st < STEPS; ++st) x_pairs<BITS>(xw, st, b[r][st][0], b[r][st][1]);
      }
      const int grp = group_shift >= 0 ? k0 >> group_shift : k0 / G;    // the step's group
#pragma unroll
      for (int j = 0; j < J; ++j) {
        // A: channels g and g + 8 of the tile, c - z; the step's products, then times the scales.
        uint32_t c[2][STEPS][2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const Codes decode((zrow[j][h] ? to_f(zrow[j][h][grp]) : 0.f) + off, magic, flip);
          decode(cur[u][j][h], c[h]);
        }
        if constexpr (BITS == 16) {             // dense: the weights themselves, no scale
#pragma unroll
          for (int r = 0; r < XH; ++r)
#pragma unroll
            for (int st = 0; st < STEPS; ++st) {
              const uint32_t a[4] = {c[0][st][0], c[1][st][0], c[0][st][1], c[1][st][1]};
              mma_16816<W, PORTABLE>(acc[j][r], a, b[r][st]);
            }
          continue;
        }
        const float s[2] = {to_f(srow[j][0][grp]), to_f(srow[j][1][grp])};
#pragma unroll
        for (int r = 0; r < XH; ++r) {
          float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int st = 0; st < STEPS; ++st) {
            const uint32_t a[4] = {c[0][st][0], c[1][st][0], c[0][st][1], c[1][st][1]};
            mma_16816<W, PORTABLE>(d, a, b[r][st]);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][r][i] = fmaf(s[i >> 1], d[i], acc[j][r][i]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) cur[u][j][h] = nxt[u][j][h];
  }
  // The sum over warps: lane 4g + t's acc[j][r] holds channels n0 + 16 j + g (i = 0, 1) and
  // + 8 (i = 2, 3) of x's rows 8 r + 2t (i even) and 8 r + 2t + 1 (i odd).
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int r = 0; r < XH; ++r)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][j][r][i][lane] = acc[j][r][i];
  __syncthreads();
  const int splits = gridDim.z;
  auto warp_sum_of = [&](int m, int j, int c) {   // output (row m, tile j, channel c): the warps' sum
    const int src = 4 * (c & 7) + (m & 7) / 2, i = 2 * (c >> 3) + (m & 1);
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < QX_WARPS; ++w) v += red[w][j][m >> 3][i][src];
    return v;
  };
  if constexpr (SILU) {                           // y [rows, silu_F] = silu(gate) x up
    for (int e = threadIdx.x; e < nr * 16; e += blockDim.x) {
      const int m = e / 16, c = e % 16;
      const float gate = warp_sum_of(m, 0, c), up = warp_sum_of(m, J - 1, c);
      if (n0 + c >= silu_F) continue;
      if (splits == 1) {
        y[(int64_t)(row0 + m) * silu_F + n0 + c] = silu_mul(from_f<T>(gate), from_f<T>(up));
      } else {
        float* p = part + ((int64_t)blockIdx.z * rows + row0 + m) * N + n0 + c;
        p[0] = gate;
        p[silu_F] = up;
      }
    }
  } else {
    for (int e = threadIdx.x; e < nr * 16 * J; e += blockDim.x) {
      const int m = e / (16 * J), nl = e % (16 * J);
      const float v = warp_sum_of(m, nl / 16, nl % 16);
      if (n0 + nl >= N) continue;
      if (splits == 1) store_out(y, res, (int64_t)(row0 + m) * N + n0 + nl, v);
      else part[((int64_t)blockIdx.z * rows + row0 + m) * N + n0 + nl] = v;
    }
  }
  // With K split over blocks, the last split of this tile adds the partial sums, in split order.
  bool stored = splits == 1;                      // this block stored its tile's outputs (block-uniform)
  if (splits > 1 && last_of_splits(counters + (int64_t)blockIdx.y * gridDim.x + blockIdx.x, splits)) {
    if constexpr (SILU) add_split_sums_silu(y, part, rows, silu_F, row0, nr, n0, splits);
    else add_split_sums(y, res, part, rows, N, row0, nr, n0, 16 * J, splits);
    stored = true;
  }
  // The fold: the last tile of these rows to be stored norms them (its counter follows the tiles').
  if (normed && stored && last_of_splits(counters + (int64_t)gridDim.x * gridDim.y + blockIdx.x, gridDim.y))
    norm_rows(normed, y, norm_w, N, row0, nr, eps);
}

// The launch for both entries below; norm: the fold's residual [rows, N] (contiguous) and
// norm weight [N] (x's dtype, 16-byte aligned: rms_norm_row loads it in chunks), and its
// output normed [rows, N].
struct AddNorm { torch::Tensor residual, weight, normed; double eps; };

// The fold's arguments checked, and its output made: residual [rows, N] of x's dtype, the
// norm's weight [N] (cast to x's dtype), N a multiple of 8 and at most 8 x RN_THREADS x
// RN_CHUNKS (one rms_norm_row of 256 threads).
static AddNorm add_norm_args(const torch::Tensor& x, int64_t N, const torch::Tensor& residual,
                             const torch::Tensor& norm_weight, double eps, const char* name) {
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == torch::IntArrayRef({x.size(0), N}) &&
              residual.scalar_type() == x.scalar_type() && residual.device() == x.device(),
              name, ": residual must be [rows, N] of x's dtype, on its device");
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == N && norm_weight.device() == x.device(),
              name, ": norm_weight must be [N] on x's device");
  TORCH_CHECK(N % 8 == 0 && N / 8 <= RN_THREADS * RN_CHUNKS,
              name, ": N must be a multiple of 8, at most ", 8 * RN_THREADS * RN_CHUNKS);
  torch::Tensor nw = norm_weight.to(x.scalar_type()).contiguous();
  if (reinterpret_cast<uintptr_t>(nw.data_ptr()) % 16) nw = nw.clone();    // 16-byte loads
  return AddNorm{residual.contiguous(), nw, torch::empty({x.size(0), N}, x.options()), eps};
}

static torch::Tensor launch_quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                      c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size,
                                      int64_t tiles, int64_t splits, c10::optional<torch::Tensor> counters,
                                      bool portable, AddNorm* norm, bool silu = false) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= INT32_MAX, "quant_mma: x must be [rows, K]");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "quant_mma: fp16 or bf16 x");
  TORCH_CHECK(tiles == 1 || tiles == 2, "quant_mma: tiles must be 1 or 2");
  TORCH_CHECK(!portable || tiles == 1, "quant_mma: the portable mma runs with one tile per warp");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  x = x.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) x = x.clone();   // 16-byte loads
  const QuantWeight w = quant_weight("quant_mma", qweight, scales, zeros, bits, group_size, x.size(1),
                                     x.scalar_type());
  TORCH_CHECK(w.n_groups == 1 || w.G % (bits == 4 ? 128 : 64) == 0,
              "quant_mma: group_size must be a multiple of 128 (int4) or 64 (int8), or cover the row");
  const torch::Tensor qw = w.qw, sc = w.sc, z = w.z;   // plain names (kemu's bounds checker)
  const int rows = x.size(0);
  TORCH_CHECK(!silu || (w.N % 2 == 0 && tiles == 2 && !portable && !norm),
              "quant_mma: the SiLU epilogue needs [gate; up] weights (an even N), two tiles a warp");
  const int silu_F = silu ? w.N / 2 : 0;
  auto y = torch::empty({rows, silu ? silu_F : w.N}, x.options());
  if (rows == 0 || w.N == 0) return y;
  if (w.K == 0 && !norm && !silu) return y.zero_();
  int shift = -1;                                      // a power-of-two group: a shift, not a division
  if (w.n_groups == 1) shift = 30;                     // every input index < 2^30 maps to group 0
  else if ((w.G & (w.G - 1)) == 0) for (shift = 0; (1 << shift) < w.G; ++shift) {}
  const int64_t span = bits == 4 ? 128 : 64, u = tiles == 2 ? 1 : 2;   // a loop step's inputs; steps a pass
  const int64_t supers = std::max<int64_t>(1, ((w.K + span - 1) / span + u - 1) / u);
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, supers));
  const int per = (int)((supers + splits - 1) / splits);
  splits = (supers + per - 1) / per;                   // every split has steps
  // x: chunks of 16 rows; y: tiles of 16 x tiles channels (SiLU: 16 gate and 16 up channels)
  dim3 grid((rows + 15) / 16, silu ? (silu_F + 15) / 16 : (w.N + 16 * tiles - 1) / (16 * tiles), (unsigned)splits);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "quant_mma: at most 65535 tiles of 16 x tiles channels and splits");
  torch::Tensor part, count;
  if (splits > 1) part = torch::empty({splits, rows, w.N}, x.options().dtype(torch::kFloat));
  if (splits > 1 || norm)     // the tiles' counters, then (the fold) one per chunk of rows
    count = split_counters(counters, (int64_t)grid.x * grid.y + (norm ? grid.x : 0), true, x, "quant_mma");
  float* pp = splits > 1 ? part.data_ptr<float>() : nullptr;
  int* cp = count.defined() ? count.data_ptr<int>() : nullptr;
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  const torch::Tensor res = norm ? norm->residual : torch::Tensor(), nw = norm ? norm->weight : torch::Tensor(),
                      normed = norm ? norm->normed : torch::Tensor();
  auto launch = [&](auto* x_ptr, auto* sc_ptr) {       // x's 16-bit type, from the pointers
    using T = std::remove_pointer_t<decltype(x_ptr)>;
    const T* zp = z.defined() ? z.data_ptr<T>() : nullptr;
    const T* rp = norm ? res.data_ptr<T>() : nullptr;
    T* np = norm ? normed.data_ptr<T>() : nullptr;
    const T* wp = norm ? nw.data_ptr<T>() : nullptr;
    const uint32_t magic = std::is_same<T, c10::Half>::value ? FP16_1024_PAIR : BF16_128_PAIR;
    auto pick = [&](auto bits_c, auto r16_c) {
      constexpr int B = decltype(bits_c)::value;
      constexpr bool R16 = decltype(r16_c)::value;
      if (portable) return quant_mma_kernel<T, B, 1, 2, R16, true>;
      if (tiles == 1) return quant_mma_kernel<T, B, 1, 2, R16, false>;
      if (silu) return quant_mma_kernel<T, B, 2, 1, R16, false, true>;
      return quant_mma_kernel<T, B, 2, 1, R16, false>;
    };
    using I4 = std::integral_constant<int, 4>;
    using I8 = std::integral_constant<int, 8>;
    using R16 = std::true_type;
    using R8 = std::false_type;
    auto kernel = bits == 4 ? (rows > 8 ? pick(I4(), R16()) : pick(I4(), R8()))
                            : (rows > 8 ? pick(I8(), R16()) : pick(I8(), R8()));
    kernel<<<grid, QX_WARPS * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<T>(), pp, cp, x_ptr, qp, sc_ptr, zp, rows, w.N, w.K, w.G, w.n_groups, shift, per, w.is_signed,
        magic, rp, np, wp, (float)(norm ? norm->eps : 0.0), silu_F);
  };
  if (x.scalar_type() == at::kHalf) launch(x.data_ptr<c10::Half>(), sc.data_ptr<c10::Half>());
  else launch(x.data_ptr<c10::BFloat16>(), sc.data_ptr<c10::BFloat16>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// fp16 / bf16 x of any number of rows (past 16, in chunks of 16 that each read the codes;
// the dispatch sends it 1-16); the group size a multiple of 128 (int4) or 64 (int8), or one
// group per row. tiles: J, 16-channel tiles per warp (1 or 2). splits: of K's loop steps over
// blocks (clamped so that each split has some), whose fp32 partial sums the last split of
// each tile adds; counters: for those splits (split_counters). portable: the mma's twin
// instead of the instruction, one tile per warp (the self-check compares the two on a GPU).
torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                        c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size, int64_t tiles,
                        int64_t splits, c10::optional<torch::Tensor> counters, bool portable) {
  return launch_quant_mma(x, qweight, scales, zeros, bits, group_size, tiles, splits, counters, portable, nullptr);
}

// The fold: {RMSNorm(x W^T + residual) by norm_weight, x W^T + residual}, both [rows, N], in one
// launch of quant_mma (two tiles a warp) whose tiles store the sum with the residual and
// whose last tile of a row chunk to finish norms the chunk's rows; what rms_norm(x W^T,
// norm_weight, residual, eps) computes, bit for bit (where that takes its vector kernel:
// the weight and the residual 16-byte aligned, as the model's always are). N: as
// add_norm_args takes it. counters: as for quant_mma, with one more per chunk of 16 rows
// (zeros made here if none).
std::vector<torch::Tensor> quant_mma_add_norm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                              c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size,
                                              int64_t splits, c10::optional<torch::Tensor> counters,
                                              torch::Tensor residual, torch::Tensor norm_weight, double eps) {
  TORCH_CHECK(qweight.dim() == 2, "quant_mma_add_norm: qweight must be [N, packed K]");
  AddNorm norm = add_norm_args(x, qweight.size(0), residual, norm_weight, eps, "quant_mma_add_norm");
  torch::Tensor y = launch_quant_mma(x, qweight, scales, zeros, bits, group_size, 2, splits, counters, false, &norm);
  return {norm.normed, y};
}

// The MLP's activation in its gate/up matmul's launch: silu(x G^T) x (x U^T), [rows, F], for
// the fused weight [G; U] (2F rows, gate's first: FusedQuantLinear's layout). Each block
// holds 16 gate and the same 16 up channels (its two tiles) and stores silu(gate) x up
// itself: what quant_mma then silu_and_mul computes, bit for bit, with one launch fewer
// and no [rows, 2F] product in memory. splits, counters: as for quant_mma.
torch::Tensor quant_mma_silu_and_mul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                     c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size,
                                     int64_t splits, c10::optional<torch::Tensor> counters) {
  return launch_quant_mma(x, qweight, scales, zeros, bits, group_size, 2, splits, counters, false, nullptr, true);
}

// y = x W^T for fp16/bf16 x [rows, K] and a dense W [N, K] of x's dtype: the kernel above
// with the weights as they are, K in one split; norm, counters: the fold, as for quant_mma.
static torch::Tensor launch_dense_mma(torch::Tensor x, torch::Tensor weight, int64_t tiles, bool portable,
                                      c10::optional<torch::Tensor> counters, AddNorm* norm) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= INT32_MAX, "dense_mma: x must be [rows, K]");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "dense_mma: fp16 or bf16 x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "dense_mma: weight must be [N, K] of x's dtype");
  TORCH_CHECK(x.size(1) % 8 == 0, "dense_mma: K must be a multiple of 8 (16-byte loads)");
  TORCH_CHECK(weight.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX, "dense_mma: N and K must fit in 32 bits");
  TORCH_CHECK(tiles == 1 || tiles == 2, "dense_mma: tiles must be 1 or 2");
  TORCH_CHECK(!portable || tiles == 1, "dense_mma: the portable mma runs with one tile per warp");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  x = x.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) x = x.clone();   // 16-byte loads
  torch::Tensor w = weight.contiguous();
  if (reinterpret_cast<uintptr_t>(w.data_ptr()) % 16) w = w.clone();
  const int rows = x.size(0), N = w.size(0), K = w.size(1);
  auto y = torch::empty({rows, N}, x.options());
  if (rows == 0 || N == 0) return y;
  if (K == 0 && !norm) return y.zero_();
  dim3 grid((rows + 15) / 16, (N + 16 * tiles - 1) / (16 * tiles));     // x: chunks of 16 rows
  TORCH_CHECK(grid.y <= 65535, "dense_mma: at most 65535 tiles of 16 x tiles channels");
  torch::Tensor count;                                 // the fold's: one a chunk of rows, after the tiles'
  if (norm) count = split_counters(counters, (int64_t)grid.x * grid.y + grid.x, true, x, "dense_mma");
  int* cp = norm ? count.data_ptr<int>() : nullptr;
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const torch::Tensor res = norm ? norm->residual : torch::Tensor(), nw = norm ? norm->weight : torch::Tensor(),
                      normed = norm ? norm->normed : torch::Tensor();
  auto launch = [&](auto* x_ptr) {                     // x's 16-bit type, from the pointer
    using T = std::remove_pointer_t<decltype(x_ptr)>;
    auto pick = [&](auto r16_c) {
      constexpr bool R16 = decltype(r16_c)::value;
      if (portable) return quant_mma_kernel<T, 16, 1, 2, R16, true>;
      if (tiles == 1) return quant_mma_kernel<T, 16, 1, 2, R16, false>;
      return quant_mma_kernel<T, 16, 2, 1, R16, false>;
    };
    auto kernel = rows > 8 ? pick(std::true_type()) : pick(std::false_type());
    const T* none = nullptr;
    const T* rp = norm ? res.data_ptr<T>() : nullptr;
    T* np = norm ? normed.data_ptr<T>() : nullptr;
    const T* nwp = norm ? nw.data_ptr<T>() : nullptr;
    kernel<<<grid, QX_WARPS * 32, 0, at::cuda::getCurrentCUDAStream()>>>(          // K in one split
        y.data_ptr<T>(), nullptr, cp, x_ptr, wp, none, none, rows, N, K, K, 1, 30, INT32_MAX, false, 0u,
        rp, np, nwp, (float)(norm ? norm->eps : 0.0), 0);
  };
  if (x.scalar_type() == at::kHalf) launch(x.data_ptr<c10::Half>());
  else launch(x.data_ptr<c10::BFloat16>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

torch::Tensor dense_mma(torch::Tensor x, torch::Tensor weight, int64_t tiles, bool portable) {
  return launch_dense_mma(x, weight, tiles, portable, c10::nullopt, nullptr);
}

// The fold on dense weights: {RMSNorm(x W^T + residual), x W^T + residual}, as
// quant_mma_add_norm on quantized ones (the same conditions, the two launches' bits).
std::vector<torch::Tensor> dense_mma_add_norm(torch::Tensor x, torch::Tensor weight, int64_t tiles,
                                              c10::optional<torch::Tensor> counters, torch::Tensor residual,
                                              torch::Tensor norm_weight, double eps) {
  TORCH_CHECK(weight.dim() == 2, "dense_mma_add_norm: weight must be [N, K]");
  AddNorm norm = add_norm_args(x, weight.size(0), residual, norm_weight, eps, "dense_mma_add_norm");
  torch::Tensor y = launch_dense_mma(x, weight, tiles, false, counters, &norm);
  return {norm.normed, y};
}

// ---------------------------------------------------------------- W4A16 / W8A16 on tensor cores, 17-255 rows
// Past 16 rows the mma kernel above would run once per 16 rows, decoding every code again
// each time. This is its tiled version, in Marlin's structure: a block of 8 warps owns
// QG_N = 128 channels (one 16-channel tile a warp: A's rows, as above) and 16 x MT rows
// (MT = 2 or 4: B's columns), and per loop step a warp decodes its codes once into A
// registers, then multiplies them by each of x's 2 x MT tiles of 8 rows. The decode, a
// fixed cost per code, is shared by up to 64 rows instead of 16. Both operands reach the
// warps through shared memory, QG_STAGES loop steps ahead by cp.async (bytes in flight for
// the memory latency, without registers to hold them):
//   x:     the block's rows x SPAN inputs, read by all 8 warps: x leaves L2 once per 128
//          channels, where the mma kernel reads it once per 16 or 32;
//   codes: the block's 128 channels x SPAN inputs (64 bytes each), every lane then reading
//          the 16 bytes it would have loaded in the mma kernel (int4 in an order of its own,
//          PairCodes below): no repacking of the checkpoint, and no dequantized tile in
//          shared memory (each code goes from its 16-byte load to registers to the tensor
//          cores).
// Each lane reads its x pieces from shared memory with 16-byte loads, 8 lanes at a time; a
// row's pieces are stored in the order the lanes read them, and odd rows with the halves
// of each 128 bytes swapped, so those 8 lanes (rows g and g + 1, 4 lanes each) touch 8
// different 16-byte bank groups.
// K is split over gridDim.z blocks, so that a narrow layer still gives every SM work: each
// split writes fp32 partial sums, and the last of a tile's splits to finish (counted as in
// decode attention's merge) adds them in split order, so the sum is the same whichever
// block comes last. In sm_90 code a warp's loop step (bf16, int4) is 401 instructions with
// 64 mma at 64 rows, 317 with 32 at 32 rows, so a block issues 3,208 or 2,536 per 8 KB of
// codes, where an H200 SM has ~2,000 issue slots in the time 8 KB take at copy bandwidth
// (4.2 TB/s over 132 SMs at 1.98 GHz: 16 bytes a clock). Issue, not memory, sets the pace:
// 1.24x those slots at 17-32 rows, 1.57x at 33-64 (a bf16 GEMM of up to 64 rows reads 4x
// the bytes at about copy bandwidth).
// The tiled kernel's int4 codes, fp16 and bf16 alike: the two nibbles of a byte (adjacent
// inputs) become one pair, so that x's B registers are x's pairs as they lie in memory. A
// warp here builds 4-8 B tiles per loop step for each A tile, and the mma kernel's order
// (nibbles 4 apart, one logic op a pair) would cost two byte permutes per pair of x per
// 8 rows: 128 instructions a step at 64 rows. Instead one __byte_perm per pair of codes puts
// byte k of the word and byte k of the word shifted down by 4 (nibbles 2k and 2k + 1, each
// now in a low nibble) into the two halves, one logic op keeps those nibbles and sets
// magic's exponent (1024 in fp16, 128 in bf16: 10 or 7 mantissa bits hold a nibble exactly),
// and one subtract of magic + z leaves c - z exactly. A word costs a shift and 3
// instructions a pair, against about 2.75 in the mma kernel's order. STEPS k-steps a load:
//   b[2i + h] = bytes 2h and 2h + 1 of word i: inputs 8i + 4h .. 8i + 4h + 3 in order.
template <typename W> struct PairCodes {
  static constexpr int STEPS = 8;
  using W2 = std::conditional_t<std::is_same<W, __half>::value, __half2, __nv_bfloat162>;
  W2 zsub;
  uint32_t magic;
  __device__ __forceinline__ static W2 pair_of(float v) {
    if constexpr (std::is_same<W, __half>::value) return __float2half2_rn(v);
    else return __float2bfloat162_rn(v);
  }
  __device__ __forceinline__ PairCodes(float z, uint32_t magic_, uint32_t)
      : zsub(pair_of((std::is_same<W, __half>::value ? 1024.f : 128.f) + z)), magic(magic_) {}
  __device__ __forceinline__ void operator()(const uint4& q, uint32_t (&b)[STEPS][2]) const {
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t high = words[i] >> 4;
#pragma unroll
      for (int k = 0; k < 4; ++k) {             // byte k -> halves (nibble 2k, nibble 2k + 1)
        uint32_t u = (__byte_perm(words[i], high, 0x4400 + 0x1111 * k) & 0x000F000Fu) | magic;
        const W2 v = __hsub2(*reinterpret_cast<W2*>(&u), zsub);
        b[2 * i + k / 2][k % 2] = *reinterpret_cast<const uint32_t*>(&v);
      }
    }
  }
};

// A 64-row block holds 32 accumulators a lane and 32 registers of decoded codes, and runs
// one to an SM (174 registers in sm_90 code; its stages take 96 KB for int4); a 32-row
// block runs two (at most 128 registers; 2 x 64 KB), except with the mma's portable twin
// (the self-check's; its shuffled operands need more).
constexpr int QG_WARPS = 8, QG_N = 16 * QG_WARPS;      // channels per block: a tile of 16 a warp
constexpr int QG_STAGES = 4;                           // loop steps of both operands in shared memory
constexpr int QG_CODE_BYTES = 64;                      // a channel's codes per loop step (4 x 16 bytes)

template <typename T, int BITS, int MT> __host__ __device__ constexpr int quant_gemm_smem() {
  return QG_STAGES * (16 * MT * 4 * (128 / BITS) * (int)sizeof(T) + QG_N * QG_CODE_BYTES);
}

template <typename T, int BITS, int MT, bool PORTABLE>
__global__ void __launch_bounds__(QG_WARPS * 32, MT == 2 && !PORTABLE ? 2 : 1)   // blocks per SM: see above
quant_gemm_kernel(T* __restrict__ y,                 // [rows, N]
                  float* __restrict__ part,          // [splits, rows, N] fp32 partial sums, with several splits
                  int* __restrict__ counters,        // [row tiles x channel tiles] splits done, with several
                  const T* __restrict__ x,           // [rows, K], 16-byte aligned rows
                  const uint8_t* __restrict__ qw,    // int4: [N, K/2] packed; int8: [N, K]
                  const T* __restrict__ scales,      // [N, n_groups]
                  const T* __restrict__ zeros,       // [N, n_groups] or null
                  int rows, int N, int K, int G, int n_groups,
                  int group_shift,                   // input -> group: >> group_shift, or / G if < 0
                  int steps_per_split, bool is_signed, uint32_t magic) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800     // mma.sync on 16-bit types and cp.async: sm_80+ (the host checks)
  using W = typename mma_type<T>::type;
  using Codes = std::conditional_t<BITS == 4, PairCodes<W>, MmaCodes<W, BITS>>;   // both: x's pairs as they lie
  constexpr int CODES = 128 / BITS, STEPS = Codes::STEPS, SPAN = 4 * CODES;   // as in the mma kernel
  constexpr int BM = 16 * MT;                          // rows per block
  constexpr int PER16 = 16 / sizeof(T);                // x values per 16-byte piece
  constexpr int XP = SPAN / PER16;                     // pieces of a row per step: 16 (int4), 8 (int8)
  constexpr int XV = CODES / PER16;                    // of which a lane reads XV: 4, 2
  constexpr int X_BYTES = BM * SPAN * (int)sizeof(T), STAGE = X_BYTES + QG_N * QG_CODE_BYTES;
  constexpr int THREADS = QG_WARPS * 32;
  static_assert(STAGE * QG_STAGES == quant_gemm_smem<T, BITS, MT>(), "the host sizes shared memory the same way");
  static_assert(BM * (QG_N + 4) * 4 <= STAGE * QG_STAGES, "the fp32 output tile reuses the stages' shared memory");
  static_assert(BM * XP % THREADS == 0 && THREADS % (2 * XP) == 0 && THREADS % 4 == 0, "whole rounds of copies");
  extern __shared__ __align__(128) uint8_t qg_smem[];  // QG_STAGES x [x: BM x XP pieces | codes: QG_N x 64 bytes]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * QG_N, m0 = blockIdx.y * BM;
  const int steps = (K + SPAN - 1) / SPAN;
  const int first = blockIdx.z * steps_per_split, last = min(steps, first + steps_per_split);
  const float off = is_signed ? (BITS == 4 ? 8.f : 128.f) : 0.f;
  const uint32_t flip = BITS == 8 && is_signed ? 0x80808080u : 0u;
  // Piece p of a row (inputs PER16 p ..) is read by lane t = p / XV as its piece v = p % XV;
  // stored at 4 v + t, each 128 bytes' halves swapped in odd rows (see above).
  auto x_slot = [](int m, int t_, int v) { return (4 * v + t_) ^ (4 * (m & 1)); };
  // Step st's operands into stage s: x's pieces (zero past x's rows or K) and the codes of
  // each channel (past N, the last channel's, not stored; past K, the row's last CODES codes,
  // which meet x's zeros). A thread copies the same piece of XR rows, XS apart, and the same
  // piece of CR channels, 64 apart: the pointers' loop-invariant parts are set once here.
  constexpr int XR = BM * XP / THREADS, XS = THREADS / XP, CR = QG_N * 4 / THREADS;
  const int xp = tid % XP, xm = tid / XP;              // x: piece xp of rows xm + XS i
  const int x_dst = xm * XP + x_slot(xm, xp / XV, xp % XV);   // (XS is even: the same slot in each row)
  const T* x_src = x + (int64_t)(m0 + xm) * K + xp * PER16;
  const int cp = tid % 4, cc = tid / 4;                // codes: piece cp of channels cc + 64 i
  int c_row[CR];                                       // byte offsets (the host checks they fit)
#pragma unroll
  for (int i = 0; i < CR; ++i) c_row[i] = min(n0 + cc + 64 * i, N - 1) * (K * BITS / 8);
  auto issue = [&](int st, int s) {
    uint8_t* stage = qg_smem + s * STAGE;
    const int k0 = st * SPAN, xk = k0 + xp * PER16, ck = min(k0 + cp * CODES, K - CODES);
#pragma unroll
    for (int i = 0; i < XR; ++i) {
      uint4* dst = reinterpret_cast<uint4*>(stage) + x_dst + i * XS * XP;
      if (m0 + xm + i * XS < rows && xk < K) __pipeline_memcpy_async(dst, x_src + (int64_t)i * XS * K + k0, 16);
      else *dst = make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < CR; ++i)
      __pipeline_memcpy_async(stage + X_BYTES + (cc + 64 * i) * QG_CODE_BYTES + cp * 16, qw + c_row[i] + ck * BITS / 8, 16);
  };
  // This lane's channels (A's rows g and g + 8 of the warp's tile) and their scales and zero
  // points, loaded a step ahead (global memory, mostly L2).
  int nrow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) nrow[h] = min(n0 + 16 * warp + g + 8 * h, N - 1) * n_groups;
  auto group_of = [&](int st) { const int k0 = st * SPAN; return group_shift >= 0 ? k0 >> group_shift : k0 / G; };
  float sc[2], zp[2], sc_next[2], zp_next[2];
  auto load_sz = [&](int st, float (&s_)[2], float (&z_)[2]) {
    const int grp = group_of(st);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s_[h] = to_f(scales[nrow[h] + grp]);
      z_[h] = (zeros ? to_f(zeros[nrow[h] + grp]) : 0.f) + off;
    }
  };
  float acc[2 * MT][4];
#pragma unroll
  for (int r = 0; r < 2 * MT; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[r][i] = 0.f;
#pragma unroll
  for (int i = 0; i < QG_STAGES - 1; ++i) {
    if (first + i < last) issue(first + i, i);
    __pipeline_commit();
  }
  if (first < last) load_sz(first, sc_next, zp_next);
  for (int st = first; st < last; ++st) {
    const int s = (st - first) % QG_STAGES;
    __pipeline_wait_prior(QG_STAGES - 2);              // this thread's copies of step st landed
    __syncthreads();                                   // everyone's; and step st - 1's stage is read
    if (st + QG_STAGES - 1 < last) issue(st + QG_STAGES - 1, (s + QG_STAGES - 1) % QG_STAGES);
    __pipeline_commit();
#pragma unroll
    for (int h = 0; h < 2; ++h) { sc[h] = sc_next[h]; zp[h] = zp_next[h]; }
    if (st + 1 < last) load_sz(st + 1, sc_next, zp_next);
    const uint8_t* stage = qg_smem + s * STAGE;
    // A: channels g and g + 8 of the warp's tile, c - z, decoded once for all of x's rows.
    uint32_t c[2][STEPS][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const Codes decode(zp[h], magic, flip);
      decode(*reinterpret_cast<const uint4*>(stage + X_BYTES + (16 * warp + g + 8 * h) * QG_CODE_BYTES + 16 * t),
             c[h]);
    }
    const uint4* xs = reinterpret_cast<const uint4*>(stage);
#pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {                 // x's rows 8 r .. 8 r + 7: B's columns, row 8 r + g here
      const int m = 8 * r + g;
      uint32_t xw[CODES / 2];
#pragma unroll
      for (int v = 0; v < XV; ++v) {
        const uint4 q = xs[m * XP + x_slot(m, t, v)];
        xw[4 * v] = q.x; xw[4 * v + 1] = q.y; xw[4 * v + 2] = q.z; xw[4 * v + 3] = q.w;
      }
      float d[4] = {0.f, 0.f, 0.f, 0.f};             // the step's products, then times the scales
#pragma unroll
      for (int k = 0; k < STEPS; ++k) {
        const uint32_t b[2] = {xw[2 * k], xw[2 * k + 1]};
        const uint32_t a[4] = {c[0][k][0], c[1][k][0], c[0][k][1], c[1][k][1]};
        mma_16816<W, PORTABLE>(d, a, b);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][i] = fmaf(sc[i >> 1], d[i], acc[r][i]);
    }
  }
  // The block's tile through shared memory (the stages, now read by every warp), then out in
  // rows of consecutive channels: lane 4g + t's acc[r] holds channels 16 warp + g (i = 0, 1)
  // and + 8 (i = 2, 3) of rows 8 r + 2t (i even) and 8 r + 2t + 1 (i odd).
  __pipeline_wait_prior(0);
  __syncthreads();
  float* c_sh = reinterpret_cast<float*>(qg_smem);     // [BM][QG_N + 4]
#pragma unroll
  for (int r = 0; r < 2 * MT; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      c_sh[(8 * r + 2 * t + (i & 1)) * (QG_N + 4) + 16 * warp + g + 8 * (i >> 1)] = acc[r][i];
  __syncthreads();
  const int nr = min(BM, rows - m0), splits = gridDim.z;
  for (int e = tid; e < nr * QG_N; e += THREADS) {
    const int m = e / QG_N, cl = e % QG_N;
    if (n0 + cl >= N) continue;
    const float v = c_sh[m * (QG_N + 4) + cl];
    if (splits == 1) y[(int64_t)(m0 + m) * N + n0 + cl] = from_f<T>(v);
    else part[((int64_t)blockIdx.z * rows + m0 + m) * N + n0 + cl] = v;
  }
  if (splits > 1 && last_of_splits(counters + (int64_t)blockIdx.y * gridDim.x + blockIdx.x, splits))
    add_split_sums(y, static_cast<const T*>(nullptr), part, rows, N, m0, nr, n0, QG_N, splits);
#endif
}

// -> y = x W^T, [rows, N] in x's dtype (16-bit), for groups of a multiple of 128 (int4) or 64
// (int8) inputs or one group per row, K a multiple of 32. splits: of K, in whole loop steps
// (clamped so that each split has one). counters: int32 zeros, one per tile of 128 channels
// x 64 rows (32 with 32 rows or fewer) at least, left zero (the layer's own, so that a CUDA
// graph replays without a memset); none: zeroed here. portable: the mma's twin instead of
// the instruction (the self-check compares the two on a GPU), 32-row tiles.
torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size, int64_t splits,
                         c10::optional<torch::Tensor> counters, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= INT32_MAX / 2, "quant_gemm: x must be [rows, K]");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "quant_gemm: fp16 or bf16 x");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  x = x.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) x = x.clone();   // 16-byte copies
  const QuantWeight w = quant_weight("quant_gemm", qweight, scales, zeros, bits, group_size, x.size(1),
                                     x.scalar_type());
  TORCH_CHECK(w.n_groups == 1 || w.G % (bits == 4 ? 128 : 64) == 0,
              "quant_gemm: group_size must be a multiple of 128 (int4) or 64 (int8), or cover the row");
  TORCH_CHECK(w.qw.numel() <= INT32_MAX && (int64_t)w.N * w.n_groups <= INT32_MAX,
              "quant_gemm: at most 2^31 bytes of codes and 2^31 scales (32-bit offsets)");
  const torch::Tensor qw = w.qw, sc = w.sc, z = w.z;   // plain names (kemu's bounds checker)
  const int64_t rows = x.size(0);
  auto y = torch::empty({rows, w.N}, x.options());
  if (rows == 0 || w.N == 0) return y;
  if (w.K == 0) return y.zero_();
  const int span = bits == 4 ? 128 : 64, mt = rows > 32 && !portable ? 4 : 2;
  const int64_t steps = (w.K + span - 1) / span;
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, steps));
  const int per = (int)((steps + splits - 1) / splits);
  splits = (steps + per - 1) / per;                    // every split has steps
  dim3 grid((w.N + QG_N - 1) / QG_N, (unsigned)((rows + 16 * mt - 1) / (16 * mt)), (unsigned)splits);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "quant_gemm: at most 65535 row tiles and splits");
  torch::Tensor part, count;
  if (splits > 1) {
    part = torch::empty({splits, rows, w.N}, x.options().dtype(torch::kFloat));
    count = split_counters(counters, (int64_t)grid.x * grid.y, true, x, "quant_gemm");   // tiles of 128 x 16 mt
  }
  int shift = -1;                                      // a power-of-two group: a shift, not a division
  if (w.n_groups == 1) shift = 30;                     // every input index < 2^30 maps to group 0
  else if ((w.G & (w.G - 1)) == 0) for (shift = 0; (1 << shift) < w.G; ++shift) {}
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  float* pp = splits > 1 ? part.data_ptr<float>() : nullptr;
  int* cp = splits > 1 ? count.data_ptr<int>() : nullptr;
  auto launch = [&](auto* x_ptr, auto* sc_ptr) {       // x's 16-bit type, from the pointers
    using T = std::remove_pointer_t<decltype(x_ptr)>;
    const T* zp = z.defined() ? z.data_ptr<T>() : nullptr;
    const uint32_t magic = std::is_same<T, c10::Half>::value ? FP16_1024_PAIR : BF16_128_PAIR;
    auto run = [&](auto bits_c, auto mt_c, auto portable_c) {   // std::integral_constant<int, BITS>, ...
      constexpr int B = decltype(bits_c)::value, MT = decltype(mt_c)::value;
      auto kernel = quant_gemm_kernel<T, B, MT, decltype(portable_c)::value>;
      constexpr int smem = quant_gemm_smem<T, B, MT>();
      ALLOW_SMEM(kernel, smem);
      kernel<<<grid, QG_WARPS * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
          y.data_ptr<T>(), pp, cp, x_ptr, qp, sc_ptr, zp, (int)rows, w.N, w.K, w.G, w.n_groups, shift, per,
          w.is_signed, magic);
    };
    using I2 = std::integral_constant<int, 2>;
    using I4 = std::integral_constant<int, 4>;
    using I8 = std::integral_constant<int, 8>;
    using Yes = std::true_type;
    using No = std::false_type;
    if (bits == 4) {
      if (portable) run(I4(), I2(), Yes());
      else if (mt == 2) run(I4(), I2(), No());
      else run(I4(), I4(), No());
    } else {
      if (portable) run(I8(), I2(), Yes());
      else if (mt == 2) run(I8(), I2(), No());
      else run(I8(), I4(), No());
    }
  };
  if (x.scalar_type() == at::kHalf) launch(x.data_ptr<c10::Half>(), sc.data_ptr<c10::Half>());
  else launch(x.data_ptr<c10::BFloat16>(), sc.data_ptr<c10::BFloat16>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// ---------------------------------------------------------------- dequantize (256 rows and more)
// From a few hundred rows on, each weight is used by enough rows that the product is compute-bound,
// and cuBLAS's tensor-core GEMM is the fastest way to run it: dequantize the codes into a dense
// [N, K] weight in one pass (read 0.5 or 1 byte per weight, write 2), then x W^T by cuBLAS.
// The reference twin does this in six whole-weight PyTorch ops (unpack, stack, convert, repeat
// the scales, subtract, multiply); this kernel is one read and one write. One thread per
// 16-byte chunk of codes, consecutive threads on consecutive chunks (coalesced both ways).
template <typename T, int BITS>
__global__ void dequantize_kernel(T* __restrict__ w,                 // [N, K], 16-byte aligned
                                  const uint8_t* __restrict__ qw,    // int4: [N, K/2] packed; int8: [N, K]
                                  const T* __restrict__ scales,      // [N, n_groups]
                                  const T* __restrict__ zeros,       // [N, n_groups] or null
                                  int N, int K, int G, int n_groups, bool is_signed, uint32_t fp16_1024_pair) {
  constexpr int CODES = BITS == 4 ? 32 : 16;
  const int nvec = K / CODES;
  const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= (int64_t)N * nvec) return;
  const int64_t n = v / nvec;
  const int k0 = (int)(v % nvec) * CODES;
  const int64_t gi = n * n_groups + k0 / G;          // the chunk lies in one group (G % 32 == 0)
  float c[CODES];
  const CodeDecoder<BITS> decode(is_signed, fp16_1024_pair);
  decode(reinterpret_cast<const uint4*>(qw)[v], c);
  store_dequantized<T, CODES>(w + n * K + k0, c, zeros ? to_f(zeros[gi]) : 0.f, to_f(scales[gi]));
}

// -> [N, in_features] in scales' dtype.
torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                         int64_t bits, int64_t group_size, int64_t in_features) {
  const at::cuda::OptionalCUDAGuard guard(device_of(qweight));
  const auto dtype = scales.scalar_type();
  const QuantWeight w = quant_weight("dequantize", qweight, scales, zeros, bits, group_size, in_features, dtype);
  const torch::Tensor qw = w.qw, sc = w.sc, z = w.z;
  auto out = torch::empty({w.N, w.K}, scales.options().dtype(dtype));
  const int64_t chunks = (int64_t)w.N * (w.K / (bits == 4 ? 32 : 16));
  if (chunks == 0) return out;
  const int threads = 256;
  TORCH_CHECK((chunks + threads - 1) / threads <= INT32_MAX, "dequantize: weight too large");
  DISPATCH(dtype, "dequantize", [&] {
    const scalar_t* zp = z.defined() ? z.data_ptr<scalar_t>() : nullptr;
    const uint8_t* qp = reinterpret_cast<const uint8_t*>(qw.data_ptr());
    auto kernel = bits == 4 ? dequantize_kernel<scalar_t, 4> : dequantize_kernel<scalar_t, 8>;
    kernel<<<(unsigned)((chunks + threads - 1) / threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), qp, sc.data_ptr<scalar_t>(), zp, w.N, w.K, w.G, w.n_groups, w.is_signed, FP16_1024_PAIR);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> residual,
                                    double eps);
torch::Tensor silu_and_mul(torch::Tensor gate, torch::Tensor up);
torch::Tensor rope_and_cache(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor positions,
                             torch::Tensor cos_t, torch::Tensor sin_t, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor slot_mapping);
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, int64_t max_context,
                           double scale, int64_t part, c10::optional<torch::Tensor> counters);
torch::Tensor paged_decode_rope(torch::Tensor qkv, int64_t n_heads, torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor block_tables, torch::Tensor context_lens,
                                torch::Tensor slot_mapping, torch::Tensor cos_t, torch::Tensor sin_t,
                                int64_t max_context, double scale, int64_t part,
                                c10::optional<torch::Tensor> counters);
torch::Tensor paged_prefill(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor query_start_loc,
                            torch::Tensor context_lens, int64_t max_query_len, double scale, bool tensor_cores,
                            bool portable);
torch::Tensor quant_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size, int64_t tile_chunks);
torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                         int64_t bits, int64_t group_size, int64_t in_features);
torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size, int64_t splits,
                         c10::optional<torch::Tensor> counters, bool portable);
torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                        c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size, int64_t tiles,
                        int64_t splits, c10::optional<torch::Tensor> counters, bool portable);
std::vector<torch::Tensor> quant_mma_add_norm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                              c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size,
                                              int64_t splits, c10::optional<torch::Tensor> counters,
                                              torch::Tensor residual, torch::Tensor norm_weight, double eps);
torch::Tensor dense_mma(torch::Tensor x, torch::Tensor weight, int64_t tiles, bool portable);
std::vector<torch::Tensor> dense_mma_add_norm(torch::Tensor x, torch::Tensor weight, int64_t tiles,
                                              c10::optional<torch::Tensor> counters, torch::Tensor residual,
                                              torch::Tensor norm_weight, double eps);
torch::Tensor quant_mma_silu_and_mul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                     c10::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size,
                                     int64_t splits, c10::optional<torch::Tensor> counters);
"""

@functools.cache
def cuda_library_includes() -> list[str]:
    """Include folders for the CUDA library headers torch's own headers pull in (cusparse.h,
    cublas_v2.h, ...) when the CUDA toolkit at hand has only the compiler's: a pip-installed
    CUDA build of torch carries them in its nvidia-* wheels (nvidia/<library>/include, or
    nvidia/cu13/include), which torch's extension builder does not add by itself."""
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for sub in sorted(os.listdir(root)):
            inc = os.path.join(root, sub, "include")
            if os.path.isdir(inc):
                found.append(inc)
    return found


@functools.cache
def cuda_extension():
    """Compile (first call) and return the CUDA extension; torch caches the build on disk.
    Cached in the process too: load_inline hashes the sources and re-imports the module on
    every call, which would cost each kernel launch far more than the launch itself.
    NANOSERVE_PTXAS_VERBOSE=1 prints each kernel's registers, spills and shared memory."""
    from torch.utils.cpp_extension import load_inline
    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"         # build for this device only
    verbose = os.environ.get("NANOSERVE_PTXAS_VERBOSE") == "1"
    return load_inline(
        name="nanoserve_kernels" + ("_ptxas" if verbose else ""), cpp_sources=CPP_SOURCE, cuda_sources=CUDA_SOURCE,
        functions=["rms_norm", "silu_and_mul", "rope_and_cache", "paged_decode", "paged_decode_rope", "paged_prefill",
                   "quant_gemv", "quant_mma", "quant_mma_add_norm", "quant_mma_silu_and_mul", "dense_mma",
                   "dense_mma_add_norm", "quant_gemm", "dequantize"],
        extra_cuda_cflags=["-O3", "--use_fast_math"] + (["-Xptxas=-v"] if verbose else []),
        extra_include_paths=cuda_library_includes(), verbose=verbose)


# ----------------------------------------------------------------------------- dispatch
# The model calls only these functions. CUDA tensors take the kernels above (an op with
# several kernels picks one in its *_cuda function: paged_attention_cuda, quant_linear_cuda),
# all others the reference twins, except two CPU paths tested against their twins: attention
# (paged_attention_cpu) and quantized linears, which take PyTorch's own weight-only
# int8/int4 kernels where the layout allows. NANOSERVE_KERNELS=ref makes every device
# run the references. Cases a kernel does not cover (decode shapes outside
# paged_decode's layout, more than 16 rows for the quantized GEMV) go elsewhere by the
# conditions written here.

USE_CUDA_KERNELS = os.environ.get("NANOSERVE_KERNELS", "cuda") != "ref"
USE_CPU_FAST_PATHS = USE_CUDA_KERNELS      # paged_attention_cpu, PyTorch's int8/int4 CPU kernels
DECODE_SMEM_BYTES = 200 * 1024    # paged_decode's shared memory budget at most (H100/H200: 227 KB)
# One round of paged_decode's loads: 256 threads, each with 4 rows' 16-byte loads in flight.
DECODE_ROUND_BYTES = 256 * 4 * 16


def decode_min_part(head_dim: int) -> int:
    """The fewest keys a Flash-Decoding split gets: one round of the block's loads of 16-bit
    rows (128 keys at head_dim 64, 64 at 128). A shorter split leaves lanes without a row;
    a longer one makes a block wait on its memory several times in turn while other SMs
    may have nothing to do."""
    return max(32, DECODE_ROUND_BYTES // (2 * head_dim) // 32 * 32)


def decode_partition(S: int, n_kv: int, group: int, head_dim: int, max_context: int, sm_count: int,
                     smem_bytes: int = DECODE_SMEM_BYTES) -> int:
    """Keys per split for paged_decode (Flash-Decoding). The grid is S x Hkv x splits blocks:
    enough splits to fill the GPU (two blocks per SM) when S x Hkv alone does not, no more
    (each split adds a partial result to write, count and merge; one split needs none),
    never fewer keys per split than decode_min_part, never more than the block's shared
    memory holds (the G x part scores). A split costs no launch (the group's last block
    merges), so a short context at a small batch is split too: at batch 1, a 200-token
    context over 4 KV heads runs on 8 blocks, not 4 that each read 200 rows in turn.
    Depends only on the host-side sizes, so a CUDA graph bucket (fixed S and max_context)
    always gets the same grid.
    -> part, a multiple of 32; splits = ceil(max_context / part)."""
    # q and each warp's P V partials, then per key G scores and (block size 1 at worst) a block id
    most = (smem_bytes // 4 - (1 + 256 // 32) * group * head_dim - 2) // (group + 1)
    most = max(32, most // 32 * 32)
    want = -(-2 * sm_count // max(1, S * n_kv))                     # splits that fill the GPU
    splits = max(1, min(want, -(-max_context // decode_min_part(head_dim))), -(-max_context // most))
    part = -(-max(max_context, 1) // splits)
    return min(most, -(-part // 32) * 32)            # rounded up: the splits may be a few fewer


@functools.lru_cache(maxsize=None)
def _decode_device(device: torch.device) -> tuple[int, int]:
    """(SMs, shared-memory budget of a decode block: what a block may opt into, less 2 KB for
    the kernel's static shared memory) of a GPU. Cached: the decode attention and
    quantized-matmul dispatch ask on every call. Another device gets an H100's figures:
    kemu, the CPU emulator, runs the kernels on CPU tensors through this dispatch (its
    run_self_check.py and integ_engine.py patch only cuda_extension and _cuda)."""
    if device.type != "cuda":
        return 132, DECODE_SMEM_BYTES
    p = torch.cuda.get_device_properties(device)
    return p.multi_processor_count, min(DECODE_SMEM_BYTES, p.shared_memory_per_block_optin - 2048)


@functools.lru_cache(maxsize=None)
def _tensor_cores(device: torch.device) -> bool:
    """Whether the tensor-core kernels may run: mma.sync on bf16, ldmatrix and
    cp.async need compute capability 8.0 (Ampere) or newer. Another device says yes: kemu, the
    CPU emulator (CPU tensors here, as for _decode_device), runs their portable twins."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _cuda(t: Tensor) -> bool:
    return USE_CUDA_KERNELS and t.is_cuda


def _cpu_fp32(x: Tensor, weight: Tensor) -> bool:
    return USE_CPU_FAST_PATHS and not x.is_cuda and x.dtype == weight.dtype == torch.float32


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if _cuda(x):
        return cuda_extension().rms_norm(x, weight, None, eps)[0]
    if _cpu_fp32(x, weight):
        return rms_norm_cpu(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if _cuda(x):
        out, res = cuda_extension().rms_norm(x, weight, residual, eps)
        return out, res
    if _cpu_fp32(x, weight):
        residual = residual + x
        return rms_norm_cpu(residual, weight, eps), residual
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    if _cuda(gate):
        return cuda_extension().silu_and_mul(gate, up)
    return silu_and_mul_ref(gate, up)


def rope_and_cache(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                   k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                   plan: CpuStepPlan | None = None) -> Tensor:
    """plan: the step's CpuStepPlan on the CPU path (the model runner builds one per step)."""
    if plan is not None and not q.is_cuda:         # the runner made a plan: the CPU path
        return rope_and_cache_cpu(q, k, v, k_cache, v_cache, plan)
    if _cuda(q):
        return cuda_extension().rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_and_cache_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def _decode_kernel_fits(q: Tensor, k_cache: Tensor) -> bool:
    """paged_decode's layout: G <= 8, and a cached row is 16 bytes times a power of two
    <= 32 (head_dim 64/128/256 in 16-bit types). Other shapes take paged_prefill."""
    lanes, rem = divmod(q.shape[2] * q.element_size(), 16)
    return q.shape[1] // k_cache.shape[2] <= 8 and rem == 0 and 0 < lanes <= 32 and lanes & (lanes - 1) == 0


def paged_attention_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                         query_start_loc: Tensor, context_lens: Tensor, scale: float,
                         max_context_len: int | None = None, max_query_len: int | None = None,
                         counters: Tensor | None = None) -> Tensor:
    """paged_attention on the kernels: paged_decode for one query per sequence in a layout it
    takes, paged_prefill for the rest (on tensor cores where the GPU has them). counters:
    paged_decode's split counters, int32 zeros, at least S x Hkv (the model runner owns one
    buffer: every launch leaves it zero); None zeroes a new one when the context is split."""
    if q.shape[0] == block_tables.shape[0] and _decode_kernel_fits(q, k_cache):   # decode
        max_len = max_context_len if max_context_len is not None else int(context_lens.max())
        part = decode_partition(q.shape[0], k_cache.shape[2], q.shape[1] // k_cache.shape[2], q.shape[2], max_len,
                                *_decode_device(q.device))
        return cuda_extension().paged_decode(q, k_cache, v_cache, block_tables, context_lens, max_len, scale, part,
                                             counters)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    return cuda_extension().paged_prefill(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                          max_query_len, scale, _tensor_cores(q.device), False)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    query_start_loc: Tensor, context_lens: Tensor, scale: float,
                    max_context_len: int | None = None, max_query_len: int | None = None,
                    plan: CpuStepPlan | None = None, counters: Tensor | None = None) -> Tensor:
    """max_context_len / max_query_len: host-side maxima (they size the grid); computed
    from the tensors, with a device sync, when not given. plan: as for rope_and_cache;
    counters: as for paged_attention_cuda."""
    if plan is not None and not q.is_cuda:         # the runner made a plan: the CPU path
        return paged_attention_cpu(q, k_cache, v_cache, plan, scale)
    if not _cuda(q):
        return paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)
    return paged_attention_cuda(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                                max_context_len, max_query_len, counters)


def decode_attention_with_rope(qkv: Tensor, n_heads: int, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               query_start_loc: Tensor, context_lens: Tensor, slot_mapping: Tensor, cos: Tensor,
                               sin: Tensor, scale: float, max_context_len: int,
                               counters: Tensor | None = None) -> Tensor:
    """A decode step's RoPE, cache write and attention: qkv (S, H + 2 Hkv, hd) as projected
    (q's H heads, then k's and v's), one token per sequence at position context_lens - 1 ->
    (S, H, hd). On the kernels one launch, paged_decode_rope, where paged_decode takes the
    shape: a layer's decode step launches no rope_and_cache. Elsewhere the two steps in turn
    (rope_and_cache, then paged_attention), which is also its twin. counters: as for
    paged_attention_cuda."""
    H, Hkv = n_heads, k_cache.shape[2]
    q, k, v = qkv.split([H, Hkv, Hkv], dim=1)                     # (S, H, hd), 2 x (S, Hkv, hd)
    if _cuda(qkv) and _decode_kernel_fits(q, k_cache):
        part = decode_partition(qkv.shape[0], Hkv, H // Hkv, qkv.shape[2], max_context_len, *_decode_device(qkv.device))
        return cuda_extension().paged_decode_rope(qkv, H, k_cache, v_cache, block_tables, context_lens, slot_mapping,
                                                  cos, sin, max_context_len, scale, part, counters)
    positions = (context_lens.long() - 1).clamp(min=0)             # a padding row (context 0) writes nothing
    q = rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                           max_context_len, 1, counters=counters)


# Where quant_linear_cuda changes kernel, by rows of x. Up to QUANT_MMA_MAX_ROWS (16, one
# mma tile of rows) the mma kernel, which streams the codes once whatever the row count. From
# QUANT_GEMM_MAX_ROWS on, dequantize + cuBLAS: the product is compute-bound and cuBLAS's
# Hopper GEMM (wgmma) outruns the tiled kernel's mma.sync by more than the extra pass costs
# (a guess until measured: its 64-row tile already issues 1.6x what copy bandwidth allows,
# and 256 rows are 4 such tiles). vLLM's AWQ layer turns at the same 256 tokens; the kernel
# benchmark (tools/kernel_bench.py) times both sides at 32-2,048 rows, and the mma kernel
# beside the GEMV at 1-16.
QUANT_MMA_MAX_ROWS = 16
QUANT_GEMM_MAX_ROWS = 256


def _quant_mma_fits(bits: int, group_size: int, K: int) -> bool:
    """Whether quant_mma takes this grouping: each of its loop steps (128 int4 or 64 int8
    inputs) inside one group, whose scale it applies to the step's sums."""
    G = group_size or K
    return G >= K or G % (128 if bits <= 4 else 64) == 0


def _dense_mma_tiles(N: int, device: torch.device) -> int:
    """16-channel tiles per warp for dense_mma: 2 where the grid still has about two blocks
    (of 32 channels) per SM, else 1. Two tiles share each x value among more channels; one
    gives a narrow layer enough blocks to keep every SM loading."""
    return 2 if -(-N // 32) >= 2 * _decode_device(device)[0] else 1


def _quant_mma_splits(rows: int, N: int, K: int, bits: int, device: torch.device) -> int:
    """How many ways quant_mma, with two 16-channel tiles a warp, splits K over blocks: until
    the grid has about two blocks per SM, each split keeping its block's 8 warps at a loop
    step or more, its steps rounded up to whole rounds of the 8 (no warp idles while
    another takes one step more). Two
    tiles share each x value among 32 channels: in sm_90 code 0.18-0.21 instructions per
    byte of int4 codes against one tile's 0.25-0.39, where an H200 SM issues about 0.25 in
    the time a byte takes at copy bandwidth; the splits give narrow layers back the blocks
    that one tile a warp gave them."""
    if rows == 0 or N == 0:
        return 1
    blocks = -(-N // 32) * -(-rows // 16)
    steps = -(-K // (128 if bits <= 4 else 64))
    target = min(-(-2 * _decode_device(device)[0] // blocks), steps // 8)
    if target <= 1:
        return 1
    per = -(-(-(-steps // target)) // 8) * 8          # steps a split, in whole rounds of the block's 8 warps
    return -(-steps // per)


def _quant_gemm_tiles(rows: int, N: int) -> int:
    """quant_gemm's output tiles: 128 channels x 32 rows up to 32 rows, x 64 rows beyond."""
    return -(-N // 128) * -(-rows // (32 if rows <= 32 else 64))


def _quant_gemm_splits(rows: int, N: int, K: int, bits: int, device: torch.device) -> int:
    """How many ways quant_gemm splits K: until the grid fills every SM once (one block of 64
    rows or two of 32 each), while the fp32 partial sums stay under half the code bytes
    (splits * rows * N * 4 <= N * K * bits / 16)."""
    if rows == 0 or N == 0:
        return 1
    per_sm = 1 if rows > 32 else 2
    return max(1, min(-(-per_sm * _decode_device(device)[0] // _quant_gemm_tiles(rows, N)), K * bits // (64 * rows)))


def _split_counters(cache: dict | None, N: int, device: torch.device) -> Tensor | None:
    """The layer's split counters for quant_mma, quant_gemm and the fold (quant_mma_add_norm,
    dense_mma_add_norm: one more, for the norm; one buffer serves them all, and every
    launch leaves it zero), kept in its cache; made on first use, sized for any grid they
    launch (up to a 16-channel tile a warp). A CUDA graph holds the
    buffer's address, so a buffer is never freed while its layer lives: one outgrown (parts
    of a fused layer share its cache) stays in cache["retired"]. None without a cache: the
    kernels zero their own."""
    if cache is None:
        return None
    need = max(-(-N // 16) + 1, _quant_gemm_tiles(QUANT_GEMM_MAX_ROWS - 1, N))   # + the fold's
    counters = cache.get("split_counters")
    if counters is None or counters.device != device or len(counters) < need:
        if counters is not None:
            cache.setdefault("retired", []).append(counters)
        counters = cache["split_counters"] = torch.zeros(need, dtype=torch.int32, device=device)
    return counters


def quant_linear_cuda(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                      group_size: int, cache: dict | None = None) -> Tensor:
    """quant_linear on the kernels (K and the group size multiples of 32), by the rows of x:
    1-16 the mma kernel (the codes dequantized into tensor-core registers and read once),
    17-255 its tiled version quant_gemm (the same, each code decoded once per 64 rows), both
    for groups of 128 inputs or a multiple, or per channel; 256 and more the dequantize
    kernel and cuBLAS (compute-bound). Other groups, fp32, or a GPU older than Ampere: the
    GEMV (CUDA cores, an FMA per code and row) up to 16 rows, dequantize + cuBLAS beyond.
    Both mma kernels split K over blocks where the layer is narrow; cache: the layer's dict
    (quant_linear), where their split counters are kept (_split_counters)."""
    K = x.shape[-1]
    rows, N = x.numel() // K, qweight.shape[0]
    kbits = 4 if bits <= 4 else 8                     # the kernels' code widths (3-bit codes are packed as 4)
    tc = x.dtype in (torch.float16, torch.bfloat16) and _tensor_cores(x.device)
    fits = tc and _quant_mma_fits(kbits, group_size, K)
    if fits and rows <= QUANT_MMA_MAX_ROWS:
        splits = _quant_mma_splits(rows, N, K, kbits, x.device)
        y = cuda_extension().quant_mma(x.reshape(rows, K), qweight, scales, zeros, kbits, group_size, 2, splits,
                                       _split_counters(cache, N, x.device) if splits > 1 else None, False)
        return y.view(*x.shape[:-1], -1)
    if fits and rows < QUANT_GEMM_MAX_ROWS:
        splits = _quant_gemm_splits(rows, N, K, kbits, x.device)
        y = cuda_extension().quant_gemm(x.reshape(rows, K), qweight, scales, zeros, kbits, group_size, splits,
                                        _split_counters(cache, N, x.device) if splits > 1 else None, False)
        return y.view(*x.shape[:-1], -1)
    if rows <= QUANT_MMA_MAX_ROWS:
        y = cuda_extension().quant_gemv(x.reshape(rows, K), qweight, scales, zeros, kbits, group_size, 0)
        return y.view(*x.shape[:-1], -1)
    # Compute-bound: cuBLAS on a weight dequantized in one pass (a temporary of the layer's
    # dense size, which kv_budget_bytes sets aside).
    w = cuda_extension().dequantize(qweight, scales.to(x.dtype), None if zeros is None else zeros.to(x.dtype),
                                    kbits, group_size, K)
    return F.linear(x, w)


def quant_linear_dequantizes(rows: int, K: int, bits: int, group_size: int, dtype: torch.dtype,
                             device: torch.device) -> bool:
    """Whether quant_linear on a GPU makes a dense temporary of the weight (dequantize + cuBLAS,
    or the twin) for x of this many rows, as quant_linear_cuda decides: from
    QUANT_GEMM_MAX_ROWS rows on; past QUANT_MMA_MAX_ROWS where the mma kernels do not take
    the layout (int4 groups of 32 or 64, fp32, a GPU before Ampere); at any row count where
    K or the group size is not a multiple of 32 (the twin). The model runner sets memory
    aside by it."""
    if K % 32 or (group_size or K) % 32:
        return rows > 0
    if rows < QUANT_GEMM_MAX_ROWS and _quant_mma_fits(4 if bits <= 4 else 8, group_size, K) \
            and dtype in (torch.float16, torch.bfloat16) and _tensor_cores(device):
        return False
    return rows > QUANT_MMA_MAX_ROWS


def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                 group_size: int, cache: dict | None = None) -> Tensor:
    """y = x W^T for a weight-only quantized W: on a GPU the kernels (quant_linear_cuda) where
    K and the group size are multiples of 32, else the twin. On the CPU, PyTorch's weight-only
    kernels where the layout fits. cache: a dict the caller keeps per layer for what the
    kernels keep between calls: on the CPU "cpu", the weight's repacking (made on first use,
    keyed by dtype and the buffers' addresses so that a reloaded weight repacks), on a GPU
    "split_counters" (_split_counters)."""
    K = x.shape[-1]
    if _cuda(x) and K % 32 == 0 and (group_size or K) % 32 == 0:
        return quant_linear_cuda(x, qweight, scales, zeros, bits, group_size, cache)
    if USE_CPU_FAST_PATHS and cache is not None and not x.is_cuda:
        key = (x.dtype, qweight.data_ptr(), scales.data_ptr())
        if cache.get("cpu", (None,))[0] != key:
            cache["cpu"] = (key, pack_for_cpu(qweight, scales, zeros, bits, group_size, K, x.dtype))
        if cache["cpu"][1] is not None:
            return quant_linear_cpu(x, cache["cpu"][1])
    return quant_linear_ref(x, qweight, scales, zeros, bits, group_size)


# Attention's output projection and the MLP's down projection each feed add + RMSNorm
# (fused_add_rms_norm). A quantized one of up to this many rows does both in its own launch
# (quant_mma_add_norm: its last block to finish norms the rows), one launch a projection
# fewer; so does a dense one where dense_mma takes it (dense_mma_add_norm). That block norms the rows one after another, where rms_norm's launch gives each
# row a block; 4 is an estimate (about a microsecond a row against a launch) until
# tools/kernel_bench.py goals times the two. NANOSERVE_NORM_FOLD_ROWS=0 turns it off.
_NORM_FOLD_ROWS = os.environ.get("NANOSERVE_NORM_FOLD_ROWS", "4")
if not _NORM_FOLD_ROWS.isdigit():
    raise ValueError(f"NANOSERVE_NORM_FOLD_ROWS must be a row count (0 or more), got {_NORM_FOLD_ROWS!r}")
NORM_FOLD_MAX_ROWS = min(int(_NORM_FOLD_ROWS), QUANT_MMA_MAX_ROWS)
NORM_ROW_MAX_WIDTH = 8 * 256 * 4      # the fold's norm: RN_THREADS x RN_CHUNKS 16-byte chunks of a 16-bit row


def _quant_mma_rows(x: Tensor, bits: int, group_size: int) -> int:
    """The rows of x when quant_linear takes the mma kernel for it (quant_linear's kernel
    condition, then quant_linear_cuda's first case), else 0. The folds below run that kernel
    with an epilogue of their own only where it would run anyway, so as to give its bits."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if _cuda(x) and 0 < rows <= QUANT_MMA_MAX_ROWS and K % 32 == 0 and (group_size or K) % 32 == 0 \
            and x.dtype in (torch.float16, torch.bfloat16) and _tensor_cores(x.device) \
            and _quant_mma_fits(4 if bits <= 4 else 8, group_size, K):
        return rows
    return 0


def quant_linear_add_rms_norm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                              group_size: int, residual: Tensor, weight: Tensor, eps: float,
                              cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """fused_add_rms_norm(quant_linear(x, ...), residual, weight, eps): (RMSNorm(y + residual),
    y + residual) for y = x W^T, the new residual stream its second. On a GPU, at 1 to
    NORM_FOLD_MAX_ROWS rows where the mma kernel takes the layer and the norm's row fits
    one block (N a multiple of 8, at most NORM_ROW_MAX_WIDTH), one launch: the same kernel,
    splits and sums as quant_linear, the same norm as rms_norm's vector kernel, so the same
    bits as the two (given a 16-byte aligned residual and weight, as the model's are)."""
    rows, N, K, kbits = _quant_mma_rows(x, bits, group_size), qweight.shape[0], x.shape[-1], 4 if bits <= 4 else 8
    if 0 < rows <= NORM_FOLD_MAX_ROWS and N % 8 == 0 and N <= NORM_ROW_MAX_WIDTH \
            and residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], N):
        splits = _quant_mma_splits(rows, N, K, kbits, x.device)
        h, r = cuda_extension().quant_mma_add_norm(x.reshape(rows, K), qweight, scales, zeros, kbits, group_size,
                                                   splits, _split_counters(cache, N, x.device),
                                                   residual.reshape(rows, N), weight, eps)
        return h.view(residual.shape), r.view(residual.shape)
    return fused_add_rms_norm(quant_linear(x, qweight, scales, zeros, bits, group_size, cache), residual, weight, eps)


def quant_linear_silu_and_mul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                              group_size: int, cache: dict | None = None) -> Tensor:
    """silu_and_mul(gate, up) of y = quant_linear(x, ...) = [gate, up] for the fused weight of
    the MLP's gate and up projections (2F rows, gate's first) -> (..., F). On a GPU where the
    mma kernel takes the layer (1-16 rows) one launch (quant_mma_silu_and_mul: each block
    holds the same channels of gate and up and stores silu(gate) x up), the same bits as
    the two ops."""
    rows, N, K, kbits = _quant_mma_rows(x, bits, group_size), qweight.shape[0], x.shape[-1], 4 if bits <= 4 else 8
    if rows and N % 2 == 0:
        splits = _quant_mma_splits(rows, N, K, kbits, x.device)
        y = cuda_extension().quant_mma_silu_and_mul(x.reshape(rows, K), qweight, scales, zeros, kbits, group_size,
                                                    splits, _split_counters(cache, N, x.device) if splits > 1 else None)
        return y.view(*x.shape[:-1], N // 2)
    return silu_and_mul(*quant_linear(x, qweight, scales, zeros, bits, group_size, cache).chunk(2, dim=-1))


# Dense fp16/bf16 products of up to this many rows (decode steps) run on dense_mma instead
# of cuBLAS. 0, cuBLAS everywhere, until a GPU run has measured the two side by side
# (tools/kernel_bench.py goals, and the engine with NANOSERVE_DENSE_MMA_ROWS=16).
_DENSE_MMA_ROWS = os.environ.get("NANOSERVE_DENSE_MMA_ROWS", "0")
if not _DENSE_MMA_ROWS.isdigit():
    raise ValueError(f"NANOSERVE_DENSE_MMA_ROWS must be a row count (0 or more), got {_DENSE_MMA_ROWS!r}")
DENSE_MMA_MAX_ROWS = int(_DENSE_MMA_ROWS)


def _dense_mma_rows(x: Tensor, weight: Tensor) -> int:
    """The rows of x when dense_mma takes the product x W^T (an fp16/bf16 product of 1 to
    DENSE_MMA_MAX_ROWS rows on the kernels, no autograd there), else 0. Every projection of
    every step asks, so with DENSE_MMA_MAX_ROWS 0 the test is one comparison."""
    if DENSE_MMA_MAX_ROWS and _cuda(x) and x.dtype in (torch.float16, torch.bfloat16) \
            and type(weight) in (Tensor, torch.nn.Parameter) and weight.dtype == x.dtype and weight.is_contiguous() \
            and x.shape[-1] % 8 == 0 and _tensor_cores(x.device) \
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        K = x.shape[-1]
        rows = x.numel() // K if K else 0
        return rows if rows <= DENSE_MMA_MAX_ROWS else 0
    return 0


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b: F.linear (cuBLAS on a GPU), or dense_mma where it takes the product
    (_dense_mma_rows)."""
    rows = _dense_mma_rows(x, weight)
    if rows:
        y = cuda_extension().dense_mma(x.reshape(rows, -1), weight, _dense_mma_tiles(weight.shape[0], x.device), False)
        y = y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def linear_add_rms_norm(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, norm_weight: Tensor,
                        eps: float, cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """fused_add_rms_norm(linear(x, weight, bias), residual, norm_weight, eps), in one launch
    (dense_mma_add_norm) where dense_mma takes the product at up to NORM_FOLD_MAX_ROWS rows,
    with no bias: the fold of quant_linear_add_rms_norm on dense weights, the same bits as
    the two. cache: the layer's dict, for the norm's counter (_split_counters)."""
    rows, N = _dense_mma_rows(x, weight), weight.shape[0]
    if 0 < rows <= NORM_FOLD_MAX_ROWS and bias is None and N % 8 == 0 and N <= NORM_ROW_MAX_WIDTH \
            and residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], N):
        h, r = cuda_extension().dense_mma_add_norm(x.reshape(rows, -1), weight, _dense_mma_tiles(N, x.device),
                                                   _split_counters(cache, N, x.device), residual.reshape(rows, N),
                                                   norm_weight, eps)
        return h.view(residual.shape), r.view(residual.shape)
    return fused_add_rms_norm(linear(x, weight, bias), residual, norm_weight, eps)


# ----------------------------------------------------------------------------- self-check
# Every kernel against its reference twin on fresh random inputs, one check per kernel
# family, each over fp16, bf16 and fp32. The model's dispatch functions route only CUDA
# tensors to the kernels; the checks call the kernels' side of the dispatch
# (paged_attention_cuda, quant_linear_cuda) or the extension itself, so that on the CPU they
# run whatever cuda_extension() returns: kemu, the CPU emulator (../shared/tools/kemu),
# replaces it with its own build and calls self_check(device="cpu", quick=True).

Rows = list[tuple[str, float, float]]      # (case, max error relative to max |reference|, ms per call)


def _bench(fn, device: str, reps: int = 20) -> float:
    """Seconds per call on a GPU; 0 elsewhere (an emulator's timings mean nothing)."""
    if device != "cuda":
        return 0.0
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def _rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: 0 for empty tensors, inf for a shape mismatch."""
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def _random_paged(S: int, ctx: list[int], Hkv: int, G: int, hd: int, bs: int, dtype: torch.dtype, dev: str):
    """Random queries and caches with scattered block tables for S decoding sequences."""
    nb = sum((c + bs - 1) // bs for c in ctx) + 1
    k_cache = torch.randn(nb, bs, Hkv, hd, device=dev, dtype=dtype)
    v_cache = torch.randn(nb, bs, Hkv, hd, device=dev, dtype=dtype)
    free = torch.randperm(nb).tolist()
    tables = [[free.pop() for _ in range((c + bs - 1) // bs)] for c in ctx]
    width = max(1, max(map(len, tables)))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    q = torch.randn(S, Hkv * G, hd, device=dev, dtype=dtype)
    lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    return q, k_cache, v_cache, bt, lens


def _random_quant(N: int, K: int, bits: int, G: int, asym: bool, dtype: torch.dtype, dev: str,
                  int8_min: int = -128) -> tuple[Tensor, Tensor, Tensor | None]:
    """Random codes (int4 two per byte; int8 signed, or unsigned with zero points), scales
    (N, groups; the last group partial where G does not divide K) and zero points."""
    if bits == 4:
        qw = torch.randint(0, 256, (N, (K + 1) // 2), device=dev, dtype=torch.uint8)
    elif asym:
        qw = torch.randint(0, 256, (N, K), device=dev, dtype=torch.uint8)
    else:
        qw = torch.randint(int8_min, 128, (N, K), device=dev, dtype=torch.int8)
    sc = torch.rand(N, -(-K // (G or K)), device=dev, dtype=dtype) / 50
    zp = torch.randint(0, 2 ** bits, sc.shape, device=dev).to(dtype) if asym else None
    return qw, sc, zp


def _check_norms(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """rms_norm with and without the residual add, and silu_and_mul: a width that is not a
    multiple of the vector width (1001) and zero rows."""
    ext, dn, rows = cuda_extension(), str(dtype).removeprefix("torch."), []
    shapes = ((1, 64), (3, 200), (2, 1001), (0, 64)) if quick else \
        ((1, 2048), (7, 4096), (33, 5632), (2, 1001), (1, 16384), (0, 4096))
    for T, D in shapes[:None if full else 1]:
        x, r = torch.randn(T, D, device=dev, dtype=dtype), torch.randn(T, D, device=dev, dtype=dtype)
        w = torch.randn(D, device=dev, dtype=dtype)
        out, res = ext.rms_norm(x, w, r, 1e-5)
        ref, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-5)
        rows.append((f"add+rmsnorm {dn} {T}x{D}", max(_rel(out, ref), _rel(res, ref_res)),
                     1e3 * _bench(lambda: ext.rms_norm(x, w, r, 1e-5), dev)))
        rows.append((f"rmsnorm {dn} {T}x{D}", _rel(ext.rms_norm(x, w, None, 1e-5)[0], rms_norm_ref(x, w, 1e-5)),
                     1e3 * _bench(lambda: ext.rms_norm(x, w, None, 1e-5), dev)))
        g, u = torch.randn(T, D, device=dev, dtype=dtype), torch.randn(T, D, device=dev, dtype=dtype)
        rows.append((f"silu*mul {dn} {T}x{D}", _rel(ext.silu_and_mul(g, u), silu_and_mul_ref(g, u)),
                     1e3 * _bench(lambda: ext.silu_and_mul(g, u), dev)))
    return rows


def _check_rope_and_cache(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """rope_and_cache: q and k rotated, k and v written to scattered cache slots; GQA groups
    1/4/8, zero tokens."""
    ext, dn, rows = cuda_extension(), str(dtype).removeprefix("torch."), []
    Hkv, hd = (2, 64) if quick else (4, 128)
    for G in (1, 4, 8) if full else (4,):
        for bs in ((16,) if quick else (16, 32)):
            for T in ((5, 0) if quick else (13, 0)):
                cos, sin = rope_cos_sin(hd, 512, 10000.0, dev)
                q = torch.randn(T, Hkv * G, hd, device=dev, dtype=dtype)
                k, v = torch.randn(T, Hkv, hd, device=dev, dtype=dtype), torch.randn(T, Hkv, hd, device=dev, dtype=dtype)
                pos = torch.randint(0, 512, (T,), device=dev)
                kc, vc = torch.zeros(4, bs, Hkv, hd, device=dev, dtype=dtype), torch.zeros(4, bs, Hkv, hd, device=dev, dtype=dtype)
                kc2, vc2 = kc.clone(), vc.clone()
                slots = torch.randperm(4 * bs, device=dev)[:T]
                qo = ext.rope_and_cache(q, k, v, pos, cos, sin, kc, vc, slots)
                qr = rope_and_cache_ref(q, k, v, pos, cos, sin, kc2, vc2, slots)
                rows.append((f"rope+cache {dn} G={G} bs={bs} T={T}", max(_rel(qo, qr), _rel(kc, kc2), _rel(vc, vc2)),
                             1e3 * _bench(lambda: ext.rope_and_cache(q, k, v, pos, cos, sin, kc, vc, slots), dev)))
    return rows


def _check_decode_attention(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """One query per sequence, through paged_attention_cuda with its split policy
    (decode_partition); quick: paged_decode with a 64-key partition, so that short contexts
    span several splits. Each group size takes its instantiation (G rounded up to 1/2/4/8)
    and, from 2 heads over as many lanes, the reduce-scatter; G = 16 and head_dim 80 take the
    prefill kernel. Context 0 (a CUDA-graph padding row, alone and beside a split context:
    all its splits empty), one split (no merge) and several with empty ones; block sizes of
    12 (a division, not a shift), 16 and 32; a 320-key partition over 300 keys (several
    steps of each loop: the software pipeline's hand-over from one step to the next). Each case runs twice on one buffer of split counters: the
    second result must equal the first to the bit and the counters must be left zero (a
    CUDA graph replays the launch on the same buffer), or the case's error is 1."""
    ext, dn, rows = cuda_extension(), str(dtype).removeprefix("torch."), []
    groups = ((1, 64), (4, 64), (8, 64), (3, 64), (8, 32), (16, 32), (2, 80), (2, 64), (6, 128), (5, 32)) \
        if quick else ((1, 128), (4, 128), (8, 128), (3, 128), (16, 64), (4, 80), (2, 128), (6, 128))
    ctxs = ([0], [1, 17, 0, 40], [130, 5, 0], [64]) if quick else \
        ([0], [1, 17, 100, 0], [4097, 333], [16000], [512], [32768], [2048] * 64)
    cases = [(G, hd, bs, ctx, None) for G, hd in groups[:None if full else 2]
             for bs in ((16,) if quick else (16, 32)) for ctx in ctxs]
    cases += [(6, 128, 12, [130, 5], None), (4, 64, 12, [1, 17, 0, 40], None), (4, 64, 16, [300, 7], 320),
              (1, 128, 16, [300], 320)]
    for G, hd, bs, ctx, given in cases:
        q, kc, vc, bt, lens = _random_paged(len(ctx), ctx, 2, G, hd, bs, dtype, dev)
        starts = torch.arange(len(ctx) + 1, device=dev, dtype=torch.int32)
        ref = paged_attention_ref(q, kc, vc, bt, starts, lens, hd ** -0.5)
        via = "decode" if _decode_kernel_fits(q, kc) else "prefill kernel"
        part = given or (64 if quick else decode_partition(len(ctx), 2, G, hd, max(ctx),
                                                           *_decode_device(torch.device(dev))))
        splits = -(-max(ctx) // part) if via == "decode" else 1
        counters = torch.zeros(2 * len(ctx), device=dev, dtype=torch.int32)
        if via == "decode" and (quick or given):
            run = lambda: ext.paged_decode(q, kc, vc, bt, lens, max(ctx), hd ** -0.5, part, counters)
        else:
            run = lambda: paged_attention_cuda(q, kc, vc, bt, starts, lens, hd ** -0.5, max(ctx), 1, counters)
        out = run()
        again = run()
        t = _bench(run, dev)
        gbs = 2 * sum(ctx) * 2 * hd * kc.element_size() / t / 1e9 if t else 0.0
        shown = ctx if len(ctx) <= 4 else f"{len(ctx)} x {ctx[0]}"
        same = torch.equal(out, again) and not counters.any()
        rows.append((f"paged decode ({via}) {dn} G={G} hd={hd} bs={bs} ctx={shown} splits={max(splits, 1)}"
                     + (f" ({gbs:.0f} GB/s)" if t else ""), _rel(out, ref) if same else 1.0, 1e3 * t))
    return rows


def _check_decode_rope(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """paged_decode_rope (decode attention applying the step's RoPE and cache write) against
    its twin, and against rope_and_cache then paged_decode, which it must equal to the bit
    (outputs and caches; an error of 1 marks a difference), run twice on one buffer of split
    counters (the same result, the counters left zero). Contexts of 1 (only the new
    token), 0 (a padding row, slot -1, nothing written) and several splits with the new
    token in the last; groups 1, 4 (pipelined loops) and 8 (not); block size 12."""
    ext, dn, rows = cuda_extension(), str(dtype).removeprefix("torch."), []
    hd_big = 64 if quick else 128
    cases = [(4, 64, 16, [1, 17, 0, 40], 64), (1, hd_big, 16, [130, 5, 0], 64), (8, 64, 12, [70, 3], 32),
             (4, 64, 16, [300, 7], 320)]
    for G, hd, bs, ctx, part in cases[:None if full else 2]:
        Hkv, H = 2, 2 * G
        _, kc, vc, bt, lens = _random_paged(len(ctx), ctx, Hkv, G, hd, bs, dtype, dev)
        qkv = torch.randn(len(ctx), H + 2 * Hkv, hd, device=dev, dtype=dtype)
        cos, sin = rope_cos_sin(hd, 512, 10000.0, dev)
        slots = torch.tensor([int(bt[i, (c - 1) // bs]) * bs + (c - 1) % bs if c else -1 for i, c in enumerate(ctx)],
                             device=dev)
        starts = torch.arange(len(ctx) + 1, device=dev, dtype=torch.int32)
        scale, kc2, vc2, kc3, vc3 = hd ** -0.5, kc.clone(), vc.clone(), kc.clone(), vc.clone()
        counters = torch.zeros(Hkv * len(ctx), device=dev, dtype=torch.int32)
        run = lambda: ext.paged_decode_rope(qkv, H, kc, vc, bt, lens, slots, cos, sin, max(ctx), scale, part,
                                            counters)
        out = run()
        again = run()                    # writes the same row again: the same result, counters left zero
        q, k, v = qkv.split([H, Hkv, Hkv], dim=1)
        pos = (lens.long() - 1).clamp(min=0)
        ref = paged_attention_ref(rope_and_cache_ref(q, k, v, pos, cos, sin, kc2, vc2, slots), kc2, vc2, bt, starts,
                                  lens, scale)
        two = ext.paged_decode(ext.rope_and_cache(q, k, v, pos, cos, sin, kc3, vc3, slots), kc3, vc3, bt, lens,
                               max(ctx), scale, part, None)
        same = torch.equal(out, two) and torch.equal(kc, kc3) and torch.equal(vc, vc3) and torch.equal(out, again) \
            and not counters.any()
        err = max(_rel(out, ref), _rel(kc, kc2), _rel(vc, vc2)) if same else 1.0
        rows.append((f"decode with RoPE + cache write {dn} G={G} hd={hd} bs={bs} ctx={ctx} part={part}"
                     f" (bit-equal to the two kernels: {same})", err, 1e3 * _bench(run, dev)))
    return rows


def _prefill_case(dev: str, dtype: torch.dtype, G: int, Hkv: int, hd: int, bs: int, q_lens: list[int],
                  ctx: list[int], tensor_cores: bool = True, portable: bool = False) -> tuple[str, float, float]:
    """paged_prefill for sequences with q_lens queries each, the last ones of ctx tokens
    (context 0: a row that sees no key). portable: the tensor-core kernel with the mma and
    ldmatrix twins, compared with the instructions' run as well as with the reference."""
    tensor_cores = tensor_cores and _tensor_cores(torch.device(dev))
    _, kc, vc, bt, lens = _random_paged(len(ctx), ctx, Hkv, G, hd, bs, dtype, dev)
    lens = torch.tensor([max(c, n) if c else 0 for c, n in zip(ctx, q_lens)], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), Hkv * G, hd, device=dev, dtype=dtype)
    starts = torch.tensor([0] + q_lens, device=dev).cumsum(0).to(torch.int32)
    run = lambda: cuda_extension().paged_prefill(q, kc, vc, bt, starts, lens, max(q_lens), hd ** -0.5, tensor_cores,
                                                 False)
    out = run()
    ref = paged_attention_ref(q, kc, vc, bt, starts, lens, hd ** -0.5)
    if portable:
        twin = cuda_extension().paged_prefill(q, kc, vc, bt, starts, lens, max(q_lens), hd ** -0.5, True, True)
        ref, out = out, twin                                      # the twins against the instructions
    t = _bench(run, dev)
    flops = 4 * sum(n * (c - n / 2) for n, c in zip(q_lens, ctx)) * Hkv * G * hd
    tc = tensor_cores and dtype != torch.float32 and hd in (64, 128)
    via = "mma and ldmatrix twins against the instructions" if portable else "tensor cores" if tc else "CUDA cores"
    return (f"paged prefill ({via}) {str(dtype).removeprefix('torch.')} G={G} "
            f"hd={hd} bs={bs} q={q_lens} ctx={ctx}" + (f" ({flops / t / 1e12:.1f} TFLOP/s)" if t else ""),
            _rel(out, ref), 1e3 * t)


def _check_prefill_attention(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """Several queries per sequence: a new prompt, a decode, a chunk after cached context, a
    verification window over a long context, a row with no visible key (context 0). fp16/bf16
    at head_dim 64/128 take the tensor-core kernel, the rest the CUDA-core one; 70 queries
    over 150 keys span several query tiles and K/V tiles (double buffering). Then a group
    that does not divide the 64-row tile (empty rows), the other head size, one the
    tensor-core kernel does not take, the CUDA-core kernel where a GPU older than Ampere
    would take it, and the tensor-core kernel's mma and ldmatrix twins against the
    instructions (on a GPU; under kemu both runs are the twins)."""
    Hkv, hd = (2, 64) if quick else (4, 128)
    windows = ((([5, 1, 7], [5, 20, 40]), ([1, 4], [0, 9]), ([9], [75]), ([70], [150]))) if quick else \
        (([5, 1, 37], [5, 100, 300]), ([9, 6], [4097, 6]), ([509], [1200]), ([1, 4], [0, 9]))
    rows = [_prefill_case(dev, dtype, G, Hkv, hd, bs, q_lens, ctx)
            for G in ((1, 4, 8) if full else (4,)) for bs in ((16,) if quick else (16, 32)) for q_lens, ctx in windows]
    rows += [_prefill_case(dev, dtype, G, 1, hd_, 16, [30, 2], [130, 66])
             for G, hd_ in ((3, 64), (2, 128 if quick else 64), (2, 80))]
    rows.append(_prefill_case(dev, dtype, 4, 1, 64, 16, [30, 2], [130, 66], tensor_cores=False))
    if dtype != torch.float32 and _tensor_cores(torch.device(dev)):
        rows.append(_prefill_case(dev, dtype, 4, 2, 64, 16, [70, 5], [150, 40], portable=True))
    return rows


def _check_quant_linear(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """W4A16 / W8A16, symmetric and asymmetric, per channel and per group with a partial last
    group, each row count on the kernel quant_linear_cuda picks for it: 1-16 the mma kernel,
    17-255 its tiled version (fp32, or int4 groups of 32: the GEMV, then dequantize +
    cuBLAS), 256 dequantize + cuBLAS; K = 100 (not a multiple of 32) takes quant_linear's own
    choice, the twin. The tiled kernel keeps its split counters in a per-layer cache, as
    QuantLinear does."""
    dn, rows = str(dtype).removeprefix("torch."), []
    shapes = ((64, 128), (32, 96)) if quick else ((4096, 4096), (4096, 11008))
    for bits, G, asym in ((4, 128, False), (4, 32, True), (8, 0, False), (8, 64, True))[:None if full else 1]:
        for N, K in shapes + ((16, 100),):
            for M in ((1, 3, 4, 16, 17, 256) if quick else (1, 3, 4, 16, 33, 100, 256)):
                x = torch.randn(M, K, device=dev, dtype=dtype)
                qw, sc, zp = _random_quant(N, K, bits, G, asym, dtype, dev, int8_min=-127)
                ref = quant_linear_ref(x, qw, sc, zp, bits, G)
                aligned = K % 32 == 0 and (G or K) % 32 == 0
                tc16 = dtype != torch.float32 and _tensor_cores(torch.device(dev))
                fits = tc16 and _quant_mma_fits(bits, G, K)
                via = ("twin" if not aligned else "mma" if fits and M <= QUANT_MMA_MAX_ROWS else
                       "GEMV" if M <= QUANT_MMA_MAX_ROWS else
                       "tiled mma" if fits and M < QUANT_GEMM_MAX_ROWS else "dequantize + cuBLAS")
                cache: dict = {}
                run = (lambda: quant_linear_cuda(x, qw, sc, zp, bits, G, cache)) if aligned else \
                    (lambda: quant_linear(x, qw, sc, zp, bits, G))
                y = run()
                t = _bench(run, dev)
                extra = ""
                if t and aligned:
                    w16 = torch.randn(N, K, device=dev, dtype=dtype)
                    t16 = _bench(lambda: x @ w16.T, dev)
                    extra = f" ({qw.numel() / t / 1e9:.0f} GB/s of weights, {t16 / t:.2f}x cuBLAS {dn})"
                name = f"{dn} {N}x{K} M={M} g={G}{' asym' if asym else ''}"
                rows.append((f"W{bits}A16 ({via}) {name}{extra}", _rel(y, ref), 1e3 * t))
    return rows


def _check_quant_mma(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """The mma kernel called directly (fp16/bf16), with 1 and 2 channel tiles per warp: a
    block's channels cut short (N = 24, 40, 33, 72, 17), a last loop step only partly inside
    K (K = 160, 288, 32: lanes past K read other codes, times x's zeros), groups by a shift (128,
    64, per channel) and by a division (192, 384, whose last group is partial), 1-8 rows
    (A's rows 8-15 left zero) and 9-16, 20 and 37 (chunks of 16 rows, the last one short),
    signed and asymmetric codes, K split over 2 or 3 blocks (the last split shorter, and
    with 37 rows over several tiles). Each case runs twice on one buffer of split counters:
    the same bits, the counters left zero. With one tile, the mma's portable twin too: on a
    GPU the instruction and the twin must agree (the fragment layouts); under kemu both are
    the twin. Then the folds (quant_mma_add_norm, quant_mma_silu_and_mul), below."""
    dn, rows = str(dtype).removeprefix("torch."), []
    if dtype == torch.float32 or not _tensor_cores(torch.device(dev)):
        return rows
    for bits, G, asym, N, K, M, tiles, splits in (
            (4, 0, False, 24, 160, 1, 1, 1), (4, 128, True, 40, 256, 5, 2, 2), (8, 192, False, 33, 288, 9, 2, 3),
            (4, 384, True, 72, 640, 16, 2, 3), (8, 0, True, 16, 512, 16, 1, 2), (8, 64, False, 8, 128, 3, 2, 1),
            (4, 128, False, 17, 256, 12, 1, 1), (4, 0, False, 16, 32, 2, 1, 1), (4, 128, True, 40, 256, 37, 2, 2),
            (8, 0, False, 24, 96, 20, 1, 1)):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        qw, sc, zp = _random_quant(N, K, bits, G, asym, dtype, dev)
        ref = quant_linear_ref(x, qw, sc, zp, bits, G)
        name = f"{dn} {N}x{K} M={M} g={G}{' asym' if asym else ''}"
        counters = torch.zeros(-(-M // 16) * -(-N // (16 * tiles)), device=dev, dtype=torch.int32)
        run = lambda t, portable: cuda_extension().quant_mma(x, qw, sc, zp, bits, G, t, splits, counters, portable)
        y, again = run(tiles, False), run(tiles, False)
        err = _rel(y, ref) if torch.equal(y, again) and not counters.any() else float("inf")
        rows.append((f"W{bits}A16 (mma, {tiles} tile{'s' * (tiles > 1)} a warp, K in {splits} "
                     f"split{'s' * (splits > 1)}) {name}", err, 0.0))
        if tiles == 1:
            rows.append((f"W{bits}A16 (mma's portable twin against the instruction) {name}", _rel(run(1, True), y), 0.0))
    # The fold (quant_mma_add_norm) must give the bits of quant_mma then rms_norm with the
    # residual: K split 1-3 ways, 1, 4 and 20 rows (two chunks, each normed by its own last
    # tile), channel tiles cut short (N = 40, 24) and a norm row of 257 16-byte chunks (N =
    # 2,056: a thread of the 256 takes two); twice on one counter buffer, left zero.
    ext = cuda_extension()
    for bits, G, asym, N, K, M, splits in ((4, 128, True, 40, 256, 1, 2), (8, 0, False, 24, 128, 4, 1),
                                           (4, 0, False, 2056, 128, 3, 1), (8, 64, True, 48, 192, 20, 3)):
        x, res = torch.randn(M, K, device=dev, dtype=dtype), torch.randn(M, N, device=dev, dtype=dtype)
        w = torch.randn(N, device=dev, dtype=dtype)
        qw, sc, zp = _random_quant(N, K, bits, G, asym, dtype, dev)
        counters = torch.zeros(-(-M // 16) * (-(-N // 32) + 1), device=dev, dtype=torch.int32)
        run = lambda: ext.quant_mma_add_norm(x, qw, sc, zp, bits, G, splits, counters, res, w, 1e-5)
        (h, r), (h2, r2) = run(), run()
        want = ext.rms_norm(ext.quant_mma(x, qw, sc, zp, bits, G, 2, splits, None, False), w, res, 1e-5)
        same = all(map(torch.equal, (h, r, h2, r2), (*want, *want))) and not counters.any()
        ref = fused_add_rms_norm_ref(quant_linear_ref(x, qw, sc, zp, bits, G), res, w, 1e-5)
        rows.append((f"W{bits}A16 (mma) + residual + RMSNorm in one launch, K in {splits} split"
                     f"{'s' * (splits > 1)} {dn} {N}x{K} M={M} g={G}{' asym' if asym else ''}",
                     max(_rel(h, ref[0]), _rel(r, ref[1])) if same else float("inf"), 0.0))
    # The SiLU epilogue (quant_mma_silu_and_mul) on [gate; up] weights of 2 Fu rows must give
    # the bits of quant_mma then silu_and_mul: Fu = 24 (the second 16-channel tile cut short), 40,
    # 1, 9 and 20 rows (two chunks), K in 1-3 splits; twice on one counter buffer, left zero.
    for bits, G, asym, Fu, K, M, splits in ((4, 128, True, 24, 256, 1, 2), (8, 0, False, 40, 128, 9, 1),
                                           (4, 0, False, 40, 384, 20, 3), (8, 64, True, 24, 192, 4, 3)):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        qw, sc, zp = _random_quant(2 * Fu, K, bits, G, asym, dtype, dev)
        counters = torch.zeros(-(-M // 16) * -(-Fu // 16), device=dev, dtype=torch.int32)
        run = lambda: ext.quant_mma_silu_and_mul(x, qw, sc, zp, bits, G, splits, counters)
        y, again = run(), run()
        want = ext.silu_and_mul(*ext.quant_mma(x, qw, sc, zp, bits, G, 2, splits, None, False).chunk(2, dim=-1))
        same = torch.equal(y, want) and torch.equal(again, want) and not counters.any()
        ref = silu_and_mul_ref(*quant_linear_ref(x, qw, sc, zp, bits, G).chunk(2, dim=-1))
        rows.append((f"W{bits}A16 (mma) + SiLU x up in one launch, K in {splits} split{'s' * (splits > 1)} "
                     f"{dn} 2x{Fu}x{K} M={M} g={G}{' asym' if asym else ''}", _rel(y, ref) if same else float("inf"), 0.0))
    return rows


def _check_dense_mma(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """The mma kernel on dense fp16/bf16 weights (dense_mma): 1-8, 9-16, 20 and 37 rows, 1 and 2
    channel tiles a warp, N cut short (24, 40, 17), a last loop step partly inside K (K = 40,
    168: lanes past K read other weights, times x's zeros), K past one block's loop; with one
    tile the portable twin against the instruction as well. Then the fold, below."""
    dn, rows = str(dtype).removeprefix("torch."), []
    if dtype == torch.float32 or not _tensor_cores(torch.device(dev)):
        return rows
    cases = ((24, 168, 1, 1), (40, 256, 5, 2), (17, 40, 12, 1), (32, 64, 16, 2), (24, 64, 37, 1), (40, 96, 20, 2))
    if not quick:
        cases += ((4096, 4096, 1, 2), (11008, 4096, 4, 2), (4096, 11008, 16, 1))
    for N, K, M, tiles in cases:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5
        ref = (x.float() @ w.float().T).to(dtype)
        name = f"{dn} {N}x{K} M={M}"
        run = lambda: cuda_extension().dense_mma(x, w, tiles, False)
        y = run()
        rows.append((f"dense mma ({tiles} tile{'s' * (tiles > 1)} a warp) {name}", _rel(y, ref), 1e3 * _bench(run, dev)))
        if tiles == 1:
            twin = cuda_extension().dense_mma(x, w, 1, True)
            rows.append((f"dense mma (portable twin against the instruction) {name}", _rel(twin, y), 0.0))
    # The fold (dense_mma_add_norm): the bits of dense_mma then rms_norm with the residual, at
    # 1, 4 and 20 rows (two chunks of rows), 1 and 2 tiles a warp, tiles cut short (N = 40);
    # twice on one counter buffer, left zero.
    ext = cuda_extension()
    for N, K, M, tiles in ((40, 168, 1, 1), (48, 256, 4, 2), (64, 96, 20, 1)):
        x, res = torch.randn(M, K, device=dev, dtype=dtype), torch.randn(M, N, device=dev, dtype=dtype)
        w, nw = torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5, torch.randn(N, device=dev, dtype=dtype)
        counters = torch.zeros(-(-M // 16) * (-(-N // (16 * tiles)) + 1), device=dev, dtype=torch.int32)
        run = lambda: ext.dense_mma_add_norm(x, w, tiles, counters, res, nw, 1e-5)
        (h, r), (h2, r2) = run(), run()
        want = ext.rms_norm(ext.dense_mma(x, w, tiles, False), nw, res, 1e-5)
        same = all(map(torch.equal, (h, r, h2, r2), (*want, *want))) and not counters.any()
        ref = fused_add_rms_norm_ref((x.float() @ w.float().T).to(dtype), res, nw, 1e-5)
        rows.append((f"dense mma + residual + RMSNorm in one launch ({tiles} tile{'s' * (tiles > 1)} a warp) "
                     f"{dn} {N}x{K} M={M}", max(_rel(h, ref[0]), _rel(r, ref[1])) if same else float("inf"), 0.0))
    return rows


def _check_quant_gemv(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """The GEMV called directly: x staged in several tiles (5 chunks each, the last one
    partial), an odd channel count (the last warp's second channel absent), 5 rows (which
    quant_linear sends to the mma kernel in a 16-bit dtype), groups of 3 and 6 chunks (a
    division, not a shift)."""
    dn, rows = str(dtype).removeprefix("torch."), []
    for bits, G, asym in ((4, 64, False), (4, 96, True), (8, 96, False), (8, 0, True))[:None if full else 2]:
        N, K, M = 33, 384, 5
        x = torch.randn(M, K, device=dev, dtype=dtype)
        qw, sc, zp = _random_quant(N, K, bits, G, asym, dtype, dev)
        y = cuda_extension().quant_gemv(x, qw, sc, zp, bits, G, 5)
        rows.append((f"W{bits}A16 (GEMV, x in tiles of 5 chunks) {dn} {N}x{K} M={M} g={G}{' asym' if asym else ''}",
                     _rel(y, quant_linear_ref(x, qw, sc, zp, bits, G)), 0.0))
    return rows


def _check_quant_gemm(dev: str, dtype: torch.dtype, quick: bool, full: bool) -> Rows:
    """The tiled mma kernel called directly (fp16/bf16): tiles of 64 rows (33, 70: the second
    tile partial, 130: three) and of 32 (17, 20), channel tiles cut short (N = 72, 16, 40) and
    a second one partial (N = 130: 2 channels, 200: 72), a last loop step partly inside K (K = 352, 288,
    608: lanes past K read other codes, times x's zeros), groups by a shift (128, 64, per
    channel) and by a division (384), signed and asymmetric codes, K split 1-3 ways, and
    splits of 6 and 10 loop steps (the ring of shared-memory stages wraps around). Each
    case runs twice on one buffer of split counters: the second result must equal the first
    to the bit and the counters be left zero (the last split resets them; the merge adds
    the splits in a fixed order). With 32-row tiles, the mma's portable twin too."""
    dn, rows = str(dtype).removeprefix("torch."), []
    if dtype == torch.float32 or not _tensor_cores(torch.device(dev)):
        return rows
    for bits, G, asym, N, K, M, splits in ((4, 128, False, 72, 352, 70, 3), (8, 64, True, 200, 288, 33, 2),
                                           (4, 0, True, 16, 512, 130, 2), (8, 0, False, 40, 608, 20, 1),
                                           (4, 384, False, 130, 1536, 17, 2)):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        qw, sc, zp = _random_quant(N, K, bits, G, asym, dtype, dev)
        counters = torch.zeros(_quant_gemm_tiles(M, N), device=dev, dtype=torch.int32)
        run = lambda portable: cuda_extension().quant_gemm(x, qw, sc, zp, bits, G, splits, counters, portable)
        y, again = run(False), run(False)
        name = f"{dn} {N}x{K} M={M} g={G}{' asym' if asym else ''}"
        err = _rel(y, quant_linear_ref(x, qw, sc, zp, bits, G))
        rows.append((f"W{bits}A16 (tiled mma, K in {splits} split{'s' * (splits > 1)}; twice on one counter buffer) "
                     f"{name}", err if torch.equal(y, again) and not counters.any() else float("inf"), 0.0))
        if M <= 32:
            rows.append((f"W{bits}A16 (tiled mma's portable twin against the instruction) {name}",
                         _rel(run(True), y), 0.0))
    return rows


def self_check(device: str = "cuda", quick: bool = False) -> Rows:
    """Every kernel and every dispatch case against the reference twins on fresh random
    inputs, in fp16, bf16 and fp32 -> rows (case, max error relative to max |reference|, ms
    per call; 0 off a GPU). Each _check_* function above names its cases. quick: shapes small
    enough for an emulator, and in fp32 only the first few cases of each check."""
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        full = dtype != torch.float32 or not quick          # all of a check's cases
        for check in (_check_norms, _check_rope_and_cache, _check_decode_attention, _check_decode_rope,
                      _check_prefill_attention, _check_quant_linear, _check_quant_mma, _check_dense_mma,
                      _check_quant_gemv, _check_quant_gemm):
            rows += check(device, dtype, quick, full)
    return rows


if __name__ == "__main__":
    # The self-check on this machine's GPU. The ptxas report (no GPU needed) and the kernels'
    # timings at their goals' sizes are tools/kernel_bench.py's.
    if not torch.cuda.is_available():
        print("kernels.py: no CUDA GPU; the kernels run on the CPU under the emulator instead: "
              "python ../shared/tools/kemu/run_self_check.py")
        sys.exit(0)
    results = self_check()
    worst = max(e for _, e, _ in results)
    for name, err, ms in results:
        print(f"{name:90s} max rel err {err:.2e}  {ms:8.3f} ms")
    print(f"kernels.py: {len(results)} checks on {torch.cuda.get_device_name()}, worst relative error {worst:.2e}")
    sys.exit(0 if worst < 2e-2 else 1)
