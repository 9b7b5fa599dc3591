"""quant.py: post-training weight quantization for nanoserve: RTN, GPTQ and AWQ.

Quantization is two steps (as in gpt-fast): compute quantized tensors from a float
model, then swap each nn.Linear for a QuantLinear that holds them. Weights only: the
activations stay in floating point (W8A16, W4A16, W3A16). At batch 1 decode reads every
weight once per token, so 4-bit weights move 4x fewer bytes than bf16: the gain is large
for memory-bound decode and small for compute-bound prefill.

    python quant.py --model models/nanocoder-5m --method gptq --bits 4 --group-size 32 --out /tmp/q4
    python quant.py ... --format gptq      (or awq: the layouts the Hugging Face hub has)

The layer that runs a quantized checkpoint (nanoserve.QuantLinear) and its packed
format live with the model in nanoserve.py; this module holds the algorithms that
produce the codes, the layer-by-layer calibration and the command line. Imports point
one way: quant -> nanoserve -> kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

import kernels
import nanoserve
from nanoserve import LlamaForCausalLM, QuantLinear, set_module


# ============================================================================ round to nearest
# Symmetric: s = max|w| / (2^(b-1) - 1), q = round(w / s) in [-(2^(b-1) - 1), 2^(b-1) - 1],
# w ~ s * q. Asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s),
# q = round(w / s) + z in [0, 2^b - 1], w ~ s * (q - z). Either way |w - w_hat| <= s / 2.
# Scales are per output channel (group_size 0) or per group of group_size input channels;
# an in_features that is not a multiple of group_size gets a smaller last group.

def _check(W: Tensor, bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0: per output channel), got {group_size}")
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")


def _grouped(W: Tensor, group_size: int) -> tuple[Tensor, int]:
    """(out, in) -> (out, n_groups, G), the last group padded by repeating its last column
    (which changes neither its max|w| nor its min and max)."""
    out, inp = W.shape
    G = group_size or inp
    n = math.ceil(inp / G)
    if n * G > inp:
        W = torch.cat([W, W[:, -1:].expand(out, n * G - inp)], dim=1)
    return W.view(out, n, G), G


def find_params(W: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Scales (out, n_groups) and zero points (or None) for W (out, in)."""
    Wg, _ = _grouped(W.float(), group_size)
    if symmetric:
        scale = Wg.abs().amax(-1) / (2 ** (bits - 1) - 1)
        return scale.clamp(min=1e-10), None
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-10)
    return scale, torch.round(-lo / scale)


def quantize_with(W: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """Integer codes (out, in) int16 for W given per-group scale/zero (out, n_groups)."""
    G = group_size or W.shape[1]
    s = scale.repeat_interleave(G, dim=1)[:, :W.shape[1]]                   # (out, in)
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(W.float() / s), -qmax, qmax).to(torch.int16)
    z = zero.repeat_interleave(G, dim=1)[:, :W.shape[1]]
    return torch.clamp(torch.round(W.float() / s) + z, 0, 2 ** bits - 1).to(torch.int16)


def quantize_rtn(W: Tensor, bits: int, group_size: int = 0, symmetric: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round to nearest: -> (codes int16 (out, in), scale (out, n_groups), zero or None)."""
    _check(W, bits, group_size)
    scale, zero = find_params(W, bits, group_size, symmetric)
    return quantize_with(W, scale, zero, bits, group_size), scale, zero


# ============================================================================ GPTQ
# GPTQ (Frantar et al. 2022) minimises the layer's output error ||W X - W_hat X||^2 over
# calibration inputs X, one column (input channel) at a time. With H = 2 X X^T, after
# column i is rounded, the error it leaves is best compensated by moving the columns not
# yet quantized:  W[:, i:] -= (w_i - q_i) / [H^-1]_ii * [H^-1]_i,i:   (Optimal Brain Surgeon).
# Taking the Cholesky factor U of H^-1 (upper) gives every needed row [H^-1]_i,i: with the
# eliminations of earlier columns already applied, so the loop needs no matrix inverse
# per step. "Lazy batch" updates apply the correction inside a block of columns first and
# to the rest of the matrix once per block (memory-bound -> compute-bound).

def gptq_quantize(W: Tensor, H: Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """W (out, in), H (in, in) = 2 X X^T / N -> (codes (out, in) int16, scale, zero)."""
    _check(W, bits, group_size)
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0                        # inputs never active: weight irrelevant
    H[dead, dead] = 1
    W[:, dead] = 0
    G = group_size or n
    if act_order or not group_size:
        # Scales fixed up front from the original weights ("static groups"), so that with
        # act_order the columns can go in any order and still share their group's scale.
        scale, zero = find_params(W, bits, group_size, symmetric)
    else:
        scale = torch.zeros(W.shape[0], math.ceil(n / G), device=W.device)
        zero = None if symmetric else torch.zeros_like(scale)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=W.device)    # dampening
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W, dtype=torch.int16)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1, device=W.device)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])                                  # original column index
            g = col // G
            if not act_order and group_size and col % G == 0:
                # A new group: its scale from the weights as the updates have left them.
                rest = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :min(G, n - col)]
                s, z = find_params(rest, bits, 0, symmetric)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            w = W1[:, i]
            q = quantize_with(w[:, None], scale[:, g:g + 1], None if zero is None else zero[:, g:g + 1], bits, 0)
            codes[:, i1 + i] = q[:, 0]
            Q[:, i1 + i] = kernels.dequantize_ref(q, scale[:, g:g + 1], None if zero is None else zero[:, g:g + 1], 0)[:, 0]
            err = (w - Q[:, i1 + i]) / U[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i:i2][None, :]  # compensate inside block
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]                              # lazy batch update
    inv = torch.argsort(perm)
    return codes[:, inv], scale, zero


# ============================================================================ AWQ
# AWQ (Lin et al. 2023): a few input channels see much larger activations than the rest,
# and their weights matter most. Scaling such a channel's weights up by s before rounding
# (and its input down by s) shrinks their relative rounding error. Per input channel
# s = mean|x|^alpha, alpha searched on a grid to minimise the output error
# ||W X - Q(W diag(s)) diag(s)^-1 X||; the 1/s is folded into the operation that produces
# X (an RMSNorm weight, or the rows of the preceding projection), so inference is unchanged.

def awq_search_scale(weights: list[Tensor], X: Tensor, bits: int, group_size: int, symmetric: bool,
                     grid: int = 20) -> tuple[Tensor, float]:
    """weights: linears sharing the input X (N, in) -> (s (in,), best alpha)."""
    x_mean = X.abs().float().mean(0)                                  # (in,)
    ref = [X @ W.float().T for W in weights]
    best, best_s, best_a = float("inf"), torch.ones_like(x_mean), 0.0
    for k in range(grid + 1):
        a = k / grid
        s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()                            # keep the scales centred
        err = 0.0
        for W, r in zip(weights, ref):
            c, sc, z = quantize_rtn(W.float() * s, bits, group_size, symmetric)
            Wq = kernels.dequantize_ref(c, sc, z, group_size) / s
            err += (X @ Wq.T - r).pow(2).mean().item()
        if err < best:
            best, best_s, best_a = err, s, a
    return best_s, best_a


# ============================================================================ calibration
# Layer by layer, in order: the calibration batch's hidden states go through the layers
# already quantized, so each layer is calibrated on what it will really see. Within a
# layer the projections go in four stages (q/k/v, o, gate/up, down); for GPTQ each
# stage's inputs are recorded by forward hooks with the earlier stages already quantized.

STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _record_inputs(layer: nn.Module, names: tuple[str, ...], run: Callable[[], None]) -> dict[str, Tensor]:
    seen: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: seen[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _awq_stage(layer: nn.Module, stage: tuple[str, ...], X: Tensor, bits: int, group_size: int,
               symmetric: bool) -> float | None:
    """Search the AWQ scale for one stage, fold it into the operation before it; -> alpha."""
    a = layer.self_attn
    if stage[0] == "self_attn.o_proj" and a.n_heads != a.n_kv:
        return None      # with GQA a v_proj row feeds several o_proj inputs: no exact fold (as AutoAWQ)
    weights = [layer.get_submodule(n).weight for n in stage]
    s, alpha = awq_search_scale(weights, X, bits, group_size, symmetric)
    for n in stage:
        layer.get_submodule(n).weight.mul_(s)                         # W diag(s)
    prev = {"self_attn.q_proj": layer.input_layernorm, "self_attn.o_proj": a.v_proj,
            "mlp.gate_proj": layer.post_attention_layernorm, "mlp.down_proj": layer.mlp.up_proj}[stage[0]]
    if prev.weight.dim() == 1:
        prev.weight.div_(s)                                           # RMSNorm weight
    else:
        prev.weight.div_(s[:, None])                                  # rows of the producer
        if prev.bias is not None:
            prev.bias.div_(s)                                         # and its bias (Qwen2's v_proj)
    return alpha


@torch.no_grad()
def quantize_model(model: LlamaForCausalLM, calib: Tensor, method: str, bits: int, group_size: int,
                   symmetric: bool = True, act_order: bool = False,
                   progress: Callable[[str], None] = lambda s: None) -> dict:
    """Quantize every decoder projection of `model` in place (nn.Linear -> QuantLinear).

    Uses the model's public pieces: model.embed_tokens, each layer's forward_dense (plain
    causal attention, no KV cache) and dense_rope. calib: (B, T) token ids.
    method: rtn | gptq | awq. -> the quantize_config dict a checkpoint records.
    """
    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(f"method must be rtn, gptq or awq, got {method!r}")
    dtype = model.model.embed_tokens.weight.dtype
    layers = model.model.layers
    rope = model.dense_rope(calib.shape[1], calib.device)
    x = model.model.embed_tokens(calib).float() if method != "rtn" else None
    alphas: list[float | None] = []                   # AWQ's chosen alpha per stage
    for li, layer in enumerate(layers):
        if method != "rtn":
            layer.float()
        if method == "awq":
            # All scales first (each stage sees the already-scaled float layer), folded into
            # the operations before them while those are still float; then round.
            for stage in STAGES:
                inputs = _record_inputs(layer, stage[:1], lambda: layer.forward_dense(x, rope))
                alphas.append(_awq_stage(layer, stage, inputs[stage[0]], bits, group_size, symmetric))
        for stage in STAGES:
            if method == "gptq":
                inputs = _record_inputs(layer, stage, lambda: layer.forward_dense(x, rope))
            for name in stage:
                lin = layer.get_submodule(name)
                W = lin.weight.float()
                if method == "gptq":
                    X = inputs[name].float()
                    H = 2 * X.T @ X / X.shape[0]
                    codes, scale, zero = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order)
                else:
                    codes, scale, zero = quantize_rtn(W, bits, group_size, symmetric)
                set_module(layer, name, QuantLinear.from_codes(codes, scale, zero, bits, group_size,
                                                                torch.float32, bias=lin.bias))
        if method != "rtn":
            x = layer.forward_dense(x, rope)            # the next layer sees quantized outputs
        layer.to(dtype)
        progress(f"layer {li + 1}/{len(layers)} quantized ({method}, {bits} bits, group {group_size})")
    cfg = {"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric,
           "act_order": act_order}
    if method == "awq":
        cfg["awq_alpha"] = alphas
    return cfg


# ============================================================================ 2:4 sparsity
# 2:4 structured sparsity: in every group of 4 consecutive input weights of a row, 2 are
# zero. NVIDIA's sparse tensor cores (Ampere and later) store the 2 kept values plus 2-bit
# indices and skip the zeros, about twice the math rate of dense; unstructured sparsity at
# the same 50% has no such hardware path. Which 2 to keep:
#   magnitude  the 2 largest |W_ij| of each group;
#   Wanda      (Sun et al., 2023) the 2 largest |W_ij| * ||X_j||_2, X the layer's calibration
#              inputs: a small weight on a loud input channel matters more than its size says.
# Layer by layer, like GPTQ: each layer is pruned on the inputs the already-pruned layers
# before it produce. Quantization, when asked for, comes after pruning and is symmetric
# (code 0 is exactly 0.0, so the pattern survives).

def prune_24(W: Tensor, score: Tensor) -> Tensor:
    """W (out, in) with the 2 lowest-scoring of every 4 consecutive inputs set to 0; in % 4 == 0."""
    out, inp = W.shape
    if inp % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {inp}")
    keep = score.reshape(out, inp // 4, 4).topk(2, dim=-1).indices                # (out, in/4, 2)
    mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool, device=W.device).scatter_(-1, keep, True)
    return W * mask.reshape(out, inp)


@torch.no_grad()
def sparsify_model(model: LlamaForCausalLM, calib: Tensor, prune: str, bits: int = 16, group_size: int = 0,
                   progress: Callable[[str], None] = lambda s: None) -> dict:
    """Prune every decoder projection of `model` to 2:4 in place (magnitude or Wanda), then,
    for bits 8 or 4, quantize it (symmetric RTN: nn.Linear -> QuantLinear). calib: (B, T)
    token ids (Wanda's input norms). -> the sparsity config a checkpoint records."""
    if prune not in ("magnitude", "wanda"):
        raise ValueError(f"prune must be magnitude or wanda, got {prune!r}")
    if bits not in (16, 8, 4):
        raise ValueError(f"bits must be 16, 8 or 4 with 2:4 sparsity, got {bits}")
    dtype = model.model.embed_tokens.weight.dtype
    rope = model.dense_rope(calib.shape[1], calib.device)
    x = model.model.embed_tokens(calib).float()
    for li, layer in enumerate(model.model.layers):
        layer.float()
        for stage in STAGES:
            inputs = _record_inputs(layer, stage, lambda: layer.forward_dense(x, rope)) if prune == "wanda" else {}
            for name in stage:
                lin = layer.get_submodule(name)
                W = lin.weight.float()
                score = W.abs() if prune == "magnitude" else W.abs() * inputs[name].float().norm(dim=0)[None, :]
                W = prune_24(W, score)
                if bits < 16:
                    codes, scale, _ = quantize_rtn(W, bits, group_size, symmetric=True)
                    set_module(layer, name, QuantLinear.from_codes(codes, scale, None, bits, group_size,
                                                                    torch.float32, bias=lin.bias))
                else:
                    lin.weight.copy_(W)
        x = layer.forward_dense(x, rope)                # the next layer sees pruned outputs
        layer.to(dtype)
        progress(f"layer {li + 1}/{len(model.model.layers)} pruned to 2:4 ({prune}"
                 f"{f', int{bits}' if bits < 16 else ''})")
    return {"sparsity": "2:4", "prune": prune, "bits": bits, "group_size": group_size}


# ============================================================================ hub formats
# `--format gptq` / `--format awq` write the layouts AutoGPTQ/GPTQModel and AutoAWQ write
# (and transformers and vLLM load; nanoserve reads them back in nanoserve.convert_hub_linear).

def pack_int32(values: Tensor, bits: int, along_rows: bool, order: tuple[int, ...] | None = None) -> Tensor:
    """Unsigned fields -> int32 words of 32 / bits fields: (r, c) -> (r / pf, c) along the
    rows, (r, c / pf) along the columns; order[k] is the position packed into field k (AWQ)."""
    pf = 32 // bits
    v = values.to(torch.int64)
    if along_rows:
        fields = v.view(-1, pf, v.shape[1])                                        # (r / pf, pf, c)
        shifts = torch.arange(0, 32, bits)[None, :, None]
        words = (fields << shifts).sum(1)
    else:
        fields = v.view(v.shape[0], -1, pf)                                        # (r, c / pf, pf)
        if order is not None:
            fields = fields[..., list(order)]
        words = (fields << torch.arange(0, 32, bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)   # two's complement


def hub_format_state(model: LlamaForCausalLM, fmt: str, quant_config: dict) -> tuple[dict[str, Tensor], dict]:
    """A quantized model's state dict in GPTQ or AWQ layout, and the quantization_config
    that goes in config.json."""
    bits, G = quant_config["bits"], quant_config["group_size"]
    if bits not in ((4, 8) if fmt == "gptq" else (4,)):
        raise ValueError(f"--format {fmt} needs --bits {'4 or 8' if fmt == 'gptq' else '4'}, got {bits}")
    state = model.state_dict()
    zero_one_seen = False
    for name in nanoserve.quantized_linear_names(model):
        m: QuantLinear = model.get_submodule(name)
        for k in ("qweight", "scales", "zeros", "bias", "perm"):
            state.pop(f"{name}.{k}", None)
        codes = m.codes().to(torch.int64)                                         # (out, in)
        half = 1 << (bits - 1)
        if m.symmetric:
            q, zero = codes + half, torch.full_like(m.scales, half, dtype=torch.int64)
        else:
            q, zero = codes, m.zeros.round().to(torch.int64)
        pf = 32 // bits
        if (G and m.in_features % G) or m.in_features % pf or m.out_features % pf:
            raise ValueError(f"{name}: {m.in_features} -> {m.out_features} does not fit the {fmt} layout "
                             f"(multiples of {pf}, in_features of group_size {G})")
        q, zero, scales = q.t().contiguous(), zero.t().contiguous(), m.scales.t().to(torch.float16).contiguous()
        if fmt == "gptq":
            zero_one_seen |= bool((zero == 0).any())
            state[f"{name}.qweight"] = pack_int32(q, bits, along_rows=True)
            state[f"{name}.qzeros"] = zero                                         # packed below
            state[f"{name}.g_idx"] = (torch.arange(m.in_features) // (G or m.in_features)).to(torch.int32)
        else:
            state[f"{name}.qweight"] = pack_int32(q, bits, along_rows=False, order=nanoserve.AWQ_ORDER)
            state[f"{name}.qzeros"] = pack_int32(zero, bits, along_rows=False, order=nanoserve.AWQ_ORDER)
        state[f"{name}.scales"] = scales
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.to(torch.float16)
    if fmt == "gptq":
        # The original format stores zero - 1 (a zero point of 0 does not fit): GPTQModel's
        # gptq_v2 stores the zero itself and is written when a zero point is 0.
        offset = 0 if zero_one_seen else 1
        for k in [k for k in state if k.endswith(".qzeros")]:
            state[k] = pack_int32((state[k] - offset) & ((1 << bits) - 1), bits, along_rows=False)
        qc = {"quant_method": "gptq", "bits": bits, "group_size": G or -1, "desc_act": False,
              "sym": bool(quant_config.get("symmetric", True)), "checkpoint_format": "gptq_v2" if offset == 0 else "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": bits, "group_size": G or -1, "zero_point": True, "version": "gemm"}
    return state, qc


# ============================================================================ checkpoints

def save_quantized(model: LlamaForCausalLM, src_dir: Path, out_dir: Path, quant_config: dict,
                   fmt: str = "nanoserve") -> None:
    """Write a loadable checkpoint: the source's config and tokenizer files and
    model.safetensors, in nanoserve's layout (qweight/scales/zeros, with
    quantize_config.json) or in GPTQ's or AWQ's (config.json's quantization_config)."""
    if fmt not in ("nanoserve", "gptq", "awq"):
        raise ValueError(f"format must be nanoserve, gptq or awq, got {fmt!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src_dir / f).is_file():
            shutil.copy(src_dir / f, out_dir / f)
    if quant_config.get("sparsity") and fmt != "nanoserve":
        raise ValueError("a 2:4-sparse checkpoint is written in nanoserve's format only")
    if quant_config.get("sparsity"):
        (out_dir / "sparsity_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")
        if quant_config["bits"] == 16:                  # dense layout, zeros in the 2:4 pattern
            state = {k: v for k, v in model.state_dict().items()
                     if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
            nanoserve.save_safetensors(state, out_dir / "model.safetensors", {"format": "pt"})
            return
        quant_config = {"method": "rtn", "bits": quant_config["bits"], "group_size": quant_config["group_size"],
                        "symmetric": True, "act_order": False, "sparsity": "2:4"}
    if fmt != "nanoserve":
        state, qc = hub_format_state(model, fmt, quant_config)
        state = {k: v for k, v in state.items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        config = json.loads((out_dir / "config.json").read_text())
        (out_dir / "config.json").write_text(json.dumps(dict(config, quantization_config=qc), indent=2) + "\n")
        nanoserve.save_safetensors(state, out_dir / "model.safetensors", {"format": "pt"})
        return
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    nanoserve.save_safetensors(state, out_dir / "model.safetensors",
                               {"format": "pt", "quantization": json.dumps(quant_config)})
    (out_dir / "quantize_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")


def read_calibration(path: str | None, tokenizer, sample: Callable[[int, int], list[list[int]]],
                     n: int, seq_len: int) -> Tensor:
    """(n, seq_len) token ids: windows of a text file, or sequences the model samples itself."""
    if path:
        if tokenizer is None:
            raise ValueError("--calib needs a model with a tokenizer.model")
        ids = tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace"))
        if len(ids) < seq_len + 1:
            raise ValueError(f"{path}: {len(ids)} tokens, need at least {seq_len + 1}")
        starts = torch.linspace(0, len(ids) - seq_len - 1, n).long().tolist()
        return torch.tensor([ids[s:s + seq_len] for s in starts])
    return torch.tensor(sample(n, seq_len))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Quantize a nanoserve checkpoint (weights only).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", choices=["rtn", "gptq", "awq", "sparse24"], default="gptq",
                    help="sparse24: prune every projection to 2:4 (--prune), then quantize if --bits < 16")
    ap.add_argument("--prune", choices=["magnitude", "wanda"], default="wanda", help="sparse24's criterion")
    ap.add_argument("--bits", type=int, choices=[16, 8, 4, 3], default=None,
                    help="4 by default; 16 (sparse24 only): prune without quantizing")
    ap.add_argument("--group-size", type=int, default=0, help="input channels per scale; 0: per channel")
    ap.add_argument("--asymmetric", action="store_true", help="zero points (asymmetric quantization)")
    ap.add_argument("--act-order", action="store_true", help="GPTQ: columns in order of decreasing H_ii")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=["nanoserve", "gptq", "awq"], default="nanoserve",
                    help="checkpoint layout: nanoserve's, or GPTQ's / AWQ's as the Hugging Face hub has them")
    ap.add_argument("--calib", default=None, help="text file for calibration (default: model samples)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        if args.group_size < 0:
            raise ValueError(f"--group-size must be >= 0, got {args.group_size}")
        bits = args.bits or 4
        if args.method == "sparse24" and bits not in (16, 8, 4):
            raise ValueError(f"--method sparse24 takes --bits 16 (no quantization), 8 or 4, got {bits}")
        if args.method != "sparse24" and bits == 16:
            raise ValueError("--bits 16 (no quantization) is for --method sparse24")
        llm = nanoserve.LLM(args.model, device="cpu", dtype="float32")
        model, tok = llm.engine.model, llm.engine.tokenizer
        L = min(args.calib_len, llm.engine.max_model_len - 1)

        def sample(n: int, length: int) -> list[list[int]]:
            bos = model.config.bos_token_id or 0
            outs = llm.generate([[bos]] * n, [nanoserve.SamplingParams(temperature=1.0, max_tokens=length - 1,
                                                                       ignore_eos=True, seed=i) for i in range(n)])
            return [[bos] + o.token_ids for o in outs]

        print(f"[quant] calibration: {args.calib or 'samples from the model'}", file=sys.stderr)
        calib = read_calibration(args.calib, tok, sample, args.calib_samples, L)
        def report(line: str) -> None:
            print(f"[quant] {line}", file=sys.stderr)

        if args.method == "sparse24":
            cfg = sparsify_model(model, calib, args.prune, bits, args.group_size, progress=report)
        else:
            cfg = quantize_model(model, calib, args.method, bits, args.group_size, not args.asymmetric,
                                 args.act_order, progress=report)
        save_quantized(model, Path(args.model), Path(args.out), cfg, args.format)
        print(f"[quant] wrote {args.out}", file=sys.stderr)
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"quant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
