"""nanoserve: a minimal, readable LLM inference server in the style of vLLM.

Read top to bottom, this file follows a request's path through a modern inference server:

    config -> weights loading -> tokenizer -> model -> paged KV cache -> sampling
    -> scheduler -> model runner -> engine -> speculative decoding -> the LLM API
    -> model cascade -> CLI

The HTTP server (server.py) and tensor parallelism (parallel.py) stand beside this file;
the CLI and the engine import them where a user asks for them.

The two phases of inference set the design. *Prefill* pushes a whole prompt through
the model at once: many tokens per weight read, compute-bound. *Decode* makes one
token per sequence per step: every weight is read for a single token, so a step costs
what it takes to stream the weights from memory (memory-bound). Batching many
sequences' decode steps together shares that weight read; the KV cache, paged into
fixed-size blocks, is what makes it possible to hold many sequences at once, and the
scheduler is what keeps the batch full.

Usage:
    python nanoserve.py --prompt "def fibonacci(n):"
    python nanoserve.py --serve          # the OpenAI-compatible HTTP server, server.py
    from nanoserve import LLM, SamplingParams
Benchmarks live in tools/bench.py, the quantization algorithms in quant.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mmap
import numbers
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "models" / "nanocoder-5m"
DEFAULT_DRAFT = HERE / "models" / "nanocoder-1m-draft"


# ============================================================================ config

MODEL_TYPES = ("llama", "mistral", "qwen2")             # Llama-family decoders nanoserve runs
ROPE_TYPES = ("default", "linear", "llama3", "yarn")     # RoPE variants it applies (see rope_frequencies)


def hf_config_fields(raw: dict) -> dict:
    """A Hugging Face config.json (either generation: transformers 4's top-level rope_theta
    and rope_scaling, or transformers 5's rope_parameters) -> ModelConfig's fields.
    Anything that would change the network in a way nanoserve does not implement is
    refused here, by name, rather than silently ignored."""
    model_type = raw.get("model_type", "llama")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (SwiGLU needs silu)")
    # RoPE: transformers 5 keeps theta and scaling together in rope_parameters; older configs
    # have a top-level rope_theta and an optional rope_scaling (its kind under "type" or "rope_type").
    rope = dict(raw.get("rope_parameters") or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"per-layer-type rope_parameters ({', '.join(rope)}) are not supported")
    rope = {**(raw.get("rope_scaling") or {}), **rope}
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    partial = rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE over the whole head)")
    scaling = None
    if kind != "default":
        scaling = {"rope_type": kind, **rope}
        if kind in ("llama3", "yarn"):       # the pre-training context, as transformers reads it
            scaling["original_max_position_embeddings"] = raw.get("original_max_position_embeddings") or \
                rope.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    # Sliding-window attention: Mistral's sliding_window; Qwen2's only with use_sliding_window.
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if raw.get("layer_types") and "sliding_attention" not in raw["layer_types"]:
        window = None
    fields = {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                  "head_dim", "bos_token_id", "eos_token_id", "torch_dtype") if raw.get(k) is not None}
    return dict(fields, num_key_value_heads=raw.get("num_key_value_heads") or raw.get("num_attention_heads"),
                rope_theta=theta, rope_scaling=scaling, sliding_window=window, model_type=model_type,
                qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias")),
                o_bias=bool(raw.get("attention_bias")), mlp_bias=bool(raw.get("mlp_bias")),
                quantization_config=raw.get("quantization_config"))


@dataclass
class ModelConfig:
    """The subset of a Hugging Face `config.json` that defines a Llama-family network.

    rope_scaling: None for plain RoPE, else {"rope_type": "linear" | "llama3" | "yarn",
    and that type's fields}, as transformers writes them. qkv_bias: q/k/v projections have
    biases (Qwen2; Llama's attention_bias); o_bias and mlp_bias likewise. sliding_window:
    the attention window when layers use one (Mistral; Qwen2 with use_sliding_window).
    """
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = None
    model_type: str = "llama"
    quantization_config: dict | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("config.hidden_size must be divisible by num_attention_heads "
                                 "when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"config.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("config.rope_theta and config.rms_norm_eps must be positive")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"config.model_type {self.model_type!r} is not supported "
                             f"(nanoserve runs Llama-family decoders: {', '.join(MODEL_TYPES)})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_TYPES[1:]:
                why = (" (dynamic NTK changes every position's rotation as a sequence grows, which a "
                       "cache of already-rotated keys cannot follow)" if kind == "dynamic" else "")
                raise ValueError(f"config rope_type {kind!r} is not supported{why}; "
                                 f"supported: {', '.join(ROPE_TYPES)}")
            need = {"linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
            missing = [k for k in need[kind] if self.rope_scaling.get(k) is None]
            if missing:
                raise ValueError(f"config rope_type {kind!r} needs {', '.join(missing)}")

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.eos_token_id
        return set() if eos is None else set(eos) if isinstance(eos, list) else {eos}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        try:
            return cls(**hf_config_fields(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_device(data: object, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host data (a list, a numpy array) as a tensor on device, without waiting for the device.
    A copy to a GPU from pageable memory waits until the GPU has done all the work queued
    before it; from pinned memory it is queued behind that work and the host goes on (what
    lets the host prepare step n+1 while the GPU runs step n: async_scheduling)."""
    t = torch.as_tensor(data, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class EngineConfig:
    """How the engine runs a model: device, KV cache size, scheduler limits, speculation.

    block_size: tokens per KV block. num_blocks: fixes the pool size; when None it is
    derived from memory: on a GPU, gpu_memory_utilization of free GPU memory; on the CPU,
    kv_cache_bytes when given, else what the engine can fill (max_num_seqs sequences of
    max_model_len) up to half the available memory. max_num_seqs /
    max_num_batched_tokens bound one step's batch. On CUDA, decode steps and steps of up
    to 512 tokens replay captured CUDA graphs (DecodeGraphs, PiecewiseGraphs) unless
    enforce_eager (vLLM's name for it).
    async_scheduling (vLLM's name): the host schedules and launches step n+1 while the device
    still runs step n, and turns step n's ids into outputs after that launch (LLMEngine.step);
    None turns it on for CUDA, where the host's work then hides behind the GPU's, unless
    speculative decoding or tensor parallelism is on (a draft's proposals and the other
    ranks need every token on the host). On the CPU the host is the device, so there is
    nothing to hide (True there runs the same logic, for the tests).
    cpu_threads: torch's intra-op threads on the CPU (process-wide); None picks one thread
    for models under 30M parameters, whose small matmuls gain nothing from more threads
    and lose badly when the cores are busy, unless OMP_NUM_THREADS is set.
    Speculative decoding is on when draft_model (a directory) or speculative_method
    ("draft" or "ngram") is given; it then proposes num_speculative_tokens (default 4).
    tensor_parallel_size: ranks the model is sharded over (Megatron-style); the engine
    starts the other ranks as processes on this machine, or joins a torchrun job.
    semi_structured_sparsity: run a 2:4 checkpoint's projections as PyTorch semi-structured
    sparse tensors on a GPU (use_semi_structured); off by default: measured slower than
    dense on an H200 with torch 2.11 (README).
    """
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    draft_model: str | Path | None = None
    speculative_method: str | None = None
    num_speculative_tokens: int = 0
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    semi_structured_sparsity: bool = False
    cpu_threads: int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_blocks", "kv_cache_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads must be a positive integer or None, got {self.cpu_threads!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        # Speculative decoding is decided here, once: a draft model implies the draft method.
        if self.speculative_method is None and self.draft_model is not None:
            self.speculative_method = "draft"
        if self.speculative_method not in (None, "draft", "ngram"):
            raise ValueError(f"speculative_method must be 'draft' or 'ngram', got {self.speculative_method!r}")
        if self.speculative_method == "draft" and self.draft_model is None:
            raise ValueError("speculative_method='draft' needs draft_model=DIR")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.speculative_method and not self.num_speculative_tokens:
            self.num_speculative_tokens = 4
        synchronous = self.speculative_method or self.tensor_parallel_size > 1
        if self.async_scheduling is None:
            self.async_scheduling = str(self.device).startswith("cuda") and not synchronous
        elif not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be true, false or None, got {self.async_scheduling!r}")
        elif self.async_scheduling and synchronous:
            raise ValueError("async_scheduling is not supported with speculative decoding or "
                             "tensor_parallel_size > 1 (they need every step's tokens on the host)")


INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
GREEDY_BELOW = 1e-5          # temperatures under this are greedy: logits / T would overflow
# A request's stop strings are matched in O(new characters) per token (StopStrings, an
# automaton), whatever their number and length; the limits bound its memory and build time.
MAX_STOP_STRINGS = 128
MAX_STOP_CHARS = 256


# Any real or integral number type is accepted (Python's, numpy's float32 and int64, ...),
# except bool, which is an int to Python but never what a user means by a temperature.
def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_integral(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _finite(obj: object, name: str) -> float:
    """obj.name, checked to be a finite real number and stored as a Python float (10**30 is a
    valid int but not a float64 tensor's value)."""
    v = getattr(obj, name)
    try:
        f = float(v) if _is_real(v) else math.nan
    except OverflowError:                         # an int beyond float64's range
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    setattr(obj, name, f)
    return f


def _integer(obj: object, name: str, low: int, high: int) -> int:
    """obj.name, checked to be an integer in [low, high] and stored as a Python int."""
    v = getattr(obj, name)
    if not _is_integral(v) or not low <= v <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {v!r}")
    setattr(obj, name, int(v))
    return int(v)


@dataclass
class SamplingParams:
    """Per-request decoding settings, as in vLLM and the OpenAI API.

    temperature 0 (or below 1e-5) means greedy (argmax). top_k 0 and top_p 1 disable
    those filters; a top_k beyond the vocabulary keeps every token. seed makes the
    request's samples reproducible, alone or in any batch. logprobs=N returns, per
    generated token, the sampled token's and the top N logprobs; prompt_logprobs=N the
    same for each prompt token. Logprobs are of the model's own distribution, before
    temperature, top-k and top-p. presence_penalty, frequency_penalty (in [-2, 2]) and
    repetition_penalty (> 0; 1 is off) follow vLLM's definitions, logit_bias {token id:
    bias in [-100, 100]} OpenAI's (see penalties_from_counts). stop: up to MAX_STOP_STRINGS strings
    of up to MAX_STOP_CHARS characters; the text ends before the first one it contains.
    Every field is checked here, with a ValueError that names it: the same rules hold for
    the Python API and the server. Numbers of any real or integral type (numpy's too) are
    stored as Python floats and ints. A request is checked again when it is submitted, so a
    field changed after construction cannot slip past the rules.
    n: samples returned per prompt; best_of: samples generated, of which the n with the
    highest cumulative logprob are returned (parallel sampling on shared prompt blocks).
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    n: int = 1
    best_of: int | None = None

    def __post_init__(self) -> None:
        if _finite(self, "temperature") < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if not 0 < _finite(self, "top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _integer(self, "top_k", 0, INT64_MAX)
        _integer(self, "max_tokens", 1, INT64_MAX)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _integer(self, name, 0, 20)
        if self.seed is not None:
            _integer(self, "seed", -INT64_MAX - 1, INT64_MAX)
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self.ignore_eos = bool(self.ignore_eos)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"stop strings may be at most {MAX_STOP_CHARS} characters each, got one of "
                             f"{max(map(len, stop))}")
        self.stop = list(stop)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= _finite(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not _finite(self, "repetition_penalty") > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _integer(self, "n", 1, 64)
        if self.best_of is not None and _integer(self, "best_of", 1, 64) < self.n:
            raise ValueError(f"best_of must be >= n ({self.n}), got {self.best_of}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
            bias = {}
            for t, b in self.logit_bias.items():
                if not _is_integral(t) or not 0 <= t <= INT64_MAX:
                    raise ValueError(f"logit_bias keys must be token ids, got {t!r}")
                if not _is_real(b) or not -100 <= b <= 100:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for {t}")
                bias[int(t)] = float(b)
            self.logit_bias = bias

    @property
    def num_samples(self) -> int:
        return self.best_of or self.n

    @property
    def counts_tokens(self) -> bool:
        """Do its penalties depend on the tokens it has seen (all but logit_bias do)?"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def penalized(self) -> bool:
        """Does this request change the logits before sampling (penalties, logit_bias)?"""
        return self.counts_tokens or bool(self.logit_bias)


# ============================================================================ weights loading
# Safetensors is a tiny format: an 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets}}, then raw bytes. Reading it needs no library:
# numpy memory-maps the file and each tensor is a view of its byte range.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of one .safetensors file, as CPU tensors backed by a memory map."""
    path = Path(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="c")   # copy-on-write: file never modified
        n = int(np.frombuffer(raw[:8].tobytes(), dtype="<u8")[0])
        header = json.loads(raw[8:8 + n].tobytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    data = torch.from_numpy(raw[8 + n:])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        chunk = data[start:end]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (8 + n + start) % itemsize:                     # misaligned: copy, then view
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).reshape(info["shape"])
    return out


def save_safetensors(tensors: dict[str, Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the safetensors layout (offsets 8-byte aligned)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": metadata or {}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        b = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        pad = (-len(b)) % 8
        blobs.append(b + b"\0" * pad)
        offset += len(b) + pad
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_checkpoint(model_dir: str | Path) -> dict[str, Tensor]:
    """All weights of a Hugging Face checkpoint directory: one file, or shards + index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    state = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"weight shard {model_dir / name} is missing")
        state.update(load_safetensors(model_dir / name))
    return state


# ============================================================================ tokenizer
# Two formats cover the Llama family: a sentencepiece model (tokenizer.model: Llama 1/2,
# Mistral, TinyLlama) and a Hugging Face tokenizer.json (byte-level BPE: Llama 3, Qwen2,
# SmolLM), read by the `tokenizers` library that transformers and vLLM use. Both give
# encode / decode / token_text and the BOS and EOS ids.

class Tokenizer:
    """A sentencepiece model (byte fallback) with Llama's BOS convention."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm                    # only for checkpoints that ship tokenizer.model
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.eos_ids = {self.eos_id} if self.eos_id >= 0 else set()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + self.sp.encode(text)

    @property
    def bos_token(self) -> str:
        return self.sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else ""

    @property
    def eos_token(self) -> str:
        return self.sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else ""

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Text that spells BOS/EOS ("<s>", "</s>": a rendered chat) -> ids with those as
        tokens. sentencepiece alone would spell them out character by character."""
        specials = {t: i for t, i in ((self.bos_token, self.bos_id), (self.eos_token, self.eos_id)) if t}
        ids, rest = [], text
        while rest:
            at = min(((rest.find(t), t) for t in specials if t in rest), default=None)
            if at is None:
                return ids + self.sp.encode(rest)
            i, t = at
            ids += (self.sp.encode(rest[:i]) if i else []) + [specials[t]]
            rest = rest[i + len(t):]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_text(self, token_id: int) -> str:
        """The token's piece as the vocabulary spells it ("▁new")."""
        return self.sp.id_to_piece(token_id)


def _special(config: dict, key: str) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    v = config.get(key)
    return v.get("content") if isinstance(v, dict) else v


class HFTokenizer:
    """A Hugging Face tokenizer.json, with the special tokens and BOS/EOS conventions of the
    tokenizer_config.json beside it.

    BOS: the tokenizer's own post-processor adds it (Llama 3), unless tokenizer_config's
    add_bos_token says otherwise (Qwen2 has none). EOS: the eos_token, plus every id that
    generation_config.json lists (Llama 3 instruct stops at <|eot_id|> too).
    """

    def __init__(self, path: str | Path, config: dict | None = None, generation_eos: list[int] | None = None):
        from tokenizers import Tokenizer as FastTokenizer  # only for checkpoints that ship tokenizer.json
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            self.tok = FastTokenizer.from_file(str(path))
        except Exception as e:                              # the library raises its own exception type
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        config = config or {}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        bos, eos = _special(config, "bos_token"), _special(config, "eos_token")
        self.bos_id = self.tok.token_to_id(bos) if bos else None
        self.eos_id = self.tok.token_to_id(eos) if eos else None
        self.add_bos: bool | None = config.get("add_bos_token")
        self.eos_ids = ({self.eos_id} if self.eos_id is not None else set()) | set(generation_eos or [])
        self.bos_token, self.eos_token = bos or "", eos or ""
        if self.bos_id is None:
            self.bos_id = -1
        if self.eos_id is None:
            self.eos_id = -1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=bos).ids
        if bos and self.add_bos and self.bos_id >= 0 and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids                       # asked for by the config, not the post-processor
        elif self.add_bos is False and self.bos_id >= 0 and ids[:1] == [self.bos_id]:
            ids = ids[1:]
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """A rendered chat -> ids: special tokens in the text are recognised, none is added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (byte-level: "Ġnew")."""
        return self.tok.id_to_token(token_id) or ""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def generation_eos_ids(model_dir: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list of ids), if the checkpoint has one."""
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    return [eos] if isinstance(eos, int) else [t for t in eos if isinstance(t, int)] if isinstance(eos, list) else []


# Chat: the messages are rendered to one prompt string by the model's chat template, a
# Jinja template in tokenizer_config.json ("chat_template") or chat_template.jinja, the way
# transformers' apply_chat_template and vLLM render it. The rendered text already holds
# the special tokens (a "<s>" or "<|im_start|>"), so it is tokenized with them recognised
# as tokens and without adding another BOS.
# The roles of OpenAI's chat API. Any other role would be pasted into the prompt as text,
# which no model was trained on, so it is refused.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
DEFAULT_CHAT_TEMPLATE = (                      # for models without one (the bundled code model)
    "{{ bos_token }}{% for m in messages %}{{ '# ' + m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\n' }}{% endif %}")


def read_chat_template(model_dir: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, or tokenizer_config.json's
    chat_template (a string, or a list of named templates: "default" is taken)."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    t = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, bos_token: str,
                eos_token: str) -> str:
    """Render messages with a chat template in a sandbox (a template is code from the model's
    repository), as transformers does: trim_blocks, lstrip_blocks, raise_exception, tojson."""
    import jinja2                                  # only when a chat is rendered
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template refused the messages: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token, tools=None)
    except jinja2.TemplateError as e:
        raise ValueError(f"cannot render the chat template: {e}") from None


def load_tokenizer(model_dir: Path, path: str | Path | None = None) -> Tokenizer | HFTokenizer | None:
    """The checkpoint's tokenizer: `path` if given (a .json file is a Hugging Face tokenizer),
    else the directory's tokenizer.json (what transformers and vLLM load), else its
    tokenizer.model; None when it has neither (prompts must then be token ids)."""
    if path is None:
        path = next((model_dir / f for f in ("tokenizer.json", "tokenizer.model")
                     if (model_dir / f).is_file()), None)
        if path is None:
            return None
    path = Path(path)
    if path.suffix == ".json":
        config = _read_json(path.parent / "tokenizer_config.json")
        return HFTokenizer(path, config, generation_eos_ids(model_dir))
    return Tokenizer(path)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas.

    Two sentencepiece details make naive per-token decoding wrong: a piece's leading
    '▁' becomes a space only when something precedes it, and byte-fallback pieces
    (<0xF0> <0x9F> ...) spell one character over several tokens. So each step decodes a
    short window ending at the new token twice, with and without the new tokens, and
    emits the difference; while that ends in U+FFFD (an unfinished UTF-8 character)
    nothing is emitted and the window grows. This is vLLM's prefix/read-offset scheme.
    """

    def __init__(self, tokenizer: Tokenizer | HFTokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-6:])      # a little prompt context for the first space
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int, final: bool = False) -> str:
        if token_id >= 0:
            self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") and not final:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


# ============================================================================ model
# A Llama decoder layer:  h = x + Attn(RMSNorm(x));  out = h + MLP(RMSNorm(h)).
# The engine feeds a *flat* batch: the tokens of all scheduled sequences concatenated,
# (T, hidden), with per-token positions. Attention alone needs to know where each
# sequence starts and where its KV cache lives: that is AttentionMetadata.

@dataclass
class AttentionMetadata:
    slot_mapping: Tensor      # (T,) int64 cache slot each new token's K/V is written to
    block_tables: Tensor      # (S, max_blocks) int32 physical blocks of each sequence ((S, 0) with a cpu_plan)
    query_start_loc: Tensor   # (S + 1,) int32 sequence s owns tokens [start[s], start[s+1])
    context_lens: Tensor      # (S,) int32 cached tokens of s after this step's writes
    max_context_len: int      # max of context_lens, known on the host (no device sync)
    max_query_len: int        # most tokens any one sequence computes this step
    cpu_plan: kernels.CpuStepPlan | None = None   # the CPU path's per-step precomputation
    # A decode step whose attention applies RoPE and writes the cache itself (one kernel
    # instead of two a layer, kernels.decode_attention_with_rope): project then hands over q,
    # k and v as projected. The runner sets it for decode steps on a GPU.
    rope_in_attention: bool = False
    # (max_num_seqs * Hkv,) int32 zeros: how many of a decode group's Flash-Decoding splits
    # are done, so that the last one merges them (kernels.paged_attention_cuda). The runner
    # owns one buffer; every launch leaves it zero. None: a launch zeroes one of its own.
    split_counters: Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x (T, D) -> RMSNorm(x); with the residual stream, (RMSNorm(x + residual), x + residual)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def after(self, proj: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """self(proj(x), residual): a projection whose output joins the residual stream, then
        this norm. A projection that can add and norm in its own launch (add_rms_norm of
        Linear and QuantLinear: one kernel where there were two, on a GPU at a few rows)
        does so."""
        fold = getattr(proj, "add_rms_norm", None)
        return fold(x, residual, self) if fold is not None else self(proj(x), residual)


INPUT_MAJOR_MIN_WEIGHTS = 1 << 16


def input_major(linear: nn.Linear) -> None:
    """Store linear's weight transposed: the same (out, in) tensor to every reader, laid out
    as (in, out) in memory. A matrix-vector product y = W x can stream W by rows (a dot
    product per output, each ending in a horizontal sum across the vector lanes) or by
    columns (y += x_i W[:, i]: every load feeds whole-vector multiply-adds into y, no
    reductions). F.linear takes the transposed view without a copy. Measured with one
    thread on the 2-core EPYC (README, "CPU decode beside transformers"): the bundled
    model's linears, all 25 of a step, 2.13 -> 1.63 ms at 1 row and 5.09 -> 4.36 ms at 16;
    TinyLlama's 5632 x 2048 1.26x at 1 row, about even from 8 rows. Weights under 64K
    values (256 KB in fp32, cache-resident) gained nothing: stories260K's took 120 us row-
    major, 142 us input-major. So the CPU serves larger fp32 weights from this layout."""
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)


class Linear(nn.Linear):
    """nn.Linear (the same parameters, the same Hugging Face names) computed by kernels.linear:
    cuBLAS, or on a GPU the kernels' own decode-sized matmul where kernels.DENSE_MMA_MAX_ROWS
    turns it on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache: dict = {}         # kernels.linear_add_rms_norm's: the GPU counters of its fold

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight, self.bias)

    def add_rms_norm(self, x: Tensor, residual: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """norm(self(x), residual) (RMSNorm.after): in the matmul's own launch where the kernels'
        dense_mma takes it (kernels.linear_add_rms_norm), the same bits as the two ops. Not where
        hooks watch the output (tensor parallelism sums it over the ranks first)."""
        if self._forward_hooks or self._forward_pre_hooks:
            return norm(self(x), residual)
        return kernels.linear_add_rms_norm(x, self.weight, self.bias, residual, norm.weight, norm.eps, self.cache)


class FusedLinear:
    """Several nn.Linear that read the same input, run as one matmul (vLLM's
    QKVParallelLinear and MergedColumnParallelLinear): one larger op instead of two or
    three small ones, which is what a small model's decode step pays for on a CPU (each op
    costs microseconds of dispatch) and in kernel launches on a GPU. The weights are
    concatenated along the output once, and each original module's weight becomes a view
    of its rows: no second copy, and the Hugging Face names still address the weights.
    Not a module (it owns no parameters of its own, so state_dict is unchanged). Changing
    a weight in place (AWQ's scaling) changes the fused one too; replacing a module or its
    weight (quantization) ends the fusion: `holds` is then false and the modules run.
    Calibration and training (forward_dense) always run the separate modules.
    input_major: the concatenated weight is stored transposed (see input_major)."""

    def __init__(self, linears: list[nn.Linear], input_major: bool = False):
        if input_major:                           # (sum out, in) view of an (in, sum out) tensor
            weight = torch.cat([m.weight.detach().t() for m in linears], dim=1).t()
        else:
            weight = torch.cat([m.weight.detach() for m in linears])              # (sum out, in)
        bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
        row = 0
        for m in linears:
            n = m.out_features
            m.weight = nn.Parameter(weight[row:row + n], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
            row += n
        self.weight, self.bias = weight, bias
        self.parts = [m.weight for m in linears]

    def holds(self, *linears: nn.Module) -> bool:
        """Whether these modules still compute with the views made here (read from
        _parameters directly: this runs twice per layer and step)."""
        return all(m._parameters.get("weight") is w for m, w in zip(linears, self.parts))

    def __call__(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight, self.bias)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """For gate and up fused: silu(gate(x)) * up(x), (T, F), from the (T, 2F) product."""
        gate, up = self(x).chunk(2, dim=-1)                             # (T, 2F) -> 2 x (T, F)
        return kernels.silu_and_mul(gate, up)

    @staticmethod
    def fusable(linears: list[nn.Module]) -> bool:
        """Plain linears of one dtype and device, all with or all without a bias (a QuantLinear
        keeps its own packed kernel)."""
        return all(type(m) in (nn.Linear, Linear) and type(m.weight) is nn.Parameter   # not a 2:4 sparse weight
                   for m in linears) and len({m.bias is None for m in linears}) == 1 \
            and len({(m.weight.dtype, m.weight.device) for m in linears}) == 1


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        D = cfg.hidden_size
        self.q_proj = Linear(D, self.n_heads * self.head_dim, bias=cfg.qkv_bias)     # (H*hd, D)
        self.k_proj = Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)        # (Hkv*hd, D)
        self.v_proj = Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)        # (Hkv*hd, D)
        self.o_proj = Linear(self.n_heads * self.head_dim, D, bias=cfg.o_bias)       # (D, H*hd)
        self.qkv: FusedLinear | None = None       # q, k, v as one matmul, once fuse_projections ran

    # Attention is o_proj(attend(project(x))); the decoder layer calls the three in turn.
    def project(self, x: Tensor, positions: Tensor, kv_cache: Tensor, meta: AttentionMetadata,
                rope: tuple[Tensor, Tensor]) -> Tensor:
        """x (T, D) -> q (T, H, hd) with RoPE, the new tokens' K/V written to the cache; with
        meta.rope_in_attention, q, k and v as projected, (T, H + 2Hkv, hd), for attend to
        rotate and cache. Of meta it reads only that, the cache slots (and the CPU plan)."""
        T = x.shape[0]
        if self.qkv is not None and self.qkv.holds(self.q_proj, self.k_proj, self.v_proj):
            qkv = self.qkv(x).view(T, self.n_heads + 2 * self.n_kv, self.head_dim)    # (T, H + 2Hkv, hd)
            if meta.rope_in_attention:
                return qkv
            q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        else:
            q = self.q_proj(x).view(T, self.n_heads, self.head_dim)      # (T, H, hd)
            k = self.k_proj(x).view(T, self.n_kv, self.head_dim)         # (T, Hkv, hd)
            v = self.v_proj(x).view(T, self.n_kv, self.head_dim)         # (T, Hkv, hd)
            if meta.rope_in_attention:
                return torch.cat([q, k, v], dim=1)                       # (T, H + 2Hkv, hd)
        k_cache, v_cache = kv_cache.unbind(0)                          # 2 x (blocks, block_size, Hkv, hd)
        # RoPE, and K/V written to the cache first: the new tokens attend to themselves too.
        return kernels.rope_and_cache(q, k, v, positions, *rope, k_cache, v_cache, meta.slot_mapping,
                                      plan=meta.cpu_plan)

    def attend(self, q: Tensor, kv_cache: Tensor, meta: AttentionMetadata, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Each query over its own sequence's cached keys and values -> (T, H * hd). The one
        operation of the model that depends on how the step's tokens split into sequences.
        With meta.rope_in_attention, q is project's q, k and v, rotated and cached here."""
        k_cache, v_cache = kv_cache.unbind(0)
        if meta.rope_in_attention:
            o = kernels.decode_attention_with_rope(q, self.n_heads, k_cache, v_cache, meta.block_tables,
                                                   meta.query_start_loc, meta.context_lens, meta.slot_mapping,
                                                   *rope, self.scale, meta.max_context_len,
                                                   meta.split_counters)                      # (T, H, hd)
        else:
            o = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                        meta.context_lens, self.scale, meta.max_context_len, meta.max_query_len,
                                        plan=meta.cpu_plan, counters=meta.split_counters)   # (T, H, hd)
        return o.reshape(q.shape[0], self.n_heads * self.head_dim)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)     # (F, D)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)       # (F, D)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)     # (D, F)
        self.gate_up: FusedLinear | None = None   # gate and up as one matmul, once fuse_projections ran

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activation(x))

    def activation(self, x: Tensor) -> Tensor:
        """(T, D) -> silu(gate(x)) * up(x), (T, F): the MLP up to its down projection."""
        if self.gate_up is not None and self.gate_up.holds(self.gate_proj, self.up_proj):
            return self.gate_up.silu_and_mul(x)
        return kernels.silu_and_mul(self.gate_proj(x), self.up_proj(x))

    def separate(self, x: Tensor) -> Tensor:
        """Through each projection module (what forward hooks, e.g. quant.py's, observe)."""
        return self.down_proj(kernels.silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    # The layer in two halves around attention: the model runner's piecewise graphs replay
    # them (one layer's second half with the next layer's first), attention run between.
    # The residual stream is carried beside the normed activations, so that each "add +
    # norm" is one op, and each half ends in one: attention's output projection joins the
    # stream before post_attention_layernorm, the MLP's down projection before the next
    # layer's input_layernorm (the model's final norm after the last layer). On a GPU a
    # projection on the kernels' mma GEMV (quantized, or dense on dense_mma) does that add and
    # norm in its own launch (RMSNorm.after), as a fused quantized gate/up ends in SiLU x up.
    def after_attention(self, o: Tensor, residual: Tensor, next_norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """Attention's output o (T, H * hd) -> (next_norm of the layer's output, the residual
        stream), both (T, D)."""
        h, residual = self.post_attention_layernorm.after(self.self_attn.o_proj, o, residual)
        return next_norm.after(self.mlp.down_proj, self.mlp.activation(h), residual)

    def forward(self, h: Tensor, residual: Tensor, positions: Tensor, kv_cache: Tensor, meta: AttentionMetadata,
                rope: tuple[Tensor, Tensor], next_norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """h: input_layernorm of the residual stream (T, D) -> (next_norm of the layer's
        output, the residual stream)."""
        q = self.self_attn.project(h, positions, kv_cache, meta, rope)
        return self.after_attention(self.self_attn.attend(q, kv_cache, meta, rope), residual, next_norm)

    def forward_dense(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """(B, T, D) -> (B, T, D): the same layer on whole sequences, SDPA instead of the cache."""
        B, T, _ = x.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(B, T, a.n_heads, a.head_dim)
        k = a.k_proj(h).view(B, T, a.n_kv, a.head_dim)
        v = a.v_proj(h).view(B, T, a.n_kv, a.head_dim)
        q, k = kernels.rotary_embedding_ref(q, k, torch.arange(T, device=x.device), *rope)
        rep = a.n_heads // a.n_kv                                            # GQA: share K/V heads
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
            v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True)      # (B, H, T, hd)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp.separate(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)      # (V, D)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def rope_frequencies(cfg: ModelConfig) -> tuple[Tensor, float]:
    """RoPE's per-pair frequencies (head_dim / 2,) and the factor on cos/sin, for each
    rope_type Llama-family checkpoints use (the math of transformers' modeling_rope_utils).

    default: w_i = theta^(-2i/d). Long-context variants stretch the low frequencies, whose
    wavelengths exceed the pre-training context L, so that new positions look like seen ones:
      linear  w_i / factor for every i (position interpolation);
      llama3  w_i / factor where the wavelength 2 pi / w_i > L / low_freq_factor, unchanged
              where it is < L / high_freq_factor, a smooth blend in between (Llama 3.1/3.2);
      yarn    a ramp between w_i (many rotations within L) and w_i / factor (few), over the
              pairs between beta_fast and beta_slow rotations, and cos/sin scaled by
              0.1 ln(factor) + 1 (or attention_factor / mscale when the config gives them).
    """
    d, theta = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)          # (d/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv_freq / factor, 1.0
    L = rs["original_max_position_embeddings"]
    if rs["rope_type"] == "llama3":
        lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (L / wavelen - lo) / (hi - lo)                                         # 0 .. 1 in the band
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > L / lo, inv_freq / factor, inv_freq)
        return torch.where((wavelen >= L / hi) & (wavelen <= L / lo), blended, out), 1.0
    # yarn
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = rs.get("attention_factor")
    if attention is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:    # the pair index that turns `rotations` times in L
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp                               # 1: keep w_i, 0: interpolate w_i / factor
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention)


class LlamaForCausalLM(nn.Module):
    """The Llama family (Llama 2/3, TinyLlama, SmolLM, Mistral, Qwen2) under Hugging Face weight names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vocab_size = cfg.vocab_size                                     # the logits' width
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)      # (V, D)
        self.rope: tuple[Tensor, Tensor] | None = None

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        inv_freq, scale = rope_frequencies(self.config)
        self.rope = kernels.rope_tables(inv_freq, max_positions, scale, device)

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: Tensor,
                meta: AttentionMetadata) -> Tensor:
        """input_ids, positions: (T,); kv_caches: (L, 2, blocks, block_size, Hkv, hd) -> (T, D)."""
        x = self.model.embed_tokens(input_ids)                               # (T, D)
        h, residual = self.model.layers[0].input_layernorm(x), x
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, positions, kv_caches[i], meta, self.rope, self.norm_after(i))
        return h

    def norm_after(self, i: int) -> RMSNorm:
        """The norm that ends layer i: the next layer's input_layernorm, or the final norm."""
        layers = self.model.layers
        return layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, D) -> (N, V) fp32."""
        return self.lm_head(hidden).float()

    def dense_rope(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.rope is not None and self.rope[0].shape[0] >= T:
            return self.rope
        inv_freq, scale = rope_frequencies(self.config)
        return kernels.rope_tables(inv_freq, T, scale, device)

    def forward_dense(self, input_ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, V) logits with plain causal attention and no KV cache.

        For training, calibration (quant.py) and perplexity, where whole sequences are
        known up front. Differentiable; serving never uses it.
        """
        rope = self.dense_rope(input_ids.shape[1], input_ids.device)
        x = self.model.embed_tokens(input_ids)                               # (B, T, D)
        for layer in self.model.layers:
            x = layer.forward_dense(x, rope)
        return self.lm_head(self.model.norm(x)).float()                      # (B, T, V)


# ---------------------------------------------------------------------------- quantized linear layers
# A quantized checkpoint (written by quant.py: RTN, GPTQ or AWQ) stores each decoder
# projection as integer codes plus per-group scales: w ~ s * q (symmetric) or
# s * (q - z) (asymmetric), one scale per group_size input channels (or per output
# channel). Codes of 4 bits or fewer are packed two per byte, byte = low | high << 4,
# signed codes offset by 8 into [0, 15] (kernels.unpack_int4 is the inverse); 8-bit
# codes are stored as int8 (symmetric) or uint8. Loading one is two steps, as in
# gpt-fast: swap each nn.Linear for an empty QuantLinear, then load the state dict.

QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def pack_int4(codes: Tensor, signed: bool) -> Tensor:
    """(out, in) integer codes -> (out, ceil(in / 2)) uint8."""
    u = (codes.to(torch.int16) + (8 if signed else 0)).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, torch.zeros_like(u[:, :1])], dim=1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


class QuantLinear(nn.Module):
    """A linear layer with integer weights and per-group scales.

    Buffers (names as saved in a quantized checkpoint):
        qweight (out, ceil(in / 2)) uint8 for bits <= 4; (out, in) int8 (uint8 with zeros) for 8
        scales  (out, n_groups) float
        zeros   (out, n_groups) float, asymmetric only
        bias    (out,) float, when the layer has one (Qwen2's q/k/v), kept in float
        perm    (in,) int64, act-order GPTQ checkpoints only: x is read in this order
    The forward pass is kernels.quant_linear: the reference twin dequantizes, then
    multiplies; the CUDA kernels read the packed weights directly up to 255 rows (codes
    decoded in registers straight into tensor-core operands), dequantize once for cuBLAS
    beyond, and on the CPU PyTorch's int8/int4 weight-only kernels do (kernels.pack_for_cpu).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 bias: bool = False, input_perm: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = math.ceil(in_features / (group_size or in_features))
        packed = bits <= 4
        self.register_buffer("qweight", torch.empty(out_features, (in_features + 1) // 2 if packed else in_features,
                                                    dtype=torch.int8 if symmetric and not packed else torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        if not symmetric:
            self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        else:
            self.zeros = None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if input_perm:             # act-order checkpoints: input channels sorted by group
            self.register_buffer("perm", torch.empty(in_features, dtype=torch.int64, device=device))
        else:
            self.perm = None
        self.cache: dict = {}         # kernels.quant_linear's: the CPU repacking, the GPU split counters

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
                   dtype: torch.dtype, bias: Tensor | None = None) -> "QuantLinear":
        """From integer codes (out, in) and scale/zero (out, n_groups); zero None: symmetric."""
        m = cls(codes.shape[1], codes.shape[0], bits, group_size, zero is None, codes.device, dtype,
                bias=bias is not None)
        if bias is not None:
            m.bias = bias.detach().to(dtype).clone()
        m.qweight = pack_int4(codes, zero is None) if bits <= 4 else codes.to(m.qweight.dtype)
        m.scales = scale.to(dtype)
        if zero is not None:
            m.zeros = zero.to(dtype)
        return m

    def codes(self) -> Tensor:
        """The integer codes, unpacked: (out, in)."""
        if self.bits <= 4:
            return kernels.unpack_int4(self.qweight, self.in_features, self.symmetric)
        return self.qweight

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)                              # (..., in), channels by group
        y = kernels.quant_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                 self.cache)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def add_rms_norm(self, x: Tensor, residual: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """norm(self(x), residual) (RMSNorm.after): on a GPU at a few rows in the matmul's own
        launch (kernels.quant_linear_add_rms_norm), the same bits as the two ops. Not with a
        bias, or where hooks watch the output: tensor parallelism sums it over the ranks
        (parallel.py's forward hooks) before it may join the residual stream."""
        if self.bias is not None or self._forward_hooks or self._forward_pre_hooks:
            return norm(self(x), residual)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)                              # (..., in), channels by group
        return kernels.quant_linear_add_rms_norm(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                                 residual, norm.weight, norm.eps, self.cache)

    # New, moved or reloaded buffers make the CPU repacking stale. The GPU split counters
    # stay: CUDA graphs hold their address, and kernels.quant_linear makes new ones for
    # another device.
    def _apply(self, fn, *args, **kwargs):
        self.cache.pop("cpu", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.cache.pop("cpu", None)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class FusedQuantLinear(FusedLinear):
    """FusedLinear for quantized projections that read the same input (q/k/v, gate/up) and
    share a format (bits, group size, symmetry): the codes, scales, zero points and biases
    are concatenated along the output once, and each QuantLinear's buffers become views of
    their rows, so the same kernels run one larger quantized matmul. A quantized decode step
    then launches four matmuls a layer instead of seven (gpt-fast's int4 model fuses wqkv
    and w1/w3 likewise). Act-order checkpoints fuse when the parts read their input in the
    same order (GPTQ quantizes q, k and v from the same inputs, so their orders agree);
    otherwise the parts run separately."""

    def __init__(self, linears: list[QuantLinear]):
        first = linears[0]
        self.in_features, self.out_features = first.in_features, sum(m.out_features for m in linears)
        self.bits, self.group_size, self.perm = first.bits, first.group_size, first.perm
        self.cache: dict = {}                     # the fused weight's kernel cache (QuantLinear's)
        for name in ("qweight", "scales", "zeros", "bias"):
            whole = None if getattr(first, name) is None else torch.cat([getattr(m, name) for m in linears])
            row = 0
            for m in linears:                     # (out, ...) rows of the (sum out, ...) tensor
                if whole is not None:
                    setattr(m, name, whole[row:row + m.out_features])
                row += m.out_features
            setattr(self, name, whole)
        # The parts' buffers as made here: replacing any of them (new scales, a cast) ends the
        # fusion. The parts share the fused repacking's cache, so that what clears theirs (a
        # reload, a move) clears it too.
        self.parts = [dict(m._buffers) for m in linears]           # name -> buffer, as made here
        for m in linears:
            m.cache = self.cache

    def holds(self, *linears: nn.Module) -> bool:
        return all(m._buffers.keys() == made.keys() and all(m._buffers[k] is b for k, b in made.items())
                   for m, made in zip(linears, self.parts))

    __call__ = QuantLinear.forward                # the layer's own forward, on the fused buffers

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """FusedLinear.silu_and_mul: on a GPU at 1-16 rows in the matmul's own launch
        (kernels.quant_linear_silu_and_mul), the same bits as the two ops."""
        if self.bias is not None:
            return super().silu_and_mul(x)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)                              # (..., in), channels by group
        return kernels.quant_linear_silu_and_mul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                                 self.cache)

    @staticmethod
    def fusable(linears: list[nn.Module]) -> bool:
        """QuantLinears of one format, device and input order, all with or all without a bias."""
        if not all(type(m) is QuantLinear for m in linears):
            return False
        first = linears[0]
        same_order = all(m.perm is None for m in linears) or \
            all(m.perm is not None and torch.equal(m.perm, first.perm) for m in linears)
        return same_order and len({(m.bits, m.group_size, m.symmetric, m.in_features, m.bias is None,
                                    m.scales.dtype, m.qweight.dtype, m.qweight.device) for m in linears}) == 1


def quantized_linear_names(model: LlamaForCausalLM) -> list[str]:
    """The layers a quantized checkpoint quantizes: every projection of every decoder layer
    (not the embeddings or the LM head)."""
    return [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in QUANTIZED_LINEARS]


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name (`model.layers.0.mlp.up_proj`)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def swap_in_quantized_linears(model: LlamaForCausalLM, quant_config: dict) -> None:
    """Replace nn.Linear by empty QuantLinear modules, ready for a quantized state dict.

    quant_config: quantize_config.json's {"bits", "group_size", "symmetric", ...}."""
    try:
        bits, G, sym = quant_config["bits"], quant_config["group_size"], quant_config.get("symmetric", True)
    except (KeyError, TypeError) as e:
        raise ValueError(f"quantize_config.json lacks {e}: it needs bits and group_size") from None
    for name in quantized_linear_names(model):
        lin = model.get_submodule(name)
        set_module(model, name, QuantLinear(lin.in_features, lin.out_features, bits, G, sym,
                                            device=lin.weight.device, dtype=lin.weight.dtype,
                                            bias=lin.bias is not None))


def fuse_projections(model: LlamaForCausalLM) -> None:
    """q/k/v, and gate/up, of every layer as one matmul each, for serving: FusedLinear for
    float projections, FusedQuantLinear for quantized ones; on the CPU in fp32 every plain
    linear's weight also goes input-major (input_major). A fusion that no longer holds (its
    modules were replaced since) is made again. Training and quant.py, which replace weight
    tensors, use the model unfused."""
    def cpu_fp32(*ms: nn.Module) -> bool:          # input-major pays (input_major)
        return all(type(m) in (nn.Linear, Linear) for m in ms) and kernels.USE_CPU_FAST_PATHS \
            and ms[0].weight.device.type == "cpu" and ms[0].weight.dtype == torch.float32 \
            and sum(m.weight.numel() for m in ms) >= INPUT_MAJOR_MIN_WEIGHTS

    def fused(old: FusedLinear | None, linears: list[nn.Module]) -> FusedLinear | None:
        if old is not None and old.holds(*linears):
            return old
        if FusedLinear.fusable(linears):
            return FusedLinear(linears, cpu_fp32(*linears))
        return FusedQuantLinear(linears) if FusedQuantLinear.fusable(linears) else None

    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv = fused(a.qkv, [a.q_proj, a.k_proj, a.v_proj])
        m.gate_up = fused(m.gate_up, [m.gate_proj, m.up_proj])
        for proj in (a.o_proj, m.down_proj):
            if cpu_fp32(proj):
                input_major(proj)
    # A head tied to the embedding keeps its (V, D) rows: the embedding lookup reads them.
    if cpu_fp32(model.lm_head) and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        input_major(model.lm_head)


# ---------------------------------------------------------------------------- GPTQ and AWQ checkpoints
# Most 4-bit checkpoints on the Hugging Face hub were written by AutoGPTQ/GPTQModel or
# AutoAWQ; config.json's quantization_config says which. They are converted at load time
# into the layout above (same codes, scales and zero points, so the same kernels run them).
#
# GPTQ (quant_method "gptq"), per projection, with b bits and pf = 32 / b fields per int32:
#   qweight (in / pf, out) int32   input channel i of output j: word i // pf, bits (i % pf) * b
#   qzeros  (groups, out / pf)     packed along the output; stored as zero - 1 in the original
#                                  format ("gptq"), as zero in GPTQModel's "gptq_v2"
#   scales  (groups, out) fp16     g_idx (in,) the group of each input channel: i // G, or a
#                                  permutation of that with desc_act ("act-order")
#   w[j, i] = scales[g, j] * (q[i, j] - zero[g, j]),  g = g_idx[i]
# AWQ (quant_method "awq", version "gemm"), 4 bits:
#   qweight (in, out / 8) int32    packed along the output, nibble k holding output
#                                  8c + (0, 2, 4, 6, 1, 3, 5, 7)[k] of word c
#   qzeros  (groups, out / 8)      the same packing, no offset;  scales (groups, out) fp16
#   w[j, i] = scales[i // G, j] * (q[i, j] - zero[i // G, j])
# Act-order groups are not contiguous in the input; sorting the input channels by group
# makes them so, and the layer then permutes its input (QuantLinear.perm) to match.

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: Tensor, bits: int, along_rows: bool, order: tuple[int, ...] | None = None) -> Tensor:
    """int32 words of 32 / bits unsigned fields -> the fields as int32, unpacked along the
    rows ((r, c) -> (r * pf, c)) or the columns ((r, c) -> (r, c * pf)). order[k]: the
    position within its word's run of the value stored in field k (AWQ); default k."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)          # (32 / bits,)
    mask = (1 << bits) - 1
    if along_rows:
        fields = (packed.unsqueeze(1) >> shifts[None, :, None]) & mask           # (r, pf, c)
        return fields.reshape(-1, packed.shape[1])
    fields = (packed.unsqueeze(-1) >> shifts) & mask                              # (r, c, pf)
    if order is not None:
        fields = fields[..., torch.tensor(order).argsort()]                      # field -> position
    return fields.reshape(packed.shape[0], -1)


def read_quantization_config(qc: dict) -> dict:
    """config.json's quantization_config -> {method, bits, group_size (0: per channel),
    zero_offset}; every variant nanoserve cannot run exactly is refused by name."""
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported (gptq or awq)")
    bits, G = qc.get("bits"), qc.get("group_size", -1)
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise ValueError(f"quantization_config.bits {bits!r} is not supported for {method} "
                         f"({'4 or 8' if method == 'gptq' else '4'})")
    if G not in (-1, 32, 64, 128):
        raise ValueError(f"quantization_config.group_size {G!r} is not supported (-1, 32, 64 or 128)")
    if qc.get("lm_head"):
        raise ValueError("quantization_config.lm_head: a quantized LM head is not supported")
    if qc.get("dynamic"):
        raise ValueError("quantization_config.dynamic: per-module overrides are not supported")
    zero_offset = 0
    if method == "gptq":
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        zero_offset = 1 if fmt == "gptq" else 0
        if qc.get("pack_dtype", "int32") != "int32":
            raise ValueError(f"quantization_config.pack_dtype {qc['pack_dtype']!r} is not supported (int32)")
    else:
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"quantization_config.version {qc['version']!r} is not supported (AWQ's gemm layout)")
        if qc.get("zero_point", True) is not True:
            raise ValueError("quantization_config.zero_point false is not supported (AWQ with zero points)")
    return {"method": method, "bits": bits, "group_size": 0 if G == -1 else G, "zero_offset": zero_offset}


def convert_hub_linear(tensors: dict[str, Tensor], qc: dict, in_features: int, out_features: int,
                       name: str) -> tuple[dict, dict[str, Tensor]]:
    """One projection's GPTQ/AWQ tensors -> (QuantLinear arguments, its buffers)."""
    bits, G = qc["bits"], qc["group_size"]
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as e:
        raise ValueError(f"{name}: missing {e.args[0]} for a {qc['method']} checkpoint") from None
    if qc["method"] == "gptq":
        q = unpack_int32(qweight.to(torch.int32), bits, along_rows=True)                 # (in, out)
        zero = unpack_int32(qzeros.to(torch.int32), bits, along_rows=False) + qc["zero_offset"]
        g_idx = tensors.get("g_idx")
    else:
        q = unpack_int32(qweight.to(torch.int32), bits, along_rows=False, order=AWQ_ORDER)
        zero = unpack_int32(qzeros.to(torch.int32), bits, along_rows=False, order=AWQ_ORDER)
        g_idx = None
    n_groups = -(-in_features // (G or in_features))
    if q.shape != (in_features, out_features) or zero.shape != (n_groups, out_features) \
            or tuple(scales.shape) != (n_groups, out_features):
        raise ValueError(f"{name}: qweight/qzeros/scales of shapes {tuple(qweight.shape)}/{tuple(qzeros.shape)}/"
                         f"{tuple(scales.shape)} do not fit a {in_features} -> {out_features} layer "
                         f"with {bits} bits in groups of {G or in_features}")
    contiguous = torch.arange(in_features) // (G or in_features)
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), contiguous):
        perm = torch.argsort(g_idx.long(), stable=True)                # act-order: sort channels by group
        if not torch.equal(g_idx.long()[perm], contiguous):
            raise ValueError(f"{name}: g_idx does not assign {G} input channels to each group")
        q = q[perm]
    symmetric = bool((zero == 1 << (bits - 1)).all())                  # GPTQ's sym=True: zero 2^(b-1)
    codes = (q - (1 << (bits - 1)) if symmetric else q).t().contiguous()  # (out, in)
    if bits == 4:
        qw = pack_int4(codes, signed=symmetric)
    else:
        qw = codes.to(torch.int8 if symmetric else torch.uint8)
    buffers = {"qweight": qw, "scales": scales.t().contiguous()}
    if not symmetric:
        buffers["zeros"] = zero.t().to(scales.dtype).contiguous()
    if perm is not None:
        buffers["perm"] = perm
    if tensors.get("bias") is not None:
        buffers["bias"] = tensors["bias"]
    spec = dict(bits=bits, group_size=G, symmetric=symmetric, bias="bias" in buffers, input_perm=perm is not None)
    return spec, buffers


def swap_in_hub_quantized_linears(model: LlamaForCausalLM, state: dict[str, Tensor], quantization_config: dict
                                  ) -> None:
    """Convert a GPTQ/AWQ checkpoint's projections in `state` to nanoserve's layout (in
    place) and swap in matching empty QuantLinear modules. A projection the checkpoint kept
    in floating point (AWQ's modules_to_not_convert) stays an nn.Linear."""
    if not isinstance(quantization_config, dict):
        raise ValueError(f"quantization_config must be an object, got {quantization_config!r}")
    qc = read_quantization_config(quantization_config)
    for name in quantized_linear_names(model):
        if f"{name}.qweight" not in state:
            continue
        lin = model.get_submodule(name)
        keys = [k for k in list(state) if k.startswith(name + ".")]
        tensors = {k[len(name) + 1:]: state.pop(k) for k in keys}
        spec, buffers = convert_hub_linear(tensors, qc, lin.in_features, lin.out_features, name)
        set_module(model, name, QuantLinear(lin.in_features, lin.out_features, device="meta",
                                            dtype=lin.weight.dtype, **spec))
        state.update({f"{name}.{k}": v for k, v in buffers.items()})


# ---------------------------------------------------------------------------- loading a model
# Real model shapes with random weights, for benchmarks where no checkpoint is at hand
# (`--model random:llama-2-7b`). Timings depend on shapes, not on what the weights say.
PRESETS = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rope_theta=1e6),
    # TinyLlama's layer shape with 4 layers: memory-bound on a CPU, quick to make (tensor parallelism).
    "tinyllama-1.1b-4l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                              num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                              max_position_embeddings=2048),
    # The bundled target's shape with a long context (for the chunked-prefill benchmark).
    "nanocoder-5m-8k": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=2, vocab_size=2048,
                            max_position_embeddings=8192, tie_word_embeddings=True),
}


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """config.json of a checkpoint directory, or a random:PRESET's shape."""
    if str(model_dir).startswith("random:"):
        preset = str(model_dir)[len("random:"):]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        return ModelConfig(**PRESETS[preset])
    return ModelConfig.from_dir(model_dir)


def random_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0
                 ) -> tuple[LlamaForCausalLM, ModelConfig]:
    cfg = read_model_config(f"random:{preset}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.02)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval(), cfg


def is_24_sparse(W: Tensor) -> bool:
    """2:4 structured sparsity (quant.py --method sparse24): at most 2 non-zeros in every
    group of 4 consecutive inputs of every row of W (out, in)."""
    return W.shape[1] % 4 == 0 and bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def is_24_checkpoint(model_dir: str | Path) -> bool:
    """Whether the checkpoint's sparsity_config.json (quant.py --method sparse24) says 2:4."""
    f = Path(model_dir) / "sparsity_config.json"
    return f.is_file() and json.loads(f.read_text()).get("sparsity") == "2:4"


def check_sparsity(model: LlamaForCausalLM, model_dir: str | Path) -> None:
    """A checkpoint whose sparsity_config.json says 2:4 must hold that pattern in every
    projection (dense weights, or the dequantized codes of a quantized one). The pattern is
    what 2:4 sparse tensor cores run at twice the dense rate; on the CPU the layers run dense."""
    for name in quantized_linear_names(model):
        m = model.get_submodule(name)
        W = m.weight if isinstance(m, nn.Linear) else \
            kernels.dequantize_ref(m.codes(), m.scales, m.zeros, m.group_size)
        if not is_24_sparse(W):
            raise ValueError(f"{model_dir}: sparsity_config.json says 2:4 but {name} breaks the pattern")


def semi_structured_ok(W: Tensor) -> bool:
    """Whether PyTorch's 2:4 sparse tensors (cuSPARSELt, or CUTLASS) can hold W: a CUDA GPU
    with sparse tensor cores (compute capability 8.0 on: Ampere, Hopper), fp16 or bf16, and
    both dimensions multiples of the kernels' tiles (64: the strictest backend's for the
    columns, 32 for the rows)."""
    return W.is_cuda and W.dtype in (torch.float16, torch.bfloat16) and W.dim() == 2 \
        and W.shape[0] % 32 == 0 and W.shape[1] % 64 == 0 \
        and torch.cuda.get_device_capability(W.device)[0] >= 8


def use_semi_structured(model: LlamaForCausalLM) -> list[str]:
    """Put each dense 2:4 projection whose shape the sparse kernels take into PyTorch's
    semi-structured form (torch.sparse.to_sparse_semi_structured: the kept half of the
    weights plus 2-bit indices, run by the sparse tensor cores at up to twice the dense
    rate); F.linear dispatches on the weight's type, so the model code is unchanged. The
    others stay dense, as do quantized ones. -> the names converted. Only with
    EngineConfig.semi_structured_sparsity: measured slower than dense on an H200."""
    from torch.sparse import to_sparse_semi_structured
    done = []
    for name in quantized_linear_names(model):
        m = model.get_submodule(name)
        if type(m) in (nn.Linear, Linear) and semi_structured_ok(m.weight):
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach().contiguous()), requires_grad=False)
            done.append(name)
    return done


def load_model(model_dir: str | Path, dtype: torch.dtype | None, device: torch.device
               ) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the module on the meta device (no memory), then assign the checkpoint's tensors.

    dtype None keeps each tensor as the checkpoint stores it. A tensor already of the
    requested dtype on the CPU stays a view of the memory-mapped file: nothing is read
    until it is used. -> (model, its config)."""
    if str(model_dir).startswith("random:"):
        return random_model(str(model_dir)[len("random:"):], dtype or torch.float32, device)
    cfg = ModelConfig.from_dir(model_dir)
    state = load_checkpoint(model_dir)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state:
        if not cfg.tie_word_embeddings and "model.embed_tokens.weight" not in state:
            raise ValueError(f"{model_dir}: checkpoint has neither lm_head.weight nor embeddings")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    quant_cfg = Path(model_dir) / "quantize_config.json"
    if cfg.quantization_config:                             # GPTQ / AWQ from the hub
        swap_in_hub_quantized_linears(model, state, cfg.quantization_config)
    elif quant_cfg.is_file():                               # nanoserve's own (quant.py)
        swap_in_quantized_linears(model, json.loads(quant_cfg.read_text()))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not match config.json; "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{model_dir}: {k} has shape {tuple(v.shape)}, config.json implies "
                             f"{tuple(expected[k].shape)}")
    for k, v in state.items():
        state[k] = v.to(device=device, dtype=dtype if dtype and v.is_floating_point() else v.dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False)
    if is_24_checkpoint(model_dir):
        check_sparsity(model, model_dir)
        # Served dense, zeros and all, unless EngineConfig.semi_structured_sparsity: on an
        # H200 with torch 2.11, PyTorch's semi-structured matmuls (use_semi_structured) took
        # about 1 ms a call at every size measured, 4x to 40x the dense time (README).
    return model.eval(), cfg


# ============================================================================ paged KV cache
# PagedAttention (vLLM): the KV cache is one preallocated pool of fixed-size blocks. A
# sequence owns a list of block ids (its block table) and takes a new block only when
# its last one is full, so at most block_size - 1 slots per sequence are ever unused,
# against max_model_len - length for a per-request max-length reservation.
#
# Prefix caching: a full block is named by a hash chained over its parent's hash and
# its own token ids, so one hash stands for the entire prefix up to that block. Two
# sequences with the same prefix share the same physical blocks (ref-counted, never
# written again once full). A block whose ref count falls to 0 keeps its contents and
# its hash in the free list: a later request can still hit it, until the allocator
# needs the block and evicts it, least recently used first.

CPU_KV_MEMORY_FRACTION = 0.5      # of available memory, at most, for a CPU pool sized by default


def available_cpu_memory() -> int:
    """Bytes the OS could give this process now without swapping (Linux's MemAvailable;
    elsewhere the free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def zeros_committed_on_use(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero CPU tensor in anonymous mapped memory: the OS hands out zero pages and commits
    each only when it is first written, so a pool sized for the worst case costs resident
    memory only for the blocks a workload touches (the block manager hands out the lowest
    free blocks first). torch.zeros would write, and so commit, every page up front."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


class BlockTable(list):
    """A sequence's block ids in order: a list that also counts how many of its leading
    entries a model runner has copied to the device and nobody has changed since (synced).
    Appending keeps them; setting, deleting or clearing entries lowers the count, so the
    runner copies only what changed (mostly the entry a decode step appends, one per block).
    Nothing pops, inserts, removes, sorts, reverses or repeats entries, so those are not tracked. Pickled (to a
    tensor-parallel worker) it is a plain list: the count means nothing in another process."""

    def __init__(self, blocks: Iterable[int] = ()):
        super().__init__(blocks)
        self.synced = 0

    def __setitem__(self, i: int | slice, value) -> None:
        self.synced = min(self.synced, self._first(i))
        super().__setitem__(i, value)

    def __delitem__(self, i: int | slice) -> None:
        self.synced = min(self.synced, self._first(i))
        super().__delitem__(i)

    def _first(self, i: int | slice) -> int:
        """The first index that setting or deleting i touches."""
        return i.indices(len(self))[0] if isinstance(i, slice) else i % max(1, len(self))

    def clear(self) -> None:
        self.synced = 0
        super().clear()

    def __reduce__(self):
        return list, (list(self),)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest prefix of token_ids (not yet acquired).

        The last token is never served from the cache: its logits are needed to sample.
        """
        if not self.caching:
            return []
        hits, h = [], None
        for i in range((len(token_ids) - 1) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((h, tokens))
            b = self.hash_to_block.get(h)
            if b is None or self.block_tokens[b] != tokens:   # miss (or a hash collision)
                break
            hits.append(b)
        return hits

    def can_allocate(self, block_table: list[int], num_tokens: int, hits: list[int] = (), extra: int = 0) -> bool:
        new = self.blocks_needed(num_tokens) - len(block_table) - len(hits)
        revived = sum(1 for b in hits if self.ref_count[b] == 0)   # cached but in the free list
        return new + revived + extra <= self.num_free

    def allocate(self, block_table: list[int], num_tokens: int, hits: list[int] = ()) -> None:
        """Grow block_table (in place) to hold num_tokens, sharing `hits` first."""
        for b in hits:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
            block_table.append(b)
        while len(block_table) < self.blocks_needed(num_tokens):
            block_table.append(self.allocate_one())

    def allocate_one(self) -> int:
        """A free block, least recently used first (evicting the prefix it cached), ref count 1."""
        b, _ = self.free.popitem(last=False)
        if self.block_hash[b] is not None:
            if self.hash_to_block.get(self.block_hash[b]) == b:
                del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = self.block_tokens[b] = None
        self.ref_count[b] = 1
        return b

    def fork(self, block_table: list[int]) -> BlockTable:
        """A second reference to every block of a table (parallel sampling: the samples of a
        prompt share its blocks; one that writes into a shared block copies it first)."""
        for b in block_table:
            self.ref_count[b] += 1
        return BlockTable(block_table)

    def release(self, block_table: list[int]) -> None:
        """Drop a sequence's references. Tail blocks go first in line for eviction."""
        for b in reversed(block_table):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} freed twice"
            if self.ref_count[b] == 0:
                self.free[b] = None
        block_table.clear()

    def truncate(self, block_table: list[int], num_tokens: int) -> None:
        """Give back blocks past the first num_tokens tokens (speculative rollback)."""
        if len(block_table) <= self.blocks_needed(num_tokens):
            return
        tail = block_table[self.blocks_needed(num_tokens):]
        del block_table[len(block_table) - len(tail):]
        self.release(tail)

    def cache_full_blocks(self, block_table: list[int], block_hashes: list[int],
                          token_ids: list[int], num_computed: int) -> None:
        """Name every newly completed block by its chained hash so later requests can hit it."""
        if not self.caching:
            return
        bs = self.block_size
        for i in range(len(block_hashes), num_computed // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash((block_hashes[-1] if block_hashes else None, tokens))
            block_hashes.append(h)
            b = block_table[i]
            if h not in self.hash_to_block and self.block_hash[b] is None:
                self.hash_to_block[h] = b
                self.block_hash[b], self.block_tokens[b] = h, tokens


# ============================================================================ sampling
# temperature 0 -> argmax. Otherwise p = softmax(logits / T), restricted to the top-k
# tokens and then to the smallest set of most likely tokens whose mass reaches top_p,
# renormalised. A sample is drawn by the "exponential race": with E_i ~ Exp(1)
# independent, argmax_i p_i / E_i is distributed exactly as p (it is the Gumbel-max
# trick in another form), and needs no cumulative sum and no host sync.

@dataclass
class SamplingMetadata:
    """A batch's sampling parameters as device tensors (vLLM's name), row i for params[i].
    All fields cross to the device in one copy, and the Sampler keeps them for as long as
    the batch's rows are the same requests (Sampler.metadata)."""
    params: list[SamplingParams]
    temperature: Tensor            # (B,) float32, 0 for greedy rows
    top_k: Tensor                  # (B,) int64, min(top_k, V); 0: no filter
    top_p: Tensor                  # (B,) float32
    repetition_penalty: Tensor     # (B,) float32
    frequency_penalty: Tensor      # (B,) float32
    presence_penalty: Tensor       # (B,) float32

    @classmethod
    def make(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> SamplingMetadata:
        host = np.array([(p.temperature, min(p.top_k, vocab_size), p.top_p, p.repetition_penalty,
                          p.frequency_penalty, p.presence_penalty) for p in params],
                        dtype=np.float32).reshape(-1, 6)             # (B, 6), 2-D when B is 0 too
        cols = to_device(np.ascontiguousarray(host.T), device)     # (6, B); top_k exact: V < 2^24
        return cls(params, cols[0], cols[1].long(), *cols[2:])


def filtered_probs(logits: Tensor, temperature: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p.

    temperature, top_k, top_p: (B,); top_k and top_p None when no row filters. Rows with
    temperature 0 are treated as T = 1 here; the caller takes the argmax for them.
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = (logits / t[:, None]).softmax(-1)
    if top_k is None:                       # no row filters: skip the sort (B x V log V)
        return probs
    sorted_p, order = probs.sort(-1, descending=True)                  # (B, V)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, probs.shape[-1]))
    keep = rank < k[:, None]
    sorted_p = sorted_p * keep
    # top-p over what top-k left: keep a token if the mass strictly before it is < p.
    before = sorted_p.cumsum(-1) - sorted_p
    keep &= before < top_p[:, None] * sorted_p.sum(-1, keepdim=True)
    keep[:, 0] = True
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    probs = probs * mask
    return probs / probs.sum(-1, keepdim=True)


def token_counts(lists: list[list[int]], V: int, device: torch.device | str) -> Tensor:
    """(B, V): how many times row i's list holds each token. Each (row, token) pair is the
    flat index row * V + token, so one index_add_ counts the whole batch."""
    flat = to_device([i * V + t for i, ids in enumerate(lists) for t in ids], torch.device(device), torch.long)
    counts = torch.zeros(len(lists) * V, device=device)
    return counts.index_add_(0, flat, torch.ones(len(flat), device=device)).view(len(lists), V)


def penalties_from_counts(logits: Tensor, params: list[SamplingParams], counts: Tensor | None,
                          in_prompt: Tensor | None, sampling: SamplingMetadata | None = None) -> Tensor:
    """(B, V) logits -> the logits each request samples from, before temperature (vLLM's
    definitions), given counts (B, V), how often row i's request has generated each token,
    and in_prompt (B, V), which tokens its prompt holds:

      repetition  l / r if l > 0 else l * r, for every token in the prompt or the output
      frequency   l - f * (times the token was generated)
      presence    l - p * (1 if the token was generated at all)
      logit_bias  l + b[token]   (-100 bans a token, +100 forces it, as in OpenAI's API)

    A row without penalties comes out unchanged: r = 1, f = p = 0 change no value. The
    result is a new tensor whenever some row is penalized (logits itself is not written).
    counts and in_prompt may be None when no row has a penalty that counts tokens. sampling:
    params' SamplingMetadata, made here when not given and needed."""
    V, dev = logits.shape[-1], logits.device
    if sampling is None and any(p.counts_tokens for p in params):
        sampling = SamplingMetadata.make(params, V, dev)
    # Each kind only when some row has it (the host's params say so, without a sync).
    if any(p.repetition_penalty != 1 for p in params):
        rep = sampling.repetition_penalty[:, None]
        seen = in_prompt | (counts > 0)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    # l - f * c as one fused pass over (B, V) (addcmul), presence as two (sign, addcmul): a
    # batch's penalties cost a few passes over its logits, not one per elementwise operation.
    if any(p.frequency_penalty for p in params):
        logits = torch.addcmul(logits, counts, sampling.frequency_penalty[:, None], value=-1)
    if any(p.presence_penalty for p in params):
        presence = sampling.presence_penalty[:, None]
        logits = torch.addcmul(logits, counts.sign(), presence, value=-1)    # counts >= 0: sign is 0 or 1
    bias = [(i * V + t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items() if t < V]
    if bias:      # one index_add over the flat logits (index_put's accumulate on CUDA syncs with the host)
        flat, values = zip(*bias)
        logits = logits.reshape(-1).index_add(0, to_device(flat, dev, torch.long),
                                              to_device(values, dev, logits.dtype)).view_as(logits)
    return logits


def apply_penalties(logits: Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> Tensor:
    """penalties_from_counts for rows whose request has prompts[i] and has generated
    outputs[i], counted from the lists (the engine keeps the counts instead: PenaltyCounts)."""
    if not any(p.penalized for p in params):
        return logits
    V = logits.shape[-1]
    return penalties_from_counts(logits, params, token_counts(outputs, V, logits.device),
                                 token_counts(prompts, V, logits.device) > 0)


class PenaltyCounts:
    """For each sequence whose penalties count tokens, kept on the device: how often it has
    generated each token, and which tokens its prompt holds (a row of each per sequence, as
    vLLM keeps them per request). Each step counts only the tokens appended since the last
    one: building the counts from the token lists would cost the host O(every token of
    every penalized request) per step. Row 0 stays zero, for the other sequences. The rows
    grow by doubling up to max_rows (max_num_seqs + 1: every sequence of a step and row 0;
    more only for the step in which a prompt's samples start); a finished sequence's row is
    freed, and a sequence outside the step gives its row up when one is needed (it is
    rebuilt if the sequence comes back)."""

    def __init__(self, vocab_size: int, device: torch.device, max_rows: int):
        self.V, self.device, self.max_rows = vocab_size, device, max_rows
        self.counts = torch.zeros(1, vocab_size, device=device)                  # (rows, V)
        self.in_prompt = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
        self.row: dict[Sequence, int] = {}
        self.counted: dict[Sequence, int] = {}            # generated tokens already in its row
        self.free: list[int] = []

    def rows(self, seqs: list[Sequence], pending: tuple[Tensor, dict[Sequence, int]] | None = None) -> Tensor:
        """(len(seqs),) the row of each sequence, brought up to date. With async scheduling
        a sequence's last token may still be on the device (a negative placeholder in its
        token_ids): it is counted there, from pending = (the previous step's sampled ids,
        each sequence's index into them)."""
        for seq in [s for s in self.row if s.finish_reason is not None]:
            self._free(seq)
        rows, new, in_flight = [], [], []    # flat indices row * V + token; (row, index into pending ids)
        for seq in seqs:
            if not seq.params.counts_tokens:
                rows.append(0)
                continue
            if seq not in self.row or self.counted[seq] > seq.num_output_tokens:
                self._start(seq, seqs)
            r = self.row[seq]
            tokens = seq.token_ids[seq.num_prompt_tokens + self.counted[seq]:]
            if tokens and tokens[-1] < 0:                 # its id is still on the device
                in_flight.append((r, pending[1][seq]))
                tokens = tokens[:-1]
            new += [r * self.V + t for t in tokens]
            self.counted[seq] = seq.num_output_tokens
            rows.append(r)
        if new:
            self.counts.view(-1).index_add_(0, to_device(new, self.device, torch.long),
                                            torch.ones(len(new), device=self.device))
        if in_flight:
            r, j = (to_device(list(x), self.device, torch.long) for x in zip(*in_flight))
            self.counts.view(-1).index_add_(0, r * self.V + pending[0][j], torch.ones(len(r), device=self.device))
        return to_device(rows, self.device, torch.long)

    def _free(self, seq: Sequence) -> None:
        self.free.append(self.row.pop(seq))
        del self.counted[seq]

    def _start(self, seq: Sequence, step: list[Sequence]) -> None:
        """A row for seq: zero counts, its prompt's tokens marked."""
        if seq not in self.row:
            n = self.counts.shape[0]
            if not self.free and n >= self.max_rows:      # full: take the row of one outside the step
                in_step = set(step)
                outside = next((s for s in self.row if s not in in_step), None)
                if outside is not None:
                    self._free(outside)
            if not self.free:
                # Grow: twice the rows, up to max_rows; past it only when every row belongs to
                # this step (a prompt's many samples, n or best_of, start in one step).
                m = min(2 * n, self.max_rows) if n < self.max_rows else 2 * n
                self.counts = torch.cat([self.counts, self.counts.new_zeros(m - n, self.V)])
                self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(m - n, self.V)])
                self.free = list(range(m - 1, n - 1, -1))
            self.row[seq] = self.free.pop()
        r = self.row[seq]
        self.counted[seq] = 0
        self.counts[r] = 0
        self.in_prompt[r] = False
        # index_fill_, not `in_prompt[r, ids] = True`: a Python value put through an index
        # tensor is copied to the GPU first, and that copy waits for the device.
        self.in_prompt[r].index_fill_(0, to_device(seq.token_ids[:seq.num_prompt_tokens], self.device, torch.long),
                                      True)


def sampling_probs(logits: Tensor, params: list[SamplingParams], sampling: SamplingMetadata | None = None
                   ) -> Tensor:
    """(B, V) logits -> the (B, V) distribution each request samples from (sampling: params'
    SamplingMetadata, made here when not given).

    Greedy rows (temperature 0) become one-hot on the argmax, so that speculative
    decoding's acceptance rule treats greedy and sampled requests alike.
    """
    V = logits.shape[-1]
    if sampling is None:
        sampling = SamplingMetadata.make(params, V, logits.device)
    filters = any(0 < p.top_k < V or p.top_p < 1 for p in params)     # k >= V keeps all
    probs = filtered_probs(logits, sampling.temperature, sampling.top_k if filters else None,
                           sampling.top_p if filters else None)
    if all(p.temperature > 0 for p in params):          # read from the host's params: no sync
        return probs
    greedy = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
    return torch.where((sampling.temperature == 0)[:, None], greedy, probs)


# A seeded request draws the noise of each sampling event from a counter-based generator
# keyed by (seed, position of the token, purpose). Its output is then a function of its seed
# and its own tokens only: the same alone or in any batch, and after a preemption. Counter-
# based (the noise is a hash of the key and the column, as Philox in cuRAND and JAX is)
# rather than a torch.Generator per request: a batch of 256 seeded requests then costs one
# set of elementwise kernels per step, not 256 generators and their launches.
SAMPLE, DRAFT, ACCEPT, RESIDUAL = range(4)
_M32 = 0xFFFFFFFF


def _mul32(h, c: int):
    """(h * c) mod 2^32 for h in [0, 2^32). A uint32 array's multiply wraps mod 2^32 by
    itself; an int or an int64 tensor (torch has few uint32 operations) splits c into 16-bit
    halves so that no product overflows 64 bits."""
    if isinstance(h, np.ndarray):
        return h * np.uint32(c)
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on values in [0, 2^32): each input bit flips each
    output bit with probability close to 1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _column_bits(k32, col):
    """24 random bits for each (row, column): k32 (B, 1) the rows' hashed keys, col (n,)
    column indices; int64 tensors or uint32 arrays, the same integers either way."""
    return _fmix32((col * 0x9E3779B9 + k32) & _M32) >> 8                          # (B, n)


def _uniform_rows(k32: np.ndarray, n: int) -> np.ndarray:
    """keyed_uniform's (B, n) uniforms as numpy from the rows' hashed keys k32 (B,) uint32.
    Rows go a block of about 64k values (256 KB) at a time, so that each of the hash's dozen
    passes over a block stays in the L2 cache: 3.5x faster than whole rows at n = 32,000."""
    u = np.empty((len(k32), n), dtype=np.float32)                                # (B, n)
    col = np.arange(n, dtype=np.uint32)
    rows = max(1, 2**16 // n)
    for i in range(0, len(k32), rows):
        block = u[i:i + rows]
        block[...] = _column_bits(k32[i:i + rows, None], col)       # 24-bit ints: exact in float32
        block += 0.5
        block *= 2.0 ** -24
    return u


def keyed_uniform(keys: list[int], n: int, device: torch.device | str) -> Tensor:
    """(len(keys), n) uniforms in (0, 1), row i a pure function of the 63-bit event key
    keys[i]: the key hashed to 32 bits, then column j is fmix32(key32 + j x the golden
    ratio) (a Weyl sequence through the finalizer, SplitMix's construction), 24 bits kept.
    The hash runs as numpy uint32 arrays on the CPU, whose multiply wraps mod 2^32 in one
    operation (256 x 2048 uniforms in 0.6 ms, against 3.9 ms as int64 tensors on 2 cores), and
    for a single column on any device (an acceptance test: a kernel launch would cost more);
    as int64 tensor kernels otherwise. The bits are the same."""
    device = torch.device(device)
    k = np.array(keys, dtype=np.uint64)
    k32 = _fmix32((k & _M32).astype(np.uint32) ^ _fmix32((k >> 32).astype(np.uint32)))   # (B,)
    if device.type == "cpu" or n == 1:
        return to_device(_uniform_rows(k32, n), device)
    bits = _column_bits(to_device(k32.astype(np.int64), device)[:, None],
                        torch.arange(n, device=device))
    return (bits.float() + 0.5) * 2.0 ** -24


def draw(probs: Tensor, keys: list[int | None], default: torch.Generator) -> Tensor:
    """One sample per row of probs (B, V) by the exponential race: with E_v ~ Exp(1)
    independent, argmax_v p_v / E_v is distributed as p. A seeded row (an event key, see
    Sampler) takes its noise from keyed_uniform, the others from the shared generator."""
    seeded = [i for i, k in enumerate(keys) if k is not None]
    V = probs.shape[-1]
    if len(seeded) == len(keys):                                  # all seeded: no shared draw
        noise = keyed_uniform(keys, V, probs.device).log_().neg_().to(probs.dtype)  # Exp(1): -log U
    else:
        noise = torch.empty_like(probs).exponential_(generator=default)
        if seeded:                                                # per-request seeds, one batch
            u = keyed_uniform([keys[i] for i in seeded], V, probs.device)
            noise[to_device(seeded, probs.device)] = u.log_().neg_().to(noise.dtype)
    return torch.div(probs, noise, out=noise).argmax(-1)


def sample(logits: Tensor, params: list[SamplingParams], keys: list[int | None], default: torch.Generator,
           sampling: SamplingMetadata | None = None) -> Tensor:
    """One token per row of logits (B, V). Temperature 0 is a plain argmax."""
    if all(p.temperature == 0 for p in params):
        return logits.argmax(-1)
    return draw(sampling_probs(logits, params, sampling), keys, default)


def top_logprobs(logprobs: Tensor, chosen: Tensor, n: int) -> list[dict[int, float]]:
    """(B, V) log-probabilities -> per row {token: logprob} with the chosen token and top n."""
    top = logprobs.topk(n, dim=-1) if n else None
    out = []
    for i in range(logprobs.shape[0]):
        d = {int(chosen[i]): float(logprobs[i, chosen[i]])}
        if top is not None:
            d.update(zip(top.indices[i].tolist(), top.values[i].tolist()))
        out.append(d)
    return out


class Sampler:
    """Draws the engine's random numbers: one shared generator (seeded by
    EngineConfig.seed) for unseeded requests, and keyed noise (keyed_uniform) for each
    sampling event of a seeded one. Applies the penalties, from the token counts it keeps
    per sequence (PenaltyCounts)."""

    def __init__(self, device: torch.device, seed: int, vocab_size: int, max_num_seqs: int):
        self.device, self.vocab_size = device, vocab_size
        self.default = torch.Generator(device).manual_seed(seed)
        self.penalty_counts = PenaltyCounts(vocab_size, device, max_num_seqs + 1)
        self._metadata: SamplingMetadata | None = None

    def metadata(self, params: list[SamplingParams]) -> SamplingMetadata:
        """params' SamplingMetadata: the last one made while the rows are the same requests
        in the same order (a batch that only decodes keeps its rows step after step, and then
        copies nothing), else a new one. A request's params are its own copy (make_sequence),
        never changed while it runs, so the objects' identity stands for their values."""
        last = self._metadata
        if last is None or len(last.params) != len(params) or any(a is not b for a, b in zip(params, last.params)):
            self._metadata = SamplingMetadata.make(params, self.vocab_size, self.device)
        return self._metadata

    @staticmethod
    def key(seed: int | None, position: int, purpose: int) -> int | None:
        """The key of a seeded request's event at `position` (None: the shared generator)."""
        if seed is None:
            return None
        return (seed * 0x9E3779B1 + position * 4 + purpose) % 2**63

    def sample(self, logits: Tensor, params: list[SamplingParams], positions: list[int]) -> Tensor:
        """(B, V) logits -> (B,) tokens; row i is the token at positions[i]."""
        greedy = all(p.temperature == 0 for p in params)         # argmax alone: no parameters to copy
        return sample(logits, params, [self.key(p.seed, pos, SAMPLE) for p, pos in zip(params, positions)],
                      self.default, None if greedy else self.metadata(params))

    def draw(self, probs: Tensor, keys: list[int | None]) -> Tensor:
        return draw(probs, keys, self.default)

    def penalize(self, logits: Tensor, params: list[SamplingParams], seqs: list[Sequence],
                 extra: list[list[int]] | None = None,
                 pending: tuple[Tensor, dict[Sequence, int]] | None = None) -> Tensor:
        """Penalties for rows that belong to sequences: row i is seqs[i] having also
        generated extra[i] (draft tokens, counted on top of its row). pending: the ids of the
        step still in flight (PenaltyCounts.rows)."""
        if not any(p.penalized for p in params):
            return logits
        if not any(p.counts_tokens for p in params):       # logit_bias alone: no counts needed
            return penalties_from_counts(logits, params, None, None)
        rows = self.penalty_counts.rows(seqs, pending)
        counts = self.penalty_counts.counts[rows]                                   # (B, V)
        if extra and any(extra):
            counts += token_counts(extra, logits.shape[-1], logits.device)
        return penalties_from_counts(logits, params, counts, self.penalty_counts.in_prompt[rows], self.metadata(params))


# ============================================================================ scheduler
# Continuous batching (Orca): scheduling happens at every step, not every batch. A
# finished sequence leaves at once and a waiting one takes its place in the next step,
# so the GPU never idles on a batch's longest request.
#
# Every sequence is just token_ids plus num_computed (tokens whose K/V are cached).
# A step computes num_tokens - num_computed tokens of it: the whole prompt (prefill),
# a chunk of it (chunked prefill) or one token (decode). When the step reaches the end
# of its tokens, a new token is sampled and appended (postprocess). The token is appended
# as PLACEHOLDER while its id is still on the device, and put in place (resolve) when the
# id reaches the host: with async scheduling that is after the next step has been launched,
# so the scheduler plans step n+1 with step n's tokens counted but not yet known.

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
PLACEHOLDER = -1                          # a sampled token whose id has not reached the host


@dataclass
class Metrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0
    spec_proposed: int = 0                # speculative draft tokens proposed / accepted
    spec_accepted: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    def time_per_output_token(self, num_tokens: int) -> float | None:
        if self.finished_time is None or self.first_token_time is None or num_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (num_tokens - 1)


@dataclass(eq=False)                      # identity semantics: sequences are dict keys
class Sequence:
    """What the scheduler knows of one sample of a request: its tokens and its cache. The
    text and logprobs a caller sees are the output processor's (engine section)."""
    request_id: str
    prompt: str | None
    token_ids: list[int]                  # prompt + generated so far
    num_prompt_tokens: int
    params: SamplingParams
    metrics: Metrics
    status: str = WAITING
    num_computed: int = 0                 # tokens whose K/V sit in the cache
    block_table: BlockTable = field(default_factory=BlockTable)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of its full blocks
    finish_reason: str | None = None
    forks_pending: list[SamplingParams] = field(default_factory=list)  # samples to start at the first token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]                 # a copy: O(length)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class SpeculativeDecoding(Protocol):
    """Speculative decoding as the scheduler and the engine use it (Speculator implements
    it, in its own section below). The scheduler gives a decoding sequence up to
    lookahead() draft slots when the draft's cache can hold them too (can_reserve, reserve,
    release); the engine has drafts proposed before the model runs and verified after it."""

    kv_bytes_per_token: int               # a draft model's KV cache, which shares the pool's budget
    reserved_bytes: int                   # what a draft model's steps take outside the pool (ModelRunner.reserved_bytes)

    def lookahead(self, seq: Sequence, budget: int) -> int: ...
    def can_reserve(self, seq: Sequence, k: int) -> bool: ...
    def reserve(self, seq: Sequence, k: int) -> None: ...
    def release(self, seq: Sequence) -> None: ...
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def propose(self, scheduled: dict[Sequence, int]) -> dict[Sequence, list[int]]: ...
    def verify(self, windows: list[tuple[Sequence, int]], drafts: dict[Sequence, list[int]],
               hidden: Tensor) -> dict[Sequence, tuple[list[int], Tensor]]: ...
    def acceptance_rate(self) -> float | None: ...
    def token_acceptance(self) -> float | None: ...
    def tokens_per_step(self) -> float | None: ...


class Scheduler:
    """Chooses, every step, which sequences run and how many tokens each computes; after
    the step, appends the sampled tokens and finishes sequences that are done."""

    def __init__(self, cfg: EngineConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_ids: set[int], speculator: SpeculativeDecoding | None = None):
        self.cfg, self.bm = cfg, block_manager
        self.max_model_len, self.eos_token_ids = max_model_len, eos_token_ids
        self.speculator = speculator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # in admission order
        self.num_preemptions = 0
        self.num_generated = 0
        self.block_copies: list[tuple[int, int]] = []  # (src, dst) copy-on-write, done before the step
        self.prompt_tokens = self.cached_prompt_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> dict[Sequence, int]:
        """-> {sequence: tokens to compute this step}, within the step's token budget:
        running sequences first (decodes before prefill chunks), then new admissions."""
        scheduled: dict[Sequence, int] = {}
        budget, preempted = self._schedule_running(scheduled, self.cfg.max_num_batched_tokens)
        if not preempted:                 # under memory pressure nothing new is admitted
            self._admit_waiting(scheduled, budget)
        return scheduled

    def _schedule_running(self, scheduled: dict[Sequence, int], budget: int) -> tuple[int, bool]:
        """Give every running sequence its next tokens, preempting when blocks run out.
        -> (budget left, whether anything was preempted)."""
        lookahead: dict[Sequence, int] = {}     # speculative slots reserved past a decode
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            if seq.status != RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            # A decode may also verify k draft tokens (speculative decoding), never a partial window.
            k = self.speculator.lookahead(seq, budget - 1) if self.speculator and n == 1 else 0
            while not self._can_grow(seq, n + k, k, self._shared_block(seq) is not None):
                # Out of blocks: preempt the most recently admitted sequence (recompute
                # later). If that is this sequence itself, it waits.
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                budget += scheduled.pop(victim, 0) + lookahead.pop(victim, 0)
                if victim is seq:
                    break
            if seq.status == RUNNING:
                self._copy_on_write(seq)
                self.bm.allocate(seq.block_table, seq.num_computed + n + k)
                if k:
                    self.speculator.reserve(seq, k)
                    lookahead[seq] = k
                scheduled[seq] = n
                budget -= n + k
        return budget, preempted

    def _admit_waiting(self, scheduled: dict[Sequence, int], budget: int) -> None:
        """Admit waiting sequences in arrival order while blocks, budget and seats last."""
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            # A new prompt is prefilled to its end and samples its first token. A preempted
            # sequence recomputes all but its last token and then decodes on as before, so
            # that what it samples next does not depend on having been preempted.
            target = seq.num_tokens - (1 if seq.num_output_tokens else 0)
            hits = [] if seq.params.prompt_logprobs is not None else self.bm.match_prefix(seq.token_ids)
            while hits and len(hits) * self.bm.block_size >= target:
                hits.pop()
            num_cached = len(hits) * self.bm.block_size
            n = target - num_cached
            if n > budget:
                if not self.cfg.enable_chunked_prefill:
                    break               # the whole prompt goes in one step, a later one
                n = budget
            if not self.bm.can_allocate(seq.block_table, num_cached + n, hits):
                break
            self.bm.allocate(seq.block_table, num_cached + n, hits)
            if seq.metrics.first_scheduled_time is None:     # count each prompt once
                seq.metrics.first_scheduled_time = time.perf_counter()
                seq.metrics.num_cached_prompt_tokens = min(num_cached, seq.num_prompt_tokens)
                self.prompt_tokens += seq.num_prompt_tokens
                self.cached_prompt_tokens += seq.metrics.num_cached_prompt_tokens
            seq.num_computed = num_cached
            seq.status = RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled[seq] = n
            budget -= n

    def _can_grow(self, seq: Sequence, num_slots: int, k: int, copy: bool = False) -> bool:
        """Are there blocks for num_slots more cache slots (and for k drafts, if any, and for
        a copy of a shared block)?"""
        fits = self.bm.can_allocate(seq.block_table, seq.num_computed + num_slots, extra=int(copy))
        return fits and (k == 0 or self.speculator.can_reserve(seq, k))

    def _shared_block(self, seq: Sequence) -> int | None:
        """The index in seq's table of the block its next token is written to, if that block
        is shared with another sample (a partly filled prompt block after a fork)."""
        i = seq.num_computed // self.bm.block_size
        if i < len(seq.block_table) and self.bm.ref_count[seq.block_table[i]] > 1:
            return i
        return None

    def _copy_on_write(self, seq: Sequence) -> None:
        """Give seq its own copy of the shared block it is about to write (PagedAttention's
        copy-on-write): the copy is made on the device before the step runs."""
        i = self._shared_block(seq)
        if i is not None:
            new = self.bm.allocate_one()
            self.block_copies.append((seq.block_table[i], new))
            self.bm.release([seq.block_table[i]])
            seq.block_table[i] = new

    def preempt(self, seq: Sequence) -> None:
        """Free all of seq's blocks; it will recompute its tokens (prefix cache permitting)."""
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.status = WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING and seq in self.waiting:     # (a new sample not yet started is not)
            self.waiting.remove(seq)
        self._free_blocks(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        seq.metrics.finished_time = time.perf_counter()

    def _free_blocks(self, seq: Sequence) -> None:
        self.bm.release(seq.block_table)
        seq.block_hashes.clear()
        if self.speculator:
            self.speculator.release(seq)

    # -------------------------------------------------------------- after a step

    def postprocess(self, scheduled: dict[Sequence, int], new_tokens: dict[Sequence, list[int]],
                    forks: dict[Sequence, list[Sequence]] | None = None) -> None:
        """Token bookkeeping after a step: advance what is cached, append the new tokens,
        name newly completed blocks for the prefix cache, and finish what is done.

        new_tokens[seq] is one sampled token (a PLACEHOLDER until resolve), or (speculative
        decoding) the accepted drafts followed by one more token; a prefill chunk with more
        to come has none. forks[seq]: new samples of seq's request (n, best_of), each with
        a sampled first token; they share seq's prompt blocks from here on.
        """
        for seq, n in scheduled.items():
            if seq.status == FINISHED:        # ended by the previous step's tokens (resolve)
                continue
            tokens = new_tokens.get(seq, [])
            # Tokens before the last one are accepted drafts, whose K/V this step computed.
            seq.num_computed += n + max(0, len(tokens) - 1)
            # Give back lookahead slots past what is kept (rejected drafts' K/V).
            self.bm.truncate(seq.block_table, seq.num_computed)
            for child in (forks or {}).get(seq, []):
                self._fork(seq, child)
            reason = None
            for t in tokens:
                seq.token_ids.append(t)
                self.num_generated += 1
                reason = self._finish_reason(seq, t)
                if reason:
                    break
            self.bm.cache_full_blocks(seq.block_table, seq.block_hashes, seq.token_ids,
                                      min(seq.num_computed, seq.num_tokens))
            if reason:
                self.finish(seq, reason)

    def take_block_copies(self) -> list[tuple[int, int]]:
        copies, self.block_copies = self.block_copies, []
        return copies

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child`, a new sample of parent's request, on parent's blocks (whose K/V
        hold the prompt), with its own first token (sampled: a PLACEHOLDER until resolve)."""
        child.block_table = self.bm.fork(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed, child.status = parent.num_computed, RUNNING
        child.metrics.first_scheduled_time = parent.metrics.first_scheduled_time
        self.running.append(child)
        child.token_ids.append(PLACEHOLDER)
        self.num_generated += 1
        reason = self._finish_reason(child, PLACEHOLDER)
        if reason:
            self.finish(child, reason)

    def resolve(self, seq: Sequence, index: int, token: int) -> bool:
        """The id sampled for seq.token_ids[index] (a PLACEHOLDER) has reached the host: put
        it in place; an EOS ends seq there. -> False when seq ended before it (an EOS or a
        stop string of the previous step, an abort): the step's work for it is discarded.
        A sequence that reached max_tokens with this token ended in postprocess already."""
        if seq.finish_reason not in (None, "length") or index >= seq.num_tokens \
                or seq.token_ids[index] != PLACEHOLDER:
            return False
        seq.token_ids[index] = token
        now = time.perf_counter()
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        if seq.status == FINISHED:                  # at max_tokens: it ends now that the token is here
            seq.metrics.finished_time = now
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            self.stop(seq, index + 1 - seq.num_prompt_tokens)
        return True

    def drop_pending(self, seq: Sequence) -> None:
        """Drop seq's trailing placeholders (a failed step's tokens, never resolved)."""
        while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()
            self.num_generated -= 1

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        """-> "stop" (an EOS token) or "length" when seq ends with its new token (an EOS
        still on the device ends it in resolve). Stop strings need the text, which the
        output processor makes: it ends the sequence with stop() when one appears."""
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return "stop"
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def stop(self, seq: Sequence, num_output_tokens: int) -> None:
        """End seq after its first num_output_tokens generated tokens (a stop string ends
        there); the tokens after them are dropped. seq may have ended in this step already."""
        self.num_generated -= seq.num_output_tokens - num_output_tokens
        del seq.token_ids[seq.num_prompt_tokens + num_output_tokens:]
        if seq.status == FINISHED:
            seq.finish_reason = "stop"
        else:
            self.finish(seq, "stop")


# ============================================================================ model runner
# The model runner turns a scheduled batch into tensors and runs the forward pass. It
# owns what lives on the device for one model: the KV cache pool, the per-step input
# tensors (token ids, positions, cache slots, block tables) and the CUDA graphs.

def fill_pending(ids: Tensor, pending: Tensor | None) -> Tensor:
    """Token ids (N,) in which -1 - j stands for pending[j]: with async scheduling the host
    launches a step before the previous one's sampled ids (pending, on the device) have
    reached it, so a decode's input is taken from them on the device."""
    if pending is None:
        return ids
    return torch.where(ids >= 0, ids, pending[(-1 - ids).clamp(min=0)])


def capture_graph(run: Callable[[], Tensor | None], pool: tuple | None) -> tuple[torch.cuda.CUDAGraph, Tensor | None]:
    """run() recorded as a CUDA graph that allocates from pool (None: a new one; graph.pool()
    shares it) -> (the graph, what run returned while recorded: a tensor in the pool, which
    each replay rewrites). run is warmed up once on a side stream first: lazy initialisation
    (kernel loading, cuBLAS handles) must not be recorded."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


class DecodeGraphs:
    """Decode steps replayed as CUDA graphs, one graph per bucketed batch size and
    context length.

    A decode step launches about ten kernels per layer, hundreds in all, and each launch
    costs the CPU a few microseconds: for a small model, or at batch 1, the GPU finishes
    the work faster than Python can launch it. A CUDA graph records the launches of one
    forward pass once and replays them with a single call. A graph reads and writes fixed
    addresses, so each step copies its inputs into a static buffer (one host-to-device
    copy; the graph itself spreads them into the model's inputs), and a graph exists
    per batch size: a batch is padded up to the next bucket (padding rows write their K/V
    to slot -1, which the cache write skips, and attend over a context of 0 tokens).
    Attention's Flash-Decoding grid (how many splits of the context, kernels.decode_partition)
    is fixed in a graph too, sized for a bound on the context: so that short contexts are
    not split as a 32k one would be (into blocks that find no keys), the bound is bucketed
    as well, by powers of two up to max_context_len, and a step takes the smallest bucket
    its longest context fits. The smallest bucket is MIN_CONTEXT_BUCKET keys: below it a
    smaller bound would save only a few empty blocks, at the price of more graphs.
    Graphs are captured on first use of a bucket and share one memory pool (vLLM captures
    every bucket at start-up instead; a capture waits for the device, once per bucket).
    capture=False runs the same padded static-buffer path eagerly: the CPU tests check it,
    a GPU captures it.
    """

    MIN_CONTEXT_BUCKET = 256

    def __init__(self, model: LlamaForCausalLM, kv_cache: Tensor, max_batch: int, max_blocks: int,
                 max_context_len: int, capture: bool = True, split_counters: Tensor | None = None):
        self.model, self.kv_cache, self.capture = model, kv_cache, capture
        self.split_counters = split_counters            # AttentionMetadata's
        top = min(max_batch, 256)                      # larger decode batches run eagerly
        sizes = sorted({1, 2, 4, *range(8, 257, 8), kernels.NORM_FOLD_MAX_ROWS} - {0})   # the fold's bound too
        self.buckets = [b for b in sizes if b < top] + [top]
        self.max_blocks = max_blocks
        first = self.MIN_CONTEXT_BUCKET.bit_length() - 1                 # 256 -> 2^8
        self.context_buckets = sorted({min(1 << k, max_context_len) for k in range(first, 31)})
        dev = kv_cache.device
        # A step's inputs cross to the device in one copy: written on the host into one int32
        # buffer (pinned, so the copy neither waits for the GPU nor makes it wait; the next
        # step writes it once the copy is done, `copied`), then spread over the model's
        # inputs by the graph's first kernels. Its first 3 x top entries take the ids,
        # positions and slots of a bucket of b rows (3 x b of them); the rest holds a block
        # table per row, which attention reads where it lies, and persists between steps: a
        # row whose sequence held it in the previous step too gets only its table's changed
        # entries. The copy takes whole rows, n x max_blocks entries (as vLLM's block table
        # does): 8 MB at 256 sequences of a 128k context, a fraction of a millisecond.
        self.host_inputs = torch.zeros(top * (3 + max_blocks), dtype=torch.int32, pin_memory=dev.type == "cuda")
        self.host_tables = self.host_inputs[3 * top:].view(top, max_blocks).numpy()     # (top, max_blocks)
        self.row_tables: list[BlockTable | list[int] | None] = [None] * top   # the table each row holds
        self.inputs = torch.zeros_like(self.host_inputs, device=dev)
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)                 # (B,)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)                 # (B,)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=dev)        # (B,)
        self.block_tables = self.inputs[3 * top:].view(top, max_blocks)                  # (B, max_blocks)
        self.context_lens = torch.zeros(top, dtype=torch.int32, device=dev)              # (B,)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=dev)      # one token each
        # With async scheduling a decode's input id is the previous step's sampled id, still
        # on the device (fill_pending): copied here before the replay. A step samples at most
        # 64 ids per sequence (n, best_of <= 64).
        self.pending = torch.zeros(64 * max_batch, dtype=torch.int64, device=dev)
        self.copied: torch.cuda.Event | None = None    # recorded after each step's copy of host_inputs
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}   # (batch, context) buckets
        self.pool = None
        self.steps = 0                                 # decode steps served

    def fits(self, num_seqs: int, width: int) -> bool:
        return num_seqs <= self.buckets[-1] and width <= self.max_blocks

    def _spread(self, b: int) -> None:
        """A bucket's ids (pending ones filled in), positions, slots and context lengths, from
        the input buffer into the model's inputs: the first kernels of its graph."""
        ids, pos, slots = self.inputs[:3 * b].view(3, b)                                 # 3 x (b,)
        self.input_ids[:b].copy_(fill_pending(ids, self.pending))
        self.positions[:b].copy_(pos)
        self.slot_mapping[:b].copy_(slots)
        torch.mul(pos + 1, slots >= 0, out=self.context_lens[:b])     # position + 1; a padding row's 0

    def _forward(self, b: int, ctx: int) -> Tensor:
        self._spread(b)
        meta = AttentionMetadata(self.slot_mapping[:b], self.block_tables[:b], self.query_start_loc[:b + 1],
                                 self.context_lens[:b], max_context_len=ctx, max_query_len=1, rope_in_attention=True,
                                 split_counters=self.split_counters)
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, meta)   # (b, D)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            pending: Tensor | None = None) -> Tensor:
        """One decode step of n sequences (token ids, their positions, cache slots and
        block tables) -> hidden states (n, D). An id -1 - j is pending[j] (fill_pending)."""
        n = len(ids)
        b = next(x for x in self.buckets if x >= n)
        ctx = next(x for x in self.context_buckets if x > max(positions))     # longest context: max + 1
        pad = b - n
        top = len(self.row_tables)
        if self.copied is not None:          # with async scheduling the last copy may still be queued
            self.copied.synchronize()
        self.host_inputs.numpy()[:3 * b] = ids + [0] * pad + positions + [0] * pad + slots + [-1] * pad
        for row, table in enumerate(tables):
            kept = getattr(table, "synced", 0) if self.row_tables[row] is table else 0   # a plain list: 0
            if kept < len(table):
                self.host_tables[row, kept:len(table)] = table[kept:]
            if isinstance(table, BlockTable):
                table.synced = len(table)
            self.row_tables[row] = table
        self.row_tables[n:] = [None] * (top - n)
        # Only the real rows' tables: a row reads no entry past its own context (entries past
        # a table's end are stale, never read), a padding row none.
        inputs = self.inputs[:3 * top + n * self.max_blocks]
        inputs.copy_(self.host_inputs[:len(inputs)], non_blocking=True)
        if inputs.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()
        if pending is not None:
            if len(pending) <= len(self.pending):
                self.pending[:len(pending)].copy_(pending)
            else:                                      # more than the buffer: filled in here instead
                self.inputs[:n].copy_(fill_pending(self.inputs[:n], pending))
        self.steps += 1
        if not self.capture:
            return self._forward(b, ctx)[:n]
        if (b, ctx) not in self.graphs:
            self.graphs[b, ctx] = self._capture(b, ctx)
        graph, out = self.graphs[b, ctx]
        graph.replay()
        return out[:n]

    def _capture(self, b: int, ctx: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # The warm-up writes the same K/V the replay will write, so it changes nothing.
        graph, out = capture_graph(lambda: self._forward(b, ctx), self.pool)    # out: (b, D)
        self.pool = graph.pool()
        return graph, out


# Steps of more tokens run eagerly: their kernels outlast their launches (an estimate, not a
# timing here; vLLM's largest capture size is 512 too).
PIECEWISE_MAX_TOKENS = 512


class PiecewiseGraphs:
    """Every step of up to PIECEWISE_MAX_TOKENS tokens that the decode graphs do not take
    (prefill chunks, alone or beside decodes; speculative verification windows), replayed
    as CUDA graphs captured piecewise around attention (vLLM's piecewise CUDA graphs).

    A short prompt's prefill launches as many kernels as a decode step and its GPU work is
    nearly as short, so its time to first token is launch time too. One graph cannot hold a
    whole step, as it does a decode step: attention's work depends on how the step's tokens
    split into sequences (their number, their query and context lengths), which changes
    every step; everything else works token by token. So the model is cut at each layer's
    attention: graph 0 is the embedding and layer 0 up to attention (norm, projections, RoPE
    and the cache write), graph i layer i-1's rest (output projection, norm, MLP) and layer
    i up to attention, graph L the last layer's rest and the final norm. Attention runs
    eagerly between the graphs, reading q from one fixed buffer and writing its output to
    another; the residual stream passes between graphs in a third. A step is padded up to
    a bucket of tokens (padding tokens write their K/V to slot -1, which the cache write
    skips, and belong to no sequence, so nobody attends to them). The buckets' edges include
    the quantized matmul's kernel thresholds (16 and 255 rows: kernels.quant_linear_cuda
    picks its kernel by rows; the add + norm fold's, kernels.NORM_FOLD_MAX_ROWS), so padding
    never sends a step to another kernel than its own size takes, with powers of two between
    and 3 below (a verification window of a few draft tokens is not padded to 16). Every
    bucket's L + 1 graphs are captured at the first step that needs one, largest bucket
    first (the smaller ones then fit in the memory its capture took), into one pool; a
    capture waits for the device, so it happens once, not whenever a new size comes.
    capture=False runs the same pieces eagerly (the CPU tests check it, a GPU captures it).
    """

    def __init__(self, model: LlamaForCausalLM, kv_cache: Tensor, max_tokens: int, capture: bool = True):
        self.model, self.kv_cache, self.capture = model, kv_cache, capture
        self.layers = model.model.layers
        edges = sorted({3, kernels.QUANT_MMA_MAX_ROWS, 32, 64, 128, kernels.QUANT_GEMM_MAX_ROWS - 1} |
                       {r for r in (kernels.DENSE_MMA_MAX_ROWS, kernels.NORM_FOLD_MAX_ROWS) if r})
        self.buckets = [b for b in edges if b < max_tokens] + [max_tokens]
        c, top, dev = model.config, max_tokens, kv_cache.device
        dtype = model.model.embed_tokens.weight.dtype                  # the activations'
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=dev)                        # (T,)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)                        # (T,)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=dev)               # (T,)
        self.q = torch.zeros(top, c.num_attention_heads, c.head_dim, dtype=dtype, device=dev)   # (T, H, hd)
        self.o = torch.zeros(top, c.num_attention_heads * c.head_dim, dtype=dtype, device=dev)  # (T, H*hd)
        self.residual = torch.zeros(top, c.hidden_size, dtype=dtype, device=dev)                # (T, D)
        self.no_index = torch.zeros(0, dtype=torch.int32, device=dev)  # metadata the pieces do not read
        self.graphs: dict[int, tuple[list[torch.cuda.CUDAGraph], Tensor]] = {}   # bucket -> graphs, output
        self.pool = None
        self.steps = 0                                 # steps served

    def _piece(self, i: int, b: int) -> Tensor | None:
        """Graph i's work on the first b tokens; the last piece returns the hidden states (b, D)."""
        if i == 0:
            x = self.model.model.embed_tokens(self.input_ids[:b])                               # (b, D)
            h, residual = self.layers[0].input_layernorm(x), x
        else:
            h, residual = self.layers[i - 1].after_attention(self.o[:b], self.residual[:b],
                                                             self.model.norm_after(i - 1))
        if i == len(self.layers):
            return h
        # The pieces write the cache and do not attend: of the metadata, only the slots are read.
        meta = AttentionMetadata(self.slot_mapping[:b], self.no_index.view(0, 0), self.no_index, self.no_index, 0, 0)
        q = self.layers[i].self_attn.project(h, self.positions[:b], self.kv_cache[i], meta, self.model.rope)
        self.q[:b].copy_(q)
        self.residual[:b].copy_(residual)
        return None

    def run(self, input_ids: Tensor, positions: Tensor, slot_mapping: Tensor, meta: AttentionMetadata) -> Tensor:
        """One step's T tokens (ids, positions and cache slots, (T,) each on the device; meta:
        the step's attention metadata) -> hidden states (T, D), a tensor of their own (the next
        step rewrites the graphs' output; a prompt chunk's rows may be read after it)."""
        T = input_ids.shape[0]
        b = next(x for x in self.buckets if x >= T)
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        self.slot_mapping[:T].copy_(slot_mapping)
        self.slot_mapping[T:] = -1                                     # padding: no K/V written
        if self.capture and not self.graphs:                          # all or none: a failed capture is retried
            self.graphs = {bucket: self._capture(bucket) for bucket in reversed(self.buckets)}
        out = None
        for i in range(len(self.layers) + 1):
            if self.capture:
                self.graphs[b][0][i].replay()
            else:
                out = self._piece(i, b)
            if i < len(self.layers):
                self.o[:T].copy_(self.layers[i].self_attn.attend(self.q[:T], self.kv_cache[i], meta, self.model.rope))
        self.steps += 1
        return (self.graphs[b][1] if self.capture else out)[:T].clone()

    def _capture(self, b: int) -> tuple[list[torch.cuda.CUDAGraph], Tensor]:
        # A piece's warm-up writes K/V at this step's slots (the others are -1) from whatever
        # the buffers hold; the replays that follow write them again before attention reads them.
        graphs, out = [], None
        for i in range(len(self.layers) + 1):
            graph, out = capture_graph(lambda i=i: self._piece(i, b), self.pool)  # the last piece's out: (b, D)
            self.pool = graph.pool()
            graphs.append(graph)
        return graphs, out


class ModelRunner:
    """Runs one model (the target, or a speculative draft) over flat batches of tokens."""

    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, max_positions: int):
        self.model, self.cfg = model, cfg
        self.device, self.dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        self.max_positions = max_positions         # longest sequence, speculative lookahead included
        model.init_rope(max_positions, self.device)
        fuse_projections(model)
        self.kv_cache: Tensor | None = None
        # Decode attention's split counters (AttentionMetadata.split_counters), one per
        # sequence and KV head of the largest step: one buffer, whose address graphs keep
        # (run grows it for an eager step past max_num_seqs: a request's samples join the
        # running batch after its admission, see Scheduler._fork).
        self.split_counters = torch.zeros(cfg.max_num_seqs * model.config.num_key_value_heads, dtype=torch.int32,
                                          device=self.device)
        # CUDA graphs for decode steps, made on first use. Only with the CUDA kernels: the
        # reference attention syncs with the host, which a graph cannot record.
        self.use_graphs = self.device.type == "cuda" and not cfg.enforce_eager and kernels.USE_CUDA_KERNELS
        self.graphs: DecodeGraphs | None = None
        # The other steps of up to PIECEWISE_MAX_TOKENS tokens: piecewise graphs, made on first
        # use too. Not with tensor parallelism (its collectives run between the layers' ops).
        self.use_piecewise_graphs = self.use_graphs and cfg.tensor_parallel_size == 1
        self.piecewise_max_tokens = min(cfg.max_num_batched_tokens, PIECEWISE_MAX_TOKENS)
        self.piecewise: PiecewiseGraphs | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer and KV head for one token."""
        c = self.model.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def kv_budget_bytes(self) -> int:
        """Memory the KV pool(s) may take: a share of free GPU memory less reserved_bytes.
        On the CPU, EngineConfig.kv_cache_bytes, else a share of the available memory."""
        if self.device.type != "cuda":
            return self.cfg.kv_cache_bytes or int(available_cpu_memory() * CPU_KV_MEMORY_FRACTION)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * self.cfg.gpu_memory_utilization) - self.reserved_bytes

    @property
    def reserved_bytes(self) -> int:
        """GPU memory this model's steps take beside the KV pool: the activations of the
        largest step, its logits and the penalty counts (Sampler), and for a quantized model
        the dense temporary the largest quantized matmul (a fused one included) dequantizes
        into when a step has enough rows (kernels.quant_linear_dequantizes: 256, or 17 for
        layouts the mma kernels do not take); with piecewise graphs, whose pool keeps what a
        step of theirs allocates, the activations of their largest step once more, and the
        temporary if that step makes one. 0 on the CPU (its budget is set apart)."""
        if self.device.type != "cuda":
            return 0
        c = self.model.config
        per_token = (4 * c.hidden_size + 3 * c.intermediate_size) * 4           # a token's activations, fp32 at most
        act = self.cfg.max_num_batched_tokens * per_token \
            + self.cfg.max_num_seqs * c.vocab_size * 4 * 4 \
            + 2 * (self.cfg.max_num_seqs + 1) * c.vocab_size * 5      # penalty counts, and a copy as they grow
        fused = [f for layer in self.model.model.layers for f in (layer.self_attn.qkv, layer.mlp.gate_up)]
        quantized = [m for m in [*self.model.modules(), *fused] if isinstance(m, (QuantLinear, FusedQuantLinear))]
        dequant = max((m.in_features * m.out_features * self.dtype.itemsize for m in quantized), default=0)
        graphs = 0
        if self.use_piecewise_graphs:
            graphs = self.piecewise_max_tokens * per_token
            if any(kernels.quant_linear_dequantizes(self.piecewise_max_tokens, m.in_features, m.bits, m.group_size,
                                                    self.dtype, self.device) for m in quantized):
                graphs += dequant                                         # its largest bucket dequantizes
        return act + dequant + graphs

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The pool, allocated once: (layers, K/V, blocks, block_size, kv_heads, head_dim)."""
        c = self.model.config
        shape = (c.num_hidden_layers, 2, num_blocks, self.cfg.block_size, c.num_key_value_heads, c.head_dim)
        self.kv_cache = zeros_committed_on_use(shape, self.dtype) if self.device.type == "cpu" else \
            torch.zeros(shape, dtype=self.dtype, device=self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's K/V, every layer, into block dst."""
        src = to_device([a for a, _ in copies], self.device, torch.long)
        dst = to_device([b for _, b in copies], self.device, torch.long)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]          # (L, 2, n, block_size, Hkv, hd)

    def run(self, tokens: list[list[int]], starts: list[int], tables: list[list[int]],
            pending: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """One forward pass over a flat batch: sequence i computes tokens[i], which sit at
        positions starts[i], starts[i] + 1, ... and whose K/V go to the blocks of tables[i].
        A token -1 - j is pending[j], the previous step's j-th sampled id (fill_pending).
        -> (hidden (T, D), the row of each sequence's first token)."""
        bs = self.cfg.block_size
        if all(len(t) == 1 for t in tokens):               # decodes only: a token each, in one pass per list
            ids, pos, rows = [t[0] for t in tokens], starts, list(range(len(tokens) + 1))
            slots = [table[c // bs] * bs + c % bs for table, c in zip(tables, starts)]
        else:
            ids, pos, slots, rows = [], [], [], [0]
            for toks, c, table in zip(tokens, starts, tables):
                ids += toks
                pos += range(c, c + len(toks))
                slots += [table[p // bs] * bs + p % bs for p in range(c, c + len(toks))]
                rows.append(rows[-1] + len(toks))
        width = max(map(len, tables))
        if self.use_graphs and len(ids) == len(tokens):                  # a pure decode step
            if self.graphs is None:
                self.graphs = DecodeGraphs(self.model, self.kv_cache, self.cfg.max_num_seqs,
                                           -(-self.max_positions // bs), self.max_positions,
                                           capture=self.device.type == "cuda", split_counters=self.split_counters)
            if self.graphs.fits(len(tokens), width):
                return self.graphs.run(ids, pos, slots, tables, pending), rows[:-1]
        S, T = len(tokens), len(ids)
        lens = [c + len(t) for c, t in zip(starts, tokens)]
        if S * self.model.config.num_key_value_heads > len(self.split_counters):
            self.split_counters = torch.zeros(S * self.model.config.num_key_value_heads, dtype=torch.int32,
                                              device=self.device)
        piecewise = self.use_piecewise_graphs and T <= self.piecewise_max_tokens
        # The CPU plan gathers the cache through indices of its own, made from the table
        # lists; the padded tables are for the other paths (the piecewise graphs' pieces, which
        # write the cache without a plan, included).
        cpu_plan = self.device.type == "cpu" and kernels.USE_CPU_FAST_PATHS and not piecewise
        # One copy to the device: the step's ids, positions, slots, sequence starts, context
        # lengths and padded block tables, written into one int32 host buffer and split there.
        W = 0 if cpu_plan else width
        host = np.zeros(3 * T + 2 * S + 1 + S * W, dtype=np.int32)
        host[:3 * T + 2 * S + 1] = ids + pos + slots + rows + lens
        if W:
            padded = host[3 * T + 2 * S + 1:].reshape(S, W)                          # (S, W)
            for i, table in enumerate(tables):
                padded[i, :len(table)] = table
        input_ids, positions, slot_mapping, starts_loc, context_lens, block_tables = \
            to_device(host, self.device).split([T, T, T, S + 1, S, S * W])
        input_ids, positions, slot_mapping = input_ids.long(), positions.long(), slot_mapping.long()  # (T,) each
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=block_tables.view(S, W),
            query_start_loc=starts_loc, context_lens=context_lens,
            max_context_len=max(lens), max_query_len=max(map(len, tokens)),
            rope_in_attention=T == S and self.device.type == "cuda" and not piecewise,
            split_counters=self.split_counters)
        if piecewise:
            if self.piecewise is None:
                self.piecewise = PiecewiseGraphs(self.model, self.kv_cache, self.piecewise_max_tokens,
                                                 capture=self.device.type == "cuda")
            return self.piecewise.run(fill_pending(input_ids, pending), positions, slot_mapping, meta), rows[:-1]
        if cpu_plan:
            # The layers' shared work, done once: cos/sin rows, gather indices, masks.
            meta.cpu_plan = kernels.plan_cpu_step([len(t) for t in tokens], lens, tables, positions,
                                                  slot_mapping, *self.model.rope, bs,
                                                  self.model.config.num_key_value_heads)
        hidden = self.model(fill_pending(input_ids, pending), positions, self.kv_cache, meta)
        return hidden, rows[:-1]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.model.compute_logits(hidden)                              # (N, V) fp32


# ============================================================================ engine
# The engine runs the loop of continuous batching. Each step: schedule -> copy shared blocks
# -> propose drafts -> run the model -> sample (or verify the drafts) -> postprocess (the
# scheduler appends the tokens) -> outputs (the output processor turns ids into text).
# With async scheduling (vLLM's name; SGLang's overlap scheduler) a step's outputs are made
# in the next step, after it is launched: the GPU never waits for the host's bookkeeping,
# and the scheduler plans with the previous step's tokens as placeholders.

# ---------------------------------------------------------------------------- outputs
# What a caller sees of a request is made here, after the scheduler has appended a step's
# tokens: the text (incremental detokenization), stop strings (which end a sequence on the
# token that completes one), logprobs, and the samples of a request (n, best_of) gathered
# into one RequestOutput. The scheduler sees token ids only. A request costs here what its
# caller asked for: one that streams gets a RequestOutput at every step that gives it
# tokens; one that does not (LLM.generate, a non-streaming HTTP request) gets one when all
# its samples have finished, and unless it has stop strings (which need the text as it
# grows) its text is made then too, in one pass over its ids. The server asks the same
# processor for the text of logprobs' tokens and alternatives.

@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's name): a request with n (or best_of) samples has several."""
    index: int
    text: str
    token_ids: list[int]
    delta: str                            # text new since the previous output
    logprobs: list[dict[int, float]] | None
    cumulative_logprob: float | None      # sum of the chosen tokens' logprobs (n > 1 or logprobs)
    finish_reason: str | None
    token_texts: list[str] | None


@dataclass
class RequestOutput:
    """What generate() returns per prompt, and what the stream yields per step. The fields
    from token_ids to finish_reason are those of the first sample; `outputs` has every
    sample (n of them; with best_of, the n of highest cumulative logprob once finished)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]                  # generated ids only
    text: str
    delta: str                            # text new since the previous output of this request
    logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[dict[int, float] | None] | None
    finish_reason: str | None             # "stop", "length", "abort" or "error"
    metrics: dict
    error: str | None = None              # what failed, when finish_reason is "error"
    token_texts: list[str] | None = None  # per generated token, the text it added (they join to text)
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopStrings:
    """A request's stop strings, matched as its text grows: an Aho-Corasick automaton.

    The strings form a trie; each node also links to the node of its longest proper suffix
    that is a trie node too (fail), and knows the longest stop string ending there (itself
    or along its fail links). Feeding the text one character at a time, a sample keeps its
    node between steps, so checking a token's new text costs O(new characters) amortized,
    whatever the number and length of the stop strings. The text ends before the stop
    string that ends first (the longest, if several end at the same character), which is
    what checking after every single character would give.
    """

    def __init__(self, stops: list[str]):
        self.max_len = max(map(len, stops))
        self.goto: list[dict[str, int]] = [{}]            # node -> {character: child}
        self.longest = [0]                                # longest stop string ending at the node
        for s in stops:
            node = 0
            for ch in s:
                if ch not in self.goto[node]:
                    self.goto[node][ch] = len(self.goto)
                    self.goto.append({})
                    self.longest.append(0)
                node = self.goto[node][ch]
            self.longest[node] = len(s)
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())              # breadth first: a fail link points up
        while queue:
            node = queue.popleft()
            for ch, child in self.goto[node].items():
                self.fail[child] = self.step(self.fail[node], ch) if node else 0
                self.longest[child] = max(self.longest[child], self.longest[self.fail[child]])
                queue.append(child)

    def step(self, node: int, ch: str) -> int:
        """The node after reading ch at node."""
        while node and ch not in self.goto[node]:
            node = self.fail[node]
        return self.goto[node].get(ch, 0)

    def feed(self, node: int, text: str, start: int) -> tuple[int, int]:
        """Read text[start:] from node (where text[:start] left the automaton) -> (the node
        after it, where the first stop string ending at text[start] or later begins, or -1)."""
        for end in range(start, len(text)):
            node = self.step(node, text[end])
            if self.longest[node]:
                return node, end - self.longest[node] + 1
        return node, -1

    def find(self, text: str, start: int) -> int:
        """Where the first stop string ending at text[start] or later begins; -1 if none.
        Without a kept node: such a string begins at start - max_len + 1 or later, so the
        automaton reads from there."""
        node = 0
        for end in range(max(0, start - self.max_len + 1), len(text)):
            node = self.step(node, text[end])
            if end >= start and self.longest[node]:
                return end - self.longest[node] + 1
        return -1


class SampleState:
    """The output side of one sample (one Sequence): its text and its logprobs so far."""

    def __init__(self, seq: Sequence, index: int, detok: IncrementalDetokenizer | None):
        self.seq, self.index, self.detok = seq, index, detok
        self.text = ""
        self.token_texts: list[str] = []     # the text each generated token added (they join to text)
        self.final = False                   # the text is complete (the sequence ended)
        self.stop_node = 0                   # where its text has left the stop strings' automaton
        self.num_chars_streamed = 0          # characters of text already in an output's delta
        self.logprobs: list[dict[int, float]] | None = [] if seq.params.logprobs is not None else None
        self.chosen_logprobs: list[float] = []   # the chosen tokens' (n > 1 or logprobs asked for)

    @property
    def cumulative_logprob(self) -> float:
        """The sum over its generated tokens (best_of ranks samples by it)."""
        return sum(self.chosen_logprobs)


@dataclass(eq=False)
class RequestState:
    """The output side of one request: its samples (one, or n / best_of of them)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool                          # an output at every step with new tokens, not only the last
    stops: StopStrings | None             # params.stop as a matcher, shared by the samples
    samples: list[SampleState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class OutputProcessor:
    """Token ids -> what callers see: text, stop strings, logprobs, RequestOutputs. Its text
    helpers for logprobs (token_text, text_after, prompt_texts) read only the tokenizer, so
    the server's event loop may call them while the engine's thread steps."""

    def __init__(self, tokenizer: Tokenizer | HFTokenizer | None, scheduler: Scheduler):
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.requests: dict[str, RequestState] = {}
        self.samples: dict[Sequence, SampleState] = {}

    def add(self, seq: Sequence, stream: bool) -> None:
        """Follow a new request (its first sample, seq)."""
        stops = StopStrings(seq.params.stop) if seq.params.stop and self.tokenizer else None
        req = RequestState(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], seq.params,
                           stream, stops)
        self.requests[seq.request_id] = req
        self.add_sample(req, seq)

    def add_sample(self, req: RequestState, seq: Sequence) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids) if self.tokenizer else None
        state = SampleState(seq, len(req.samples), detok)
        req.samples.append(state)
        self.samples[seq] = state

    def remove(self, request_id: str) -> list[Sequence]:
        """Forget a request (finished, failed or aborted) -> its samples' sequences."""
        req = self.requests.pop(request_id, None)
        for s in req.samples if req else []:
            del self.samples[s.seq]
        return [s.seq for s in req.samples] if req else []

    def wants_logprobs(self, seq: Sequence) -> bool:
        """Logprobs asked for, or a sample among several (their cumulative logprobs rank them)?"""
        return seq.params.logprobs is not None or self.requests[seq.request_id].params.num_samples > 1

    # -------------------------------------------------------------- logprobs

    def record_logprobs(self, new_tokens: dict[Sequence, list[int]], logits: dict[Sequence, Tensor]) -> None:
        """Logprobs of a step's new tokens new_tokens[seq], from the (k, V) logits[seq] they
        were drawn from, once the scheduler has appended them (those it did not append, past
        an EOS, are not counted). Logprobs are of the model's own distribution, before
        penalties, temperature and filters, as vLLM and OpenAI report them."""
        seqs = list(logits)
        if not seqs:
            return
        lp = torch.cat([logits[s] for s in seqs]).log_softmax(-1)                      # (rows, V)
        chosen = torch.tensor([t for s in seqs for t in new_tokens[s]], device=lp.device)
        picked = lp[torch.arange(len(chosen), device=lp.device), chosen].tolist()
        at = 0
        for seq in seqs:
            state, k = self.samples[seq], len(new_tokens[seq])
            kept = min(k, seq.num_output_tokens - len(state.chosen_logprobs))
            state.chosen_logprobs += picked[at:at + kept]
            if state.logprobs is not None:
                state.logprobs += top_logprobs(lp[at:at + kept], chosen[at:at + kept], seq.params.logprobs)
            at += k

    def record_prompt_logprobs(self, seq: Sequence, start: int, hidden: Tensor,
                               compute_logits: Callable[[Tensor], Tensor]) -> None:
        """Logprob of each prompt token given those before it (position 0 has none), from
        hidden (n, D): a prefill chunk of seq starting at position start."""
        req = self.requests[seq.request_id]
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        # Row j of the chunk predicts position start + 1 + j. Positions already recorded
        # (before a preemption made the prompt be recomputed) are skipped.
        first = len(req.prompt_logprobs) - 1 - start                      # first row still needed
        last = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)
        if last <= first:
            return
        lp = compute_logits(hidden[first:last]).log_softmax(-1)
        pos = start + 1
        targets = to_device(seq.token_ids[pos + first:pos + last], lp.device, torch.long)
        req.prompt_logprobs += top_logprobs(lp, targets, seq.params.prompt_logprobs)

    # -------------------------------------------------------------- text

    def detokenize(self, req: RequestState, state: SampleState) -> None:
        """Text for the sample's tokens that have none yet. A stop string ends the sequence
        on the token that completes it (scheduler.stop) and the text before it."""
        seq = state.seq
        if state.detok is None or state.final:
            return
        for i in range(len(state.token_texts), seq.num_output_tokens):
            t = seq.token_ids[seq.num_prompt_tokens + i]
            if t in self.scheduler.eos_token_ids:
                state.token_texts.append("")                  # EOS adds no text
                continue
            before = len(state.text)
            piece = state.detok.step(t)
            state.text += piece
            state.token_texts.append(piece)
            at = -1
            if req.stops and piece:
                state.stop_node, at = req.stops.feed(state.stop_node, state.text, before)
            if at >= 0:
                state.text, state.final = state.text[:at], True
                self.scheduler.stop(seq, i + 1)
                del state.chosen_logprobs[i + 1:]
                if state.logprobs is not None:
                    del state.logprobs[i + 1:]
                return
        if seq.status == FINISHED and seq.finish_reason in ("stop", "length"):
            flush = state.detok.step(-1, final=True)          # an unfinished character
            state.text += flush
            if state.token_texts:
                state.token_texts[-1] += flush
            state.final = True

    def token_text(self, t: int) -> str:
        """A token as the vocabulary spells it ("▁new"); token_id:N without a tokenizer."""
        return self.tokenizer.token_text(t) if self.tokenizer else f"token_id:{t}"

    def text_after(self, prev: int | None, t: int) -> str:
        """The text token t adds after token prev (a top_logprobs alternative)."""
        tok = self.tokenizer
        if tok is None:
            return f"token_id:{t}"
        if prev is None:
            return tok.decode([t])
        return tok.decode([prev, t])[len(tok.decode([prev])):]

    def prompt_texts(self, ids: list[int]) -> list[str]:
        """The text each prompt token adds (they join to the decoded prompt)."""
        if self.tokenizer is None:
            return ["" for _ in ids]
        detok = IncrementalDetokenizer(self.tokenizer, [])
        texts = [detok.step(t) for t in ids]
        texts[-1] += detok.step(-1, final=True)
        return texts

    # -------------------------------------------------------------- outputs

    def process(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """After the scheduler appended a step's tokens to seqs: stop strings, then the
        outputs due (every request among them that streams; the others once finished).
        Finished requests are forgotten once all the outputs are made."""
        touched: dict[str, RequestState] = {}
        for seq in seqs:
            req = self.requests[seq.request_id]
            if req.stops:                                     # stop strings need the text now
                self.detokenize(req, self.samples[seq])
            if req.stream or seq.status == FINISHED:          # the others only accumulate ids
                touched[req.request_id] = req
        outputs = [self.output(req) for req in touched.values()
                   if req.stream or all(s.seq.status == FINISHED for s in req.samples)]
        for out in outputs:
            if out.finished:
                self.remove(out.request_id)
        return outputs

    def output(self, req: RequestState, error: str | None = None, make_text: bool = True) -> RequestOutput:
        """The request's progress: every sample's; its first sample's in the top-level fields.
        make_text=False: the text made so far, nothing decoded (a failed step's outputs: the
        tokenizer may be what failed)."""
        states = req.samples
        done = all(s.seq.status == FINISHED for s in states)
        if done and len(states) > req.params.n:              # best_of: the n most likely samples
            states = sorted(states, key=lambda s: -s.cumulative_logprob)[:req.params.n]
        samples = [self._sample_output(req, s, make_text) for s in states]      # text for those only
        first, head = samples[0], req.samples[0].seq
        m = head.metrics
        metrics = {"time_to_first_token": m.time_to_first_token, "e2e_latency": m.e2e_latency,
                   "time_per_output_token": m.time_per_output_token(head.num_output_tokens),
                   "num_cached_prompt_tokens": m.num_cached_prompt_tokens}
        if m.spec_proposed:
            metrics["spec_acceptance_rate"] = m.spec_accepted / m.spec_proposed
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, first.token_ids, first.text,
                             first.delta, first.logprobs, req.prompt_logprobs,
                             first.finish_reason if done else None, metrics, error=error,
                             token_texts=first.token_texts, outputs=samples)

    def _sample_output(self, req: RequestState, state: SampleState, make_text: bool) -> CompletionOutput:
        if make_text:
            self.detokenize(req, state)
        seq = state.seq
        # While running, hold back text that might be the start of a stop string.
        hold = 0 if seq.status == FINISHED or req.stops is None else req.stops.max_len - 1
        end = max(state.num_chars_streamed, len(state.text) - hold)
        delta, state.num_chars_streamed = state.text[state.num_chars_streamed:end], end
        cumulative = state.cumulative_logprob if self.wants_logprobs(seq) else None
        return CompletionOutput(state.index, state.text, seq.output_ids, delta, state.logprobs, cumulative,
                                seq.finish_reason, list(state.token_texts) if state.detok else None)


# ---------------------------------------------------------------------------- LLMEngine

TINY_MODEL_PARAMS = 30_000_000


def default_cpu_threads(num_params: int, ranks: int = 1) -> int | None:
    """One torch thread for a tiny model on the CPU; for a sharded one (ranks > 1 processes
    on this machine) each rank gets its share of the cores; else torch's choice (None).

    Measured on a 2-core machine (bundled 4.5M-parameter model, batch-1 decode): 116 vs
    120 tok/s with 1 and 2 threads on an idle machine, 135 vs 37 tok/s with one other busy
    process; stories260K 205 vs 161 tok/s idle. A tiny model's matmuls are too small to
    split, and a thread that has to wait for a busy core stalls every op. OMP_NUM_THREADS,
    when set, is the user's choice and wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if num_params < TINY_MODEL_PARAMS:
        return 1
    return max(1, (os.cpu_count() or 1) // ranks) if ranks > 1 else None


# What LLMEngine is given to build speculative decoding from its target's runner, its
# sampler, the config and max_model_len (the speculative decoding section's make_speculator).
SpeculatorFactory = Callable[[ModelRunner, Sampler, EngineConfig, int], SpeculativeDecoding | None]


class Sampled:
    """A step's new tokens: the sampled ids, which stay on the device until host_ids()
    (one device-to-host copy, started here and waited for only there), and the tokens of
    verified speculative windows, already on the host."""

    def __init__(self, ids: Tensor | None):
        self.ids = ids                                         # (rows,) on the device
        self.host, self.ready = ids, None
        if ids is not None and ids.is_cuda:                    # a copy into pinned memory: no wait
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True).copy_(ids, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        self.rows: dict[Sequence, int] = {}                    # sequence -> its row of ids
        self.index: dict[Sequence, int] = {}                   # where its PLACEHOLDER sits in token_ids
        self.forks: dict[Sequence, list[Sequence]] = {}        # new samples started at a prompt's first token
        self.verified: dict[Sequence, list[int]] = {}          # accepted drafts + one more token
        self.prompt_chunks: list[tuple[Sequence, int, Tensor]] = []   # (seq, first position, hidden rows)
        self.logits: dict[Sequence, Tensor] = {}               # (k, V) for those that want logprobs

    def host_ids(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return [] if self.host is None else self.host.tolist()


class LLMEngine:
    """Owns the model runner, the KV block manager, the scheduler and the sampler;
    `step()` runs one iteration of continuous batching."""

    def __init__(self, model_dir: str | Path, cfg: EngineConfig, tokenizer: str | Path | None = None,
                 speculator_factory: SpeculatorFactory | None = None):
        """speculator_factory builds speculative decoding from the target's runner, the
        sampler, the config and max_model_len, or returns None when cfg asks for none (the
        LLM API passes make_speculator, from the speculative decoding section below)."""
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
        self.dtype = DTYPES[cfg.dtype]
        self.model_dir = Path(model_dir)
        if cfg.semi_structured_sparsity and not is_24_checkpoint(model_dir):
            raise ValueError(f"semi_structured_sparsity needs a 2:4 checkpoint (quant.py --method sparse24); "
                             f"{model_dir} has no sparsity_config.json saying 2:4")
        if cfg.semi_structured_sparsity and cfg.tensor_parallel_size > 1:
            raise ValueError("semi_structured_sparsity is not supported with tensor_parallel_size > 1")
        self.tp = None                  # the ranks (parallel.TPGroup) when the model is sharded over several
        self._stop_workers: Callable[[], object] | None = None
        if cfg.tensor_parallel_size > 1:
            import parallel     # the one upward import: an optional backend, chosen here (as vLLM's executors)
            self.tp, workers = parallel.start_tensor_parallel(model_dir, cfg)
            # The workers stop with the engine: close(), garbage collection, or a failure below.
            self._stop_workers = weakref.finalize(self, parallel.stop_workers, self.tp, workers)
            self.model, self.model_config = parallel.load_sharded(model_dir, self.dtype, self.device, self.tp)
        else:
            self.model, self.model_config = load_model(model_dir, self.dtype, self.device)
        if cfg.semi_structured_sparsity:
            use_semi_structured(self.model)                   # a no-op off a GPU with sparse tensor cores
        mc = self.model_config
        if self.device.type == "cpu":
            threads = cfg.cpu_threads or default_cpu_threads(sum(p.numel() for p in self.model.parameters()),
                                                             cfg.tensor_parallel_size)
            if threads:
                torch.set_num_threads(threads)
        self.max_model_len = self._max_model_len(cfg.max_model_len, mc)
        self.tokenizer = load_tokenizer(self.model_dir, tokenizer)
        self.chat_template = None if str(model_dir).startswith("random:") else read_chat_template(self.model_dir)
        if self.tokenizer and self.tokenizer.vocab_size > mc.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the "
                             f"model's vocab_size is {mc.vocab_size}")
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({cfg.max_num_batched_tokens} < {self.max_model_len})")
        # Positions go up to max_model_len plus a speculative window's lookahead.
        max_positions = self.max_model_len + cfg.num_speculative_tokens + 1
        self.runner = ModelRunner(self.model, cfg, max_positions) if self.tp is None else \
            parallel.TensorParallelRunner(self.model, cfg, max_positions, self.tp, workers)
        self.sampler = Sampler(self.device, cfg.seed, mc.vocab_size, cfg.max_num_seqs)
        self.speculator = speculator_factory(self.runner, self.sampler, cfg, self.max_model_len) \
            if speculator_factory else None
        self.num_blocks = self._allocate_kv_pool()
        self.block_manager = BlockManager(self.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        tokens = self.num_blocks * cfg.block_size
        print(f"[nanoserve] KV cache: {self.num_blocks} blocks of {cfg.block_size} tokens, {tokens} tokens "
              f"({tokens * self.kv_bytes_per_token / 2**20:.1f} MiB"
              f"{', committed as blocks are first used' if self.device.type == 'cpu' else ''}; "
              f"{tokens / self.max_model_len:.1f} sequences of max_model_len {self.max_model_len}); "
              "num_blocks or kv_cache_bytes sets it", file=sys.stderr)
        # Generation stops at any EOS id: config.json's, generation_config.json's, the tokenizer's.
        eos = mc.eos_token_ids | set(generation_eos_ids(self.model_dir))
        eos |= self.tokenizer.eos_ids if self.tokenizer else set()
        self.scheduler = Scheduler(cfg, self.block_manager, self.max_model_len, eos, self.speculator)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler)
        self._next_id = 0
        self.owner: str | None = None           # who alone may step it, once a loop (the server's) owns it
        self.num_steps = 0
        self.peak_blocks_used = 0
        self.step_time = dict.fromkeys(("schedule", "draft", "model", "sample", "output"), 0.0)
        self._held: list[Sequence] = []            # the sequences of the step in progress
        self._made: list[RequestOutput] = []       # the outputs it has made so far
        self.async_scheduling = cfg.async_scheduling     # (EngineConfig: never with a speculator or ranks)
        self._in_flight: Sampled | None = None     # the launched step whose ids are still on the device
        self.num_overlapped_steps = 0               # steps launched while the previous one was in flight

    @staticmethod
    def _max_model_len(requested: int | None, mc: ModelConfig) -> int:
        """The longest sequence served: max_position_embeddings, or what was asked for. A
        sliding-window model (Mistral) attends to its last sliding_window tokens; that equals
        full attention while a sequence fits in the window, so the context stops there."""
        limit, why = mc.max_position_embeddings, "max_position_embeddings"
        if mc.sliding_window and mc.sliding_window < limit:
            limit, why = mc.sliding_window, "sliding_window (windowed attention is not implemented)"
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds the model's {why} {limit}")
        return requested or limit

    def _allocate_kv_pool(self) -> int:
        """Size the KV pool (EngineConfig.num_blocks, or as many blocks as the memory budget
        holds; a draft model's pool, of the same number of blocks, shares the budget, and so
        does the memory its steps take), allocate it, and return its number of blocks."""
        cfg = self.cfg
        self.kv_bytes_per_token = self.runner.kv_bytes_per_token + \
            (self.speculator.kv_bytes_per_token if self.speculator else 0)
        block_bytes = self.kv_bytes_per_token * cfg.block_size
        draft = self.speculator.reserved_bytes if self.speculator else 0
        num_blocks = cfg.num_blocks or max(1, (self.runner.kv_budget_bytes() - draft) // block_bytes)
        if cfg.num_blocks is None and cfg.kv_cache_bytes is None and self.device.type == "cpu":
            # No more than the engine can fill: max_num_seqs sequences of max_model_len tokens,
            # each with its speculative lookahead.
            per_seq = -(-(self.max_model_len + cfg.num_speculative_tokens) // cfg.block_size)
            num_blocks = min(num_blocks, cfg.max_num_seqs * per_seq)
        if num_blocks * cfg.block_size - 1 > INT32_MAX:    # a step's cache slots reach the device as int32
            if cfg.num_blocks:
                raise ValueError(f"num_blocks={num_blocks} x block_size={cfg.block_size} exceeds the "
                                 f"{INT32_MAX + 1} cache slots a step can address")
            num_blocks = (INT32_MAX + 1) // cfg.block_size
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(f"num_blocks={num_blocks} x block_size={cfg.block_size} tokens "
                             f"cannot hold one sequence of max_model_len={self.max_model_len}; "
                             "raise num_blocks or lower max_model_len")
        self.runner.allocate_kv_cache(num_blocks)
        if self.speculator:
            self.speculator.allocate_kv_cache(num_blocks)
        return num_blocks

    # -------------------------------------------------------------- requests

    def make_sequence(self, prompt: str | list[int], params: SamplingParams,
                      request_id: str | None = None) -> Sequence:
        """Validate a request and build its sequence (nothing is queued yet)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        # A copy, checked again: fields set after construction meet the same rules, and the
        # caller may reuse or change its object while this request runs.
        params = dataclasses.replace(params)
        text, ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens; max_model_len is {self.max_model_len} "
                             "(prompt plus at least one generated token)")
        bad = [t for t in (params.logit_bias or {}) if t >= self.model_config.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.model_config.vocab_size})")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.outputs.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(request_id, text, ids, len(ids), params, Metrics(time.perf_counter()))
        if params.num_samples > 1:
            # Parallel sampling: the prompt is prefilled once; at its first token the other
            # samples start on its blocks. A seeded request's samples get seeds of their own.
            seq.forks_pending = [dataclasses.replace(params, n=1, best_of=None, seed=None if params.seed is None
                                                     else (params.seed * 1_000_003 + i) % INT64_MAX)
                                 for i in range(1, params.num_samples)]
        return seq

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """A prompt (text, or token ids) -> (its text or None, its token ids), checked."""
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer (tokenizer.json or tokenizer.model): "
                                 "pass the prompt as token ids")
            if not prompt:
                raise ValueError("prompt is empty")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt is not valid Unicode text ({e.reason} at index {e.start})") from None
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt is empty")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt token ids must be integers")
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.model_config.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return text, ids

    def chat_prompt(self, messages: object, add_generation_prompt: bool = True) -> list[int]:
        """Chat messages ([{"role": ..., "content": ...}]) -> prompt token ids, through the
        model's chat template (DEFAULT_CHAT_TEMPLATE when it has none)."""
        if self.tokenizer is None:
            raise ValueError("messages need a tokenizer: this model directory has none")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise ValueError(f"messages[{i}] must be an object with a role among {', '.join(CHAT_ROLES)}, "
                                 f"got {m.get('role') if isinstance(m, dict) else m!r}")
            content = m.get("content")
            if isinstance(content, list):              # OpenAI's content parts: text only
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise ValueError(f"messages[{i}].content parts must be {{type: text, text: ...}}")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
            clean.append({"role": m["role"], "content": content})
        tok = self.tokenizer
        text = render_chat(self.chat_template or DEFAULT_CHAT_TEMPLATE, clean, add_generation_prompt,
                           tok.bos_token, tok.eos_token)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"messages are not valid Unicode text ({e.reason})") from None
        return tok.encode_with_special_tokens(text)

    def add_sequence(self, seq: Sequence, stream: bool = True) -> None:
        """Queue a request made by make_sequence. stream: step() returns its progress at
        every step that gives it tokens; else only its final output."""
        if not isinstance(stream, bool):
            raise ValueError(f"stream must be true or false, got {stream!r}")
        self.outputs.add(seq, stream)
        self.scheduler.add(seq)

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, stream: bool = True) -> str:
        seq = self.make_sequence(prompt, params, request_id)
        self.add_sequence(seq, stream)
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away); its blocks go back to the pool."""
        for s in self.outputs.remove(request_id):
            if s.status != FINISHED:
                self.scheduler.finish(s, "abort")
            s.finish_reason = "abort"            # also one that ended on a token still on the device
            self.scheduler.drop_pending(s)

    @property
    def requests(self) -> dict[str, Sequence]:
        """The requests in flight: request id -> its first sample (a new dict each call). With
        async scheduling its token_ids may end in a PLACEHOLDER between steps (an id still on
        the device); outputs never show one."""
        return {rid: req.samples[0].seq for rid, req in self.outputs.requests.items()}

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._in_flight)

    # -------------------------------------------------------------- one step

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule -> run the model once over the whole batch -> sample -> postprocess ->
        outputs. Returns the progress of every request that got new tokens.

        With async scheduling the outputs are those of the previous step: this step is
        launched first, and the previous step's ids, on their way to the host meanwhile,
        are turned into outputs while the device runs it.

        A step that raises fails only the requests it held: each is finished with
        finish_reason "error" (its blocks go back to the pool) and its output carries the
        error; every other request goes on in the next step."""
        self._held, self._made = [], []
        try:
            return self._step()
        except Exception as e:                  # isolate the fault: fail its requests, keep serving
            return self._fail_held_requests(e)

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()                          # {sequence: new tokens}
        self._held = list(scheduled)
        prev = self._in_flight                                         # the step still on the device
        if not scheduled:
            return self._take_outputs(prev) if prev else []
        copies = self.scheduler.take_block_copies()                    # copy-on-write of shared blocks
        if copies:
            self.runner.copy_blocks(copies)
        t1 = time.perf_counter()
        drafts = self.speculator.propose(scheduled) if self.speculator else {}
        t2 = time.perf_counter()
        seqs = list(scheduled)
        tokens = [self._input_tokens(s, scheduled[s], prev) + drafts.get(s, []) for s in seqs]
        hidden, starts = self.runner.run(tokens, [s.num_computed for s in seqs], [s.block_table for s in seqs],
                                         prev.ids if prev else None)
        t3 = time.perf_counter()
        sampled = self._next_tokens(scheduled, starts, hidden, drafts, prev)   # launched, ids on the device
        t4 = time.perf_counter()
        if prev:
            self._made = self._take_outputs(prev)                      # while the device runs this step
            self.num_overlapped_steps += 1
        self.scheduler.postprocess(scheduled, {**{s: [PLACEHOLDER] for s in sampled.rows}, **sampled.verified},
                                   sampled.forks)
        sampled.index = {s: len(s.token_ids) - 1 for s in sampled.rows}
        if self.async_scheduling and not sampled.verified:
            self._in_flight = sampled
        else:
            self._made += self._outputs(sampled)
        self.num_steps += 1
        self.peak_blocks_used = max(self.peak_blocks_used, self.num_blocks - self.block_manager.num_free)
        # Where a step's time goes. On a GPU "model" and "sample" (the LM head included) are
        # launch time, except that verifying drafts waits for the device; a synchronous
        # step's "output" waits for the device to finish.
        for key, dt in (("schedule", t1 - t0), ("draft", t2 - t1), ("model", t3 - t2), ("sample", t4 - t3),
                        ("output", time.perf_counter() - t4)):
            self.step_time[key] += dt
        return self._made

    @staticmethod
    def _input_tokens(seq: Sequence, n: int, prev: Sampled | None) -> list[int]:
        """The n tokens seq computes this step. A decode's input may be the previous step's
        token, still on the device: -1 - its row there, which the runner fills in."""
        tokens = seq.token_ids[seq.num_computed:seq.num_computed + n]
        if tokens[-1] == PLACEHOLDER:
            tokens[-1] = -1 - prev.rows[seq]
        return tokens

    def _take_outputs(self, prev: Sampled) -> list[RequestOutput]:
        """The outputs of the step in flight. Until they are made, a fault fails its requests
        too; one before (the launch of the next step) leaves it in flight for the next call."""
        self._in_flight = None
        held, self._held = self._held, self._held + list(prev.rows)
        outputs = self._outputs(prev)
        self._held = held
        return outputs

    def _outputs(self, sampled: Sampled) -> list[RequestOutput]:
        """A step's ids have reached the host: each takes its placeholder's place (unless
        its sequence ended before it), then logprobs (the prompt's too), stop strings and
        outputs."""
        for seq, start, hidden in sampled.prompt_chunks:
            if seq in self.outputs.samples:                        # not failed or aborted meanwhile
                self.outputs.record_prompt_logprobs(seq, start, hidden, self.runner.compute_logits)
        ids = sampled.host_ids()
        new_tokens = {seq: [ids[row]] for seq, row in sampled.rows.items()
                      if seq in self.outputs.samples and self.scheduler.resolve(seq, sampled.index[seq], ids[row])}
        new_tokens.update(sampled.verified)
        self.outputs.record_logprobs(new_tokens, {s: x for s, x in sampled.logits.items() if s in new_tokens})
        return self.outputs.process(list(new_tokens))                   # forks included

    def _fail_held_requests(self, e: Exception) -> list[RequestOutput]:
        """Finish the requests the failed step held (all running ones if scheduling itself
        failed) with finish_reason "error"; -> the outputs made before the fault and their
        final outputs."""
        message = f"{type(e).__name__}: {e}"
        print(f"[nanoserve] a step failed, its requests are finished with an error: {message}", file=sys.stderr)
        outputs = self._made
        for rid in dict.fromkeys(s.request_id for s in (self._held or self.scheduler.running)):
            req = self.outputs.requests.get(rid)
            if req is None:
                continue
            for seq in [s.seq for s in req.samples]:              # every sample of the request
                if seq.status != FINISHED:
                    self.scheduler.finish(seq, "error")
                seq.finish_reason = "error"      # also one this step ended: its output failed
                self.scheduler.drop_pending(seq)
            outputs.append(self.outputs.output(req, error=message, make_text=False))
            self.outputs.remove(rid)
        return outputs

    def _next_tokens(self, scheduled: dict[Sequence, int], starts: list[int], hidden: Tensor,
                     drafts: dict[Sequence, list[int]], prev: Sampled | None) -> Sampled:
        """New tokens for each sequence whose step reached the end of its tokens (a prefill
        chunk with more to come gets none): sampled, or verified for a speculative window."""
        ready, windows, chunks = [], [], []                # (sequence, row of its last real token)
        for (seq, n), start in zip(scheduled.items(), starts):
            if seq.params.prompt_logprobs is not None and seq.num_computed < seq.num_prompt_tokens:
                chunks.append((seq, seq.num_computed, hidden[start:start + n]))   # read with the ids
            if seq.num_computed + n == seq.num_tokens:
                (windows if seq in drafts else ready).append((seq, start + n - 1))
        sampled = self._sample(ready, hidden, prev) if ready else Sampled(None)
        sampled.prompt_chunks = chunks
        if windows:
            for seq, (toks, rows) in self.speculator.verify(windows, drafts, hidden).items():
                sampled.verified[seq] = toks
                if self.outputs.wants_logprobs(seq):
                    sampled.logits[seq] = rows
        return sampled

    def _sample(self, ready: list[tuple[Sequence, int]], hidden: Tensor, prev: Sampled | None) -> Sampled:
        """A token for each ready sequence. A prompt that has just been prefilled for several
        samples draws one token per sample from the same logits: the first goes to it, the
        others start new sequences that share its blocks (the forks, for postprocess)."""
        rows, owners = [], []                            # logits row, (sequence, the sample's params)
        for seq, row in ready:
            for p in [seq.params] + seq.forks_pending:
                rows.append(row)
                owners.append((seq, p))
        every_row = len(rows) == hidden.shape[0] and rows == list(range(len(rows)))   # batch-1 decode, ...
        picked = hidden if every_row else hidden[to_device(rows, hidden.device)]
        logits = self.runner.compute_logits(picked)                                       # (B, V)
        params = [p for _, p in owners]
        penalized = self.sampler.penalize(logits, params, [s for s, _ in owners],
                                          pending=(prev.ids, prev.rows) if prev else None)
        sampled = Sampled(self.sampler.sample(penalized, params, [s.num_tokens for s, _ in owners]))
        for i, (seq, p) in enumerate(owners):
            target = seq
            if p is not seq.params:
                target = self._new_sample(seq, p)
                sampled.forks.setdefault(seq, []).append(target)
            sampled.rows[target] = i
            if self.outputs.wants_logprobs(target):
                sampled.logits[target] = logits[i:i + 1]
        for seq in sampled.forks:
            seq.forks_pending = []
        return sampled

    def _new_sample(self, parent: Sequence, params: SamplingParams) -> Sequence:
        """Another sample of parent's request; the scheduler starts it on parent's blocks."""
        child = Sequence(parent.request_id, parent.prompt, parent.token_ids[:parent.num_prompt_tokens],
                         parent.num_prompt_tokens, params, Metrics(parent.metrics.arrival_time))
        child.metrics.num_cached_prompt_tokens = parent.metrics.num_cached_prompt_tokens
        self.outputs.add_sample(self.outputs.requests[parent.request_id], child)
        return child

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is collected)."""
        if self._stop_workers is not None:
            self._stop_workers()

    def stats(self) -> dict:
        s, bm, spec = self.scheduler, self.block_manager, self.speculator
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_free": bm.num_free,
            "kv_blocks_used": self.num_blocks - bm.num_free,
            "kv_blocks_peak": self.peak_blocks_used,
            "block_size": self.cfg.block_size,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "preemptions": s.num_preemptions,
            "generated_tokens": s.num_generated,
            "steps": self.num_steps,
            "prefix_cache_hit_rate": (s.cached_prompt_tokens / s.prompt_tokens
                                      if self.cfg.enable_prefix_caching and s.prompt_tokens else None),
            "spec_acceptance_rate": spec.acceptance_rate() if spec else None,
            "spec_token_acceptance": spec.token_acceptance() if spec else None,
            "spec_tokens_per_step": spec.tokens_per_step() if spec else None,
        }


# ============================================================================ speculative decoding
# A cheap proposer guesses k tokens; the target model scores all k + 1 positions in one
# pass (the step's forward pass above, with the drafts appended to the sequence's last
# token), and the acceptance rule keeps a prefix of the guesses plus one token of its
# own. Decode is memory-bound, so scoring k + 1 tokens costs about what scoring one does:
# every accepted draft is a token for free. The engine and scheduler call a Speculator
# through SpeculativeDecoding's few methods: lookahead / can_reserve / reserve
# (scheduling), propose (before the forward pass), verify (after it), release (a sequence
# finishes or is preempted).

def rejection_sample(p: Tensor, q: Tensor | None, draft: list[int],
                     key: Callable[[int, int], int | None],
                     default: torch.Generator) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), for one sequence.

    p: (k + 1, V) the target's distributions at the k draft positions and one past them.
    q: (k, V) the draft's distributions the k draft tokens were sampled from; None for a
       deterministic proposal (n-gram lookup), which is a point mass: q = one_hot(draft).
    key(j, purpose): the event key for window position j (None: use default, the shared generator).
    Returns the accepted prefix of draft plus one more token, 1 to k + 1 tokens.

    For each draft token x in order:
        accept with probability min(1, p(x) / q(x));
        on the first rejection, sample from normalize(max(0, p - q)) and stop.
    If all k are accepted, sample a bonus token from p[k].
    Each emitted token is then distributed exactly as the target alone would sample it:
    P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * max(0, p(x) - q(x)) / Z
         = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x),
    because the rejection mass 1 - sum min(p, q) equals Z = sum max(0, p - q).
    """
    def one(probs: Tensor, k: int | None) -> int:
        return int(draw(probs[None], [k], default)[0])

    out = []
    for j, x in enumerate(draft):
        qj = q[j] if q is not None else F.one_hot(torch.tensor(x, device=p.device), p.shape[-1]).to(p.dtype)
        k = key(j, ACCEPT)
        u = torch.rand((), generator=default, device=p.device) if k is None else \
            keyed_uniform([k], 1, p.device)[0, 0]
        if u * qj[x] <= p[j, x]:                     # accept with prob min(1, p(x)/q(x))
            out.append(x)
            continue
        residual = (p[j] - qj).clamp(min=0)
        out.append(one(residual / residual.sum() if residual.sum() > 0 else p[j], key(j, RESIDUAL)))
        return out
    out.append(one(p[len(draft)], key(len(draft), SAMPLE)))   # the bonus token
    return out


def ngram_propose(tokens: list[int], k: int, max_n: int = 3) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = max_n
    down to 1) and propose the k tokens that followed it. Free, and strong when the
    output copies from the prompt (code edits, summaries, retrieval answers)."""
    for n in range(min(max_n, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == tail:
                return tokens[i + n:i + n + k]
    return []


class Speculator:
    """Speculative decoding as the scheduler and the engine use it (SpeculativeDecoding).
    Subclasses propose; verification (the acceptance rule above) and the statistics are
    shared. Built from the target's model runner (whose logits verify the drafts), the
    engine's sampler (whose keyed noise makes seeded requests reproducible) and the config."""

    kv_bytes_per_token = 0                      # a draft model's KV cache, per token
    reserved_bytes = 0                          # its steps' memory outside the KV pool

    def __init__(self, target: ModelRunner, sampler: Sampler, cfg: EngineConfig, max_model_len: int):
        self.target, self.sampler, self.cfg, self.max_model_len = target, sampler, cfg, max_model_len
        self.k = cfg.num_speculative_tokens
        self.planned: dict[Sequence, int] = {}  # drafts reserved for this step, per sequence
        self.q: dict[Sequence, Tensor] = {}     # (k, V) the draft distributions of this step
        self.proposed = self.accepted = self.judged = self.verify_steps = self.tokens_emitted = 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        pass

    def lookahead(self, seq: Sequence, budget: int) -> int:
        """Drafts to verify for a decoding sequence: at most k, within the step's token
        budget, and no further than the request (max_tokens) or the context can go."""
        left = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        return max(0, min(self.k, left - 1, budget))

    def can_reserve(self, seq: Sequence, k: int) -> bool:
        return True

    def reserve(self, seq: Sequence, k: int) -> None:
        self.planned[seq] = k

    def release(self, seq: Sequence) -> None:
        self.planned.pop(seq, None)
        self.q.pop(seq, None)

    def propose(self, scheduled: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """-> up to planned[seq] draft tokens per planned sequence (none where nothing is found)."""
        raise NotImplementedError

    def rollback(self, seq: Sequence, num_kept: int) -> None:
        """Forget the proposer's state past the first num_kept tokens of seq."""

    def verify(self, windows: list[tuple[Sequence, int]], drafts: dict[Sequence, list[int]],
               hidden: Tensor) -> dict[Sequence, tuple[list[int], Tensor]]:
        """windows: (sequence, row of its last real token); rows row .. row + k hold the
        target's view of the k draft positions and of the bonus position.
        -> per sequence, (the accepted drafts plus one token, the (len, V) target logits
        they were judged by: their logprobs)."""
        k_of = [len(drafts[s]) for s, _ in windows]
        rows = [r + j for (_, r), k in zip(windows, k_of) for j in range(k + 1)]
        logits = self.target.compute_logits(hidden[rows])                         # (sum(k+1), V)
        # Row j of a window is the target's distribution after the drafts before it: the
        # penalties count those drafts as generated, so the emitted tokens stay distributed
        # exactly as the target alone (with its penalties) would sample them.
        per_row = [(s, j) for (s, _), k in zip(windows, k_of) for j in range(k + 1)]
        params = [s.params for s, _ in per_row]
        penalized = self.sampler.penalize(logits, params, [s for s, _ in per_row],
                                           [drafts[s][:j] for s, j in per_row])
        p_all = sampling_probs(penalized, params, self.sampler.metadata(params))
        out, at = {}, 0
        for (seq, _), k in zip(windows, k_of):
            p, lg = p_all[at:at + k + 1], logits[at:at + k + 1]
            at += k + 1
            key = lambda j, purpose, s=seq: Sampler.key(s.params.seed, s.num_tokens + j, purpose)  # noqa: E731
            toks = rejection_sample(p, self.q.pop(seq, None), drafts[seq], key, self.sampler.default)
            acc = len(toks) - 1
            self.proposed += k
            self.accepted += acc
            self.judged += acc + (acc < k)            # draft tokens the rule was applied to
            self.verify_steps += 1
            self.tokens_emitted += len(toks)
            seq.metrics.spec_proposed += k
            seq.metrics.spec_accepted += acc
            # The cache keeps the last real token and the accepted drafts (the scheduler's
            # postprocess gives back the target's other slots).
            self.rollback(seq, seq.num_computed + 1 + acc)
            out[seq] = (toks, lg[:len(toks)])
        return out

    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (tokens after a rejection count as proposed)."""
        return self.accepted / self.proposed if self.proposed else None

    def token_acceptance(self) -> float | None:
        """Per-token acceptance probability a: accepted / draft tokens that were judged.
        This is the a of the expected-speedup formula (1 - a^(k+1)) / ((1 - a)(k c + 1))."""
        return self.accepted / self.judged if self.judged else None

    def tokens_per_step(self) -> float | None:
        return self.tokens_emitted / self.verify_steps if self.verify_steps else None


class NgramSpeculator(Speculator):
    """Drafts by prompt lookup (ngram_propose): no model, no cache."""

    def propose(self, scheduled: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        drafts = {s: ngram_propose(s.token_ids, k) for s, k in self.planned.items()}
        self.planned.clear()
        return {s: d for s, d in drafts.items() if d}


@dataclass
class DraftState:
    """A sequence's place in the draft model's own paged KV cache."""
    block_table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0


class DraftModelSpeculator(Speculator):
    """Drafts with a small model sharing the target's vocabulary.

    The draft keeps its own paged KV cache (same block size and number of blocks as the
    target's, its own block manager) and its own model runner. Each step it first catches
    up on tokens it has not seen (the whole prompt the first time), then runs k
    single-token steps, all sequences batched. Rejected positions are rolled back.
    """

    def __init__(self, target: ModelRunner, sampler: Sampler, cfg: EngineConfig, max_model_len: int,
                 draft_dir: str | Path):
        super().__init__(target, sampler, cfg, max_model_len)
        self.draft, dcfg = load_model(draft_dir, target.dtype, target.device)
        vocab = target.model.vocab_size                 # the whole vocabulary, also when sharded
        if dcfg.vocab_size != vocab:
            raise ValueError(f"draft model {draft_dir} has vocab_size {dcfg.vocab_size}, the target "
                             f"{vocab}: they must share a vocabulary")
        if dcfg.max_position_embeddings < max_model_len:
            raise ValueError(f"draft model {draft_dir} supports {dcfg.max_position_embeddings} "
                             f"positions, fewer than max_model_len {max_model_len}")
        self.runner = ModelRunner(self.draft, cfg, target.max_positions)
        self.kv_bytes_per_token = self.runner.kv_bytes_per_token
        self.reserved_bytes = self.runner.reserved_bytes
        self.state: dict[Sequence, DraftState] = {}

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        self.bm = BlockManager(num_blocks, self.cfg.block_size, enable_prefix_caching=False)

    def can_reserve(self, seq: Sequence, k: int) -> bool:
        # The draft computes the tokens it has not seen and k - 1 drafts (the last is never fed).
        st = self.state.get(seq) or DraftState()
        return self.bm.can_allocate(st.block_table, seq.num_tokens + k - 1)

    def reserve(self, seq: Sequence, k: int) -> None:
        super().reserve(seq, k)
        st = self.state.setdefault(seq, DraftState())
        self.bm.allocate(st.block_table, seq.num_tokens + k - 1)

    def release(self, seq: Sequence) -> None:
        super().release(seq)
        st = self.state.pop(seq, None)
        if st is not None:
            self.bm.release(st.block_table)

    def propose(self, scheduled: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        ks, self.planned = self.planned, {}
        drafts: dict[Sequence, list[int]] = {s: [] for s in ks}
        probs: dict[Sequence, list[Tensor]] = {s: [] for s in ks}
        sampler = self.sampler
        for j in range(self.k):
            active = [s for s in ks if j < ks[s]]
            if not active:
                break
            states = [self.state[s] for s in active]
            # What the draft has not seen yet: the sequence's tail, then this step's drafts.
            tokens = [s.token_ids[st.num_computed:] + drafts[s][max(0, st.num_computed - s.num_tokens):]
                      for s, st in zip(active, states)]
            hidden, starts = self.runner.run(tokens, [st.num_computed for st in states],
                                             [st.block_table for st in states])
            rows = [start + len(t) - 1 for start, t in zip(starts, tokens)]
            params = [s.params for s in active]
            logits = sampler.penalize(self.runner.compute_logits(hidden[rows]), params, active,  # (B, V)
                                      [drafts[s] for s in active])
            q = sampling_probs(logits, params)
            x = sampler.draw(q, [Sampler.key(s.params.seed, s.num_tokens + j, DRAFT) for s in active])
            for i, (s, st) in enumerate(zip(active, states)):
                st.num_computed += len(tokens[i])
                drafts[s].append(int(x[i]))
                probs[s].append(q[i])
        self.q = {s: torch.stack(probs[s]) for s in ks}
        return drafts

    def rollback(self, seq: Sequence, num_kept: int) -> None:
        st = self.state[seq]
        st.num_computed = min(st.num_computed, num_kept)
        self.bm.truncate(st.block_table, st.num_computed)


def make_speculator(target: ModelRunner, sampler: Sampler, cfg: EngineConfig,
                    max_model_len: int) -> Speculator | None:
    """The one place that turns EngineConfig.speculative_method into a proposer."""
    if cfg.speculative_method == "draft":
        return DraftModelSpeculator(target, sampler, cfg, max_model_len, cfg.draft_model)
    if cfg.speculative_method == "ngram":
        return NgramSpeculator(target, sampler, cfg, max_model_len)
    return None


# ============================================================================ the LLM API
# vLLM's offline API: LLM builds an engine (with speculative decoding when the config asks
# for it) and runs its steps on behalf of whoever waits for outputs; generate() and chat()
# wait for whole answers, stream() yields them step by step.

def _is_token_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def normalize_prompts(prompts: object) -> list[str | list[int]]:
    """A prompt or a batch of prompts -> a list of prompts. A prompt is a string or a list
    (or tuple) of token ids; a batch is a list (or tuple) of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a string, a list of token ids, or a list of those; "
                         f"got {type(prompts).__name__}")
    if prompts and all(_is_token_id(t) for t in prompts):
        return [list(prompts)]                                  # one prompt of token ids
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, (list, tuple)):
            out.append(list(p))                                 # its ids are checked with the request
        else:
            raise ValueError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
    if not out:
        raise ValueError("prompts is empty")
    return out


def raise_if_failed(out: RequestOutput) -> RequestOutput:
    """out, unless its request failed inside the engine: then a RuntimeError saying why."""
    if out.finish_reason == "error":
        raise RuntimeError(f"request {out.request_id} failed inside the engine: {out.error}")
    return out


class RequestStream:
    """The iterator LLM.stream returns: its requests' outputs in step order. `step(inbox)`
    runs engine steps until the inbox has something; `release(ids)` aborts what is unfinished."""

    def __init__(self, ids: list[str], inbox: deque[RequestOutput],
                 step: Callable[[deque[RequestOutput]], None], release: Callable[[list[str]], None]):
        self.ids, self.inbox, self.step, self.release = ids, inbox, step, release
        self.pending = set(ids)

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> RequestOutput:
        while self.pending and not self.inbox:
            self.step(self.inbox)
        if not self.inbox:
            self.close()
            raise StopIteration
        out = self.inbox.popleft()
        if out.finished:
            self.pending.discard(out.request_id)
        if out.finish_reason == "error":
            self.close()
        return raise_if_failed(out)

    def close(self) -> None:
        """Abort the requests not finished yet and free their blocks."""
        if self.ids:
            ids, self.ids, self.pending = self.ids, [], set()
            self.inbox.clear()
            self.release(ids)

    def __del__(self) -> None:
        self.close()


class LLM:
    """The offline API, as in vLLM: `LLM(model_dir).generate(prompts, SamplingParams())`.

    Keyword arguments are EngineConfig's fields (block_size, max_model_len, draft_model, ...).
    Any number of generate()/chat() calls and stream() iterators may be open on one LLM, from
    any number of threads: they share the engine's continuous batch. One lock guards the
    engine; whichever caller holds it runs the next step for everyone, and each step's
    outputs go to the inbox of the call that owns the request. An LLM handed to server.make_server
    belongs to the server's engine thread from then on: a call on it raises RuntimeError.
    """

    def __init__(self, model: str | Path = DEFAULT_MODEL, *, device: str | None = None,
                 dtype: str = "float32", tokenizer: str | Path | None = None, **engine_kwargs):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = EngineConfig(device=device, dtype=dtype, **engine_kwargs)
        self.engine = LLMEngine(model, cfg, tokenizer=tokenizer, speculator_factory=make_speculator)
        self._inbox: dict[str, deque[RequestOutput]] = {}   # request id -> its owner's inbox
        # Held to touch the engine (submit, step, abort). Re-entrant: garbage collection can
        # drop a stream, whose close() releases its requests, inside a step of the same thread.
        self._lock = threading.RLock()
        self._stepping = False
        self._abandoned: list[str] = []             # released while a step ran: abort after it

    @property
    def tokenizer(self) -> Tokenizer | HFTokenizer | None:
        return self.engine.tokenizer

    def _submit(self, prompts, sampling_params, stream: bool) -> tuple[list[str], deque[RequestOutput]]:
        """Validate every prompt, then queue them all; -> (request ids, their shared inbox).
        stream: every step's progress comes to the inbox, not only the final outputs."""
        if self.engine.owner is not None:
            raise RuntimeError(f"this LLM's engine belongs to {self.engine.owner}: send requests there")
        prompts = normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt ({len(prompts)})")
        inbox: deque[RequestOutput] = deque()
        with self._lock:
            # Validate everything before queueing anything: a bad prompt rejects the call whole.
            seqs = [self.engine.make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
            for seq in seqs:
                self._inbox[seq.request_id] = inbox
                self.engine.add_sequence(seq, stream)
        return [s.request_id for s in seqs], inbox

    def _step(self, inbox: deque[RequestOutput]) -> None:
        """Wait for the engine, then run one step unless another caller's step has meanwhile
        brought `inbox` (the caller's) something; each output goes to its owner's inbox."""
        with self._lock:
            if inbox:
                return
            self._stepping = True
            try:
                outputs = self.engine.step()
            finally:
                self._stepping = False
            for out in outputs:
                owner = self._inbox.get(out.request_id)
                if owner is not None:
                    owner.append(out)
            if self._abandoned:
                ids, self._abandoned = self._abandoned, []
                self._release(ids)

    def _release(self, ids: list[str]) -> None:
        """Forget these requests; abort those still running (their blocks go back). Called
        when their owner is done or gone; deferred if that happens inside a step of this
        thread (garbage collection can drop a stream at any allocation)."""
        with self._lock:
            if self._stepping:
                self._abandoned += ids
                return
            for rid in ids:
                self._inbox.pop(rid, None)
                self.engine.abort(rid)

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion with continuous batching; outputs in prompt order."""
        ids, inbox = self._submit(prompts, sampling_params, stream=False)
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                while inbox:
                    out = raise_if_failed(inbox.popleft())
                    if out.finished:
                        done[out.request_id] = out
                if len(done) < len(ids):
                    self._step(inbox)
        finally:
            self._release(ids)
        return [done[r] for r in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """generate() for chat conversations (one, or a list of them), rendered by the model's
        chat template."""
        one = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict)
        conversations = [messages] if one else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError("messages must be a conversation (a list of {role, content}) or a list of them")
        prompts = [self.engine.chat_prompt(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params)

    def stream(self, prompts, sampling_params=None) -> Iterator[RequestOutput]:
        """Like generate, but yield each request's progress (with its text delta) per step.
        The prompts are validated and queued now; closing or dropping the iterator aborts
        the requests it has not finished."""
        ids, inbox = self._submit(prompts, sampling_params, stream=True)
        return RequestStream(ids, inbox, self._step, self._release)

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        """Let go of the engine's other processes (tensor-parallel workers) now."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ============================================================================ model cascade
# A cascade (FrugalGPT) answers with a small model first and pays for the large one only
# when the small one is unsure: its confidence is the mean (or minimum) probability it gave
# the tokens it chose, and an answer below the threshold is regenerated by the large model.
# The threshold trades accuracy for cost: 0 never escalates, anything above 1 always does.
# Both models run through their own engines, so the escalated requests are batched too
# and the large model's prefix cache still applies.

@dataclass
class CascadeOutput:
    """What Cascade.generate returns per prompt: the answer kept, which model gave it, and
    the small model's confidence in its own answer (the number the threshold was held to)."""
    output: RequestOutput
    escalated: bool                       # answered by the large model
    confidence: float


class Cascade:
    def __init__(self, small: LLM, large: LLM, threshold: float, confidence: str = "mean"):
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        if confidence not in ("mean", "min"):
            raise ValueError(f"confidence must be 'mean' or 'min', got {confidence!r}")
        vs, vl = small.engine.model.vocab_size, large.engine.model.vocab_size
        if vs != vl:      # token-id prompts and the escalation hand the same ids to both
            raise ValueError(f"the cascade's models must share a vocabulary: small has {vs} tokens, large {vl}")
        self.small, self.large, self.threshold, self.confidence = small, large, float(threshold), confidence
        self.num_requests = self.num_escalated = 0

    def score(self, out: RequestOutput) -> float:
        """The small model's mean or minimum probability of the tokens it chose (1 for none);
        with several samples (n > 1), that of the least confident one."""
        def one(token_ids: list[int], logprobs: list[dict[int, float]] | None) -> float:
            probs = [math.exp(lp[t]) for t, lp in zip(token_ids, logprobs or [])]
            if not probs:
                return 1.0
            return sum(probs) / len(probs) if self.confidence == "mean" else min(probs)
        return min([one(c.token_ids, c.logprobs) for c in out.outputs] or [one(out.token_ids, out.logprobs)])

    @staticmethod
    def small_params(p: SamplingParams) -> SamplingParams:
        """The small model also reports its chosen tokens' logprobs (logprobs=0: no alternatives)."""
        return p if p.logprobs is not None else dataclasses.replace(p, logprobs=0)

    def judge(self, out: RequestOutput, p: SamplingParams) -> float:
        """The small model's confidence in its finished output (it escalates below the
        threshold). Logprobs asked for only to score are dropped from out."""
        confidence = self.score(out)
        if p.logprobs is None:
            out.logprobs = None
            out.outputs = [dataclasses.replace(c, logprobs=None) for c in out.outputs]
        return confidence

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[CascadeOutput]:
        """Like LLM.generate; each output also says whether it escalated and the small model's confidence."""
        prompts = normalize_prompts(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt ({len(prompts)})")
        small = self.small.generate(prompts, [self.small_params(p) for p in params])
        outs = []
        for out, p in zip(small, params):
            confidence = self.judge(out, p)
            outs.append(CascadeOutput(out, confidence < self.threshold, confidence))
        escalate = [i for i, o in enumerate(outs) if o.escalated]
        if escalate:
            large = self.large.generate([prompts[i] for i in escalate], [params[i] for i in escalate])
            for i, out in zip(escalate, large):
                outs[i].output = out
        self.num_requests += len(outs)
        self.num_escalated += len(escalate)
        return outs


# ============================================================================ CLI

def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags that build an LLM (shared with tools/bench.py)."""
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the model's)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="CPU: bytes for the KV cache (default: max-num-seqs sequences of max-model-len, "
                        "at most half the available memory)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--semi-structured-sparsity", action="store_true",
                   help="2:4 checkpoints: run the projections as semi-structured sparse tensors on a GPU "
                        "(measured slower than dense on an H200; see the README)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (decode steps, prefills)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before the previous one's tokens reach the host "
                        "(default: on with CUDA, without speculation or tensor parallelism)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads on the CPU (default: 1 for models under 30M parameters, else torch's)")
    p.add_argument("--draft", default=None, help="draft model directory for speculative decoding")
    p.add_argument("--speculative-method", default=None, choices=["draft", "ngram"])
    p.add_argument("--num-speculative-tokens", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over N ranks: N processes on this machine, or a torchrun job's")


def llm_kwargs_from_args(args: argparse.Namespace) -> dict:
    """argparse flags (add_engine_args) -> LLM(...) keyword arguments."""
    return dict(device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                block_size=args.block_size, num_blocks=args.num_blocks, kv_cache_bytes=args.kv_cache_bytes,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                enable_chunked_prefill=not args.no_chunked_prefill, draft_model=args.draft,
                speculative_method=args.speculative_method,
                num_speculative_tokens=args.num_speculative_tokens, enforce_eager=args.enforce_eager,
                async_scheduling=args.async_scheduling, cpu_threads=args.cpu_threads,
                tensor_parallel_size=args.tensor_parallel_size, semi_structured_sparsity=args.semi_structured_sparsity)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="nanoserve: a minimal LLM inference server "
                                            "(benchmarks: tools/bench.py; quantization: quant.py)")
    p.add_argument("--prompt", help="generate a continuation of this text and stream it")
    p.add_argument("--serve", action="store_true", help="run the OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request's headers, or its body, or stay idle "
                        "between requests, before its connection is dropped")
    p.add_argument("--max-connections", type=int, default=2048,
                   help="requests in flight (open streams included) before answering 503")
    # The environment is the safer place for a secret (argv is visible to every user in `ps`).
    p.add_argument("--api-key", default=os.environ.get("NANOSERVE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $NANOSERVE_API_KEY; "
                        "neither: no authentication)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--cascade-small", default=None, metavar="DIR",
                   help="a model cascade: this small model answers first, --model takes what it is unsure of")
    p.add_argument("--cascade-threshold", type=float, default=None, metavar="T",
                   help="escalate when the small model's confidence is below T (0: never, > 1: always)")
    p.add_argument("--cascade-confidence", default="mean", choices=["mean", "min"],
                   help="the small model's confidence: mean or minimum probability of its tokens")
    add_engine_args(p)
    return p


def make_llm(args: argparse.Namespace) -> LLM | Cascade:
    """The LLM the flags describe, or with --cascade-small a Cascade (the small model gets
    the same engine flags, without speculation or tensor parallelism)."""
    if (args.cascade_small is None) != (args.cascade_threshold is None):
        raise ValueError("--cascade-small DIR and --cascade-threshold T go together")
    kw = llm_kwargs_from_args(args)
    if args.cascade_small is None:
        return LLM(args.model, **kw)
    if not math.isfinite(args.cascade_threshold) or args.cascade_threshold < 0:
        raise ValueError(f"--cascade-threshold must be a finite number >= 0, got {args.cascade_threshold}")
    small = LLM(args.cascade_small, **dict(kw, draft_model=None, speculative_method=None, num_speculative_tokens=0,
                                           tensor_parallel_size=1))
    return Cascade(small, LLM(args.model, **kw), args.cascade_threshold, args.cascade_confidence)


def serve(args: argparse.Namespace) -> int:
    # The one import of a module above this one: the HTTP server is an optional backend,
    # selected here at its entry point (as vLLM selects its executors).
    import server
    # The port first: a busy one fails in a moment, not after the model has loaded.
    sock = server.listen(args.host, args.port)
    llm = make_llm(args)
    srv = server.make_server(llm, sock=sock, max_waiting=args.max_waiting, read_timeout=args.read_timeout,
                             api_key=args.api_key, max_connections=args.max_connections)
    host, port = srv.server_address[:2]
    what = args.model if not isinstance(llm, Cascade) else \
        f"{args.model} behind {args.cascade_small} (cascade, threshold {llm.threshold} on {llm.confidence} confidence)"
    print(f"[nanoserve] serving {what} on http://{host}:{port}/v1 "
          f"({srv.llm.engine.device}, {srv.llm.stats()['kv_blocks_total']} KV blocks, "
          f"{'API key required' if args.api_key is not None else 'no API key'})", file=sys.stderr)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def generate_to_stdout(args: argparse.Namespace) -> int:
    """--prompt: stream one completion to stdout, then a one-line summary to stderr."""
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty)
    llm = make_llm(args)
    if isinstance(llm, Cascade):                  # not streamed: the small model's answer may be dropped
        answer = llm.generate([args.prompt], params)[0]
        out = answer.output
        print(out.text)
        print(f"[nanoserve] {len(out.token_ids)} tokens, finish={out.finish_reason}, answered by the "
              f"{'large' if answer.escalated else 'small'} model (small model's {llm.confidence} confidence "
              f"{answer.confidence:.3f}, threshold {llm.threshold})", file=sys.stderr)
        return 0
    out = None
    for out in llm.stream(args.prompt, params):
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    m, st = out.metrics, llm.stats()
    tpot = m["time_per_output_token"]
    print(f"[nanoserve] {len(out.token_ids)} tokens, finish={out.finish_reason}, "
          f"TTFT {m['time_to_first_token'] * 1000:.1f} ms, decode "
          f"{(1 / tpot) if tpot else float('nan'):.1f} tok/s, KV blocks used "
          f"{st['kv_blocks_peak']}/{st['kv_blocks_total']} (peak)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0:
            # A torchrun job: rank 0 runs this command; the other ranks serve it as workers.
            import parallel                # an optional backend, imported where it is chosen (see LLMEngine)
            parallel.tp_worker_from_env(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            return 0
        if args.serve:
            return serve(args)
        if args.prompt is None:
            raise ValueError("nothing to do: pass --prompt TEXT or --serve (benchmarks: tools/bench.py)")
        return generate_to_stdout(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"nanoserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as a script, this file is the module __main__, and server.py's `import nanoserve`
    # would load a second copy whose classes are not this copy's (an LLM made here would
    # refuse its SamplingParams). Running main from the imported module leaves one copy.
    import nanoserve
    sys.exit(nanoserve.main())
