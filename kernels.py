"""kernels.py: the compute kernels nanoserve's model runs on, each with its PyTorch twin.

Every op here has one *reference* function written in plain PyTorch. The reference is
the CPU path and the oracle a hand-written CUDA kernel is tested against. One dispatch
function per op (at the bottom) decides, once and visibly, which path runs.

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

def rope_cos_sin(head_dim: int, max_positions: int, theta: float,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Tables for RoPE. Frequency i rotates dims (i, i + head_dim/2) by angle p * theta^(-2i/d)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)                    # (P, head_dim)
    return angles.cos().float().to(device), angles.sin().float().to(device)


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
    """
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slot_mapping] = v


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
    """
    T, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    ctx = context_lens.tolist()
    out = torch.empty_like(q)
    decode = [s for s, n in enumerate(q_lens) if n == 1]
    if decode:
        # All single-query sequences at once: pad their contexts to the longest one.
        idx = torch.tensor(decode, device=q.device)
        max_len = max(ctx[s] for s in decode)
        bs = k_cache.shape[1]
        tables = block_tables[idx, : (max_len + bs - 1) // bs].long()     # (B, nb)
        k = k_cache[tables].flatten(1, 2)[:, :max_len].float()              # (B, L, n_kv, hd)
        v = v_cache[tables].flatten(1, 2)[:, :max_len].float()
        qd = q[query_start_loc[idx].long()].float().view(len(decode), n_kv, group, head_dim)
        scores = torch.einsum("bkgd,blkd->bkgl", qd, k) * scale            # (B, n_kv, G, L)
        lens = context_lens[idx].to(q.device)
        pad = torch.arange(max_len, device=q.device)[None, :] >= lens[:, None]  # (B, L)
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        o = torch.einsum("bkgl,blkd->bkgd", scores.softmax(-1), v)         # (B, n_kv, G, hd)
        out[query_start_loc[idx].long()] = o.reshape(len(decode), n_heads, head_dim).to(q.dtype)
    for s, n in enumerate(q_lens):
        if n == 1:
            continue
        # A multi-query sequence (prefill chunk or verification window): dense causal
        # attention of its n queries over its whole cached context.
        start = int(query_start_loc[s])
        k = gather_kv_ref(k_cache, block_tables[s], ctx[s]).float()        # (L, n_kv, hd)
        v = gather_kv_ref(v_cache, block_tables[s], ctx[s]).float()
        qs = q[start:start + n].float().view(n, n_kv, group, head_dim)
        scores = torch.einsum("qkgd,lkd->kgql", qs, k) * scale             # (n_kv, G, n, L)
        q_pos = torch.arange(ctx[s] - n, ctx[s], device=q.device)
        mask = torch.arange(ctx[s], device=q.device)[None, :] > q_pos[:, None]  # (n, L)
        scores = scores.masked_fill(mask, float("-inf"))
        o = torch.einsum("kgql,lkd->qkgd", scores.softmax(-1), v)          # (n, n_kv, G, hd)
        out[start:start + n] = o.reshape(n, n_heads, head_dim).to(q.dtype)
    return out


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


def quant_linear_ref(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None,
                     group_size: int) -> Tensor:
    """y = x W_hat^T with W_hat dequantized on the fly: (..., in) -> (..., out).

    A W4A16 kernel does the same while reading only the packed 4-bit codes from memory,
    which is why int4 speeds up memory-bound decode."""
    return F.linear(x, dequantize_ref(codes, scales, zeros, group_size).to(x.dtype))


# ----------------------------------------------------------------------------- dispatch
# The model calls only these names. Today every one of them is the reference twin: the
# CUDA kernels that will replace them on a GPU are checked against these functions.

rms_norm = rms_norm_ref
fused_add_rms_norm = fused_add_rms_norm_ref
silu_and_mul = silu_and_mul_ref
rotary_embedding = rotary_embedding_ref
reshape_and_cache = reshape_and_cache_ref
paged_attention = paged_attention_ref
quant_linear = quant_linear_ref


if __name__ == "__main__":
    print("kernels.py: CUDA kernels are not written yet; the PyTorch reference path is in use.")
