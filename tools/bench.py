"""Benchmarks: each of nanoserve's claims as a measured number.

    python tools/bench.py [SUITE ...] [--model DIR | random:PRESET] [--device cuda] [--out FILE]

Suites (default: all): latency overhead profile host throughput memory prefix chunked spec quant sla
server transformers (nanoserve beside transformers' generate, one thread each) tp (tensor
parallelism) cascade (the bundled pair as a model cascade) sparse (2:4 sparsity: quality on the
CPU, matmul speed on a GPU). Each prints one Markdown table; --out writes every number as JSON. Timings on a
shared or small machine are noisy: compare figures measured in the same run. Random-weight
presets of real shapes (random:llama-2-7b, random:tinyllama-1.1b, ...) measure speed
where no checkpoint is at hand.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import http.client
import importlib.util
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402
import nanoserve  # noqa: E402
import quant  # noqa: E402
import server as http_server  # noqa: E402
from nanoserve import LLM, SamplingParams  # noqa: E402

SHARED_LLAMA2_TOKENIZER = ROOT.parent / "shared" / "models" / "tokenizers" / "llama2" / "tokenizer.model"


# ============================================================================ measurements

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _progress(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty() or os.environ.get("NANOSERVE_PROGRESS"):
        print(f"\r[bench] {label}: {done}/{total}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)


def _free_memory() -> None:
    """Let go of engines already dropped: on a GPU each engine sizes its KV pool from the
    memory that is free when it starts, so the previous one must be gone first."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy, bytes read + written per second: the practical bandwidth ceiling.
    1 GiB on a GPU (far past its L2), 256 MiB on a CPU."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Square matmul rate: 8192 on a GPU (big enough to reach its tensor-core peak), 1024 on a CPU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def run_timed(llm: LLM, prompts: list, params: list[SamplingParams],
              arrivals: list[float] | None = None) -> dict:
    """Run requests to completion, arriving at the given offsets (default: all at once);
    -> per-request TTFT, token times and totals."""
    eng = llm.engine
    arrivals = arrivals or [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    t0 = time.perf_counter()
    ids: dict[str, int] = {}
    token_times: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    ttft: dict[int, float] = {}
    nxt, done = 0, 0
    while done < len(prompts):
        now = time.perf_counter() - t0
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            i = order[nxt]
            ids[eng.add_request(prompts[i], params[i])] = i
            nxt += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, arrivals[order[nxt]] - now))
            continue
        outs = eng.step()            # its outputs' ids are on the host: no sync needed to time them
        now = time.perf_counter() - t0
        for out in outs:
            i = ids[out.request_id]
            if i not in ttft:
                ttft[i] = now - arrivals[i]
            token_times[i] += [now] * (len(out.token_ids) - len(token_times[i]))
            if out.finished:
                done += 1
                _progress("requests", done, len(prompts))
    elapsed = time.perf_counter() - t0
    itl = [b - a for ts in token_times.values() for a, b in zip(ts, ts[1:])]
    return {"elapsed": elapsed, "ttft": [ttft[i] for i in range(len(prompts))], "itl": itl,
            "output_tokens": sum(len(t) for t in token_times.values()), "token_times": token_times}


def bench_latency(llm: LLM, prompt_len: int = 128, new_tokens: int = 64) -> dict:
    """Batch-1 prefill and decode, against the roofline of this machine. Where the engine
    captures prefills in graphs (PiecewiseGraphs), the time to first token without them too."""
    eng, mc = llm.engine, llm.engine.model_config
    dev = eng.device
    vocab = mc.vocab_size

    def random_prompt(seed: int) -> list[int]:      # shares no cached block with another seed's
        return [1] + np.random.default_rng(seed).integers(3, vocab, prompt_len - 1).tolist()
    prompt = random_prompt(0)
    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    # Warm-up on a prompt of the same length: kernels loaded, its graphs captured.
    llm.generate(random_prompt(1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out = llm.generate(prompt, p)[0]
    m = out.metrics
    # Bytes a decode step reads: every weight once; of the embedding table only one row,
    # unless it is tied to the LM head, which reads it all.
    unique = {t.data_ptr(): t for name, t in eng.model.state_dict().items()
              if name != "model.embed_tokens.weight" or mc.tie_word_embeddings}
    weight_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    n_params = sum(t.numel() for t in unique.values())
    decode_tps = 1 / m["time_per_output_token"]
    bw = measure_copy_bandwidth(dev)
    flops = measure_matmul_flops(dev, eng.dtype)
    # A decode step at batch B does ~2 * params * B FLOPs and reads every weight once:
    # intensity = 2 * B / bytes_per_param FLOPs/byte. Prefill of T tokens: 2 * T / bytes.
    bpp = weight_bytes / n_params
    ridge = flops / bw                      # FLOPs per byte where a kernel stops being memory-bound
    decode_ai, prefill_ai = 2 / bpp, 2 * prompt_len / bpp
    eager_tps = eager_ttft = None
    if eng.runner.use_graphs:                      # the same decode without CUDA graphs
        eng.runner.use_graphs = False
        eager_tps = 1 / llm.generate(prompt, p)[0].metrics["time_per_output_token"]
        eng.runner.use_graphs = True
    if eng.runner.use_piecewise_graphs:            # a prefill of the same length without them
        eng.runner.use_piecewise_graphs = False
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(random_prompt(2), one)         # warm: the eager path's first prefill of this size
        eager_ttft = llm.generate(random_prompt(3), one)[0].metrics["time_to_first_token"]
        eng.runner.use_piecewise_graphs = True
    return {
        "prompt_tokens": prompt_len, "ttft_s": m["time_to_first_token"],
        "prefill_tok_s": prompt_len / m["time_to_first_token"], "decode_tok_s": decode_tps,
        "weight_bytes": weight_bytes, "achieved_weight_GBps": weight_bytes * decode_tps / 1e9,
        "copy_bandwidth_GBps": bw / 1e9, "fraction_of_copy_bandwidth": weight_bytes * decode_tps / bw,
        "matmul_TFLOPs": flops / 1e12, "ridge_flops_per_byte": ridge,
        "decode_flops_per_byte": decode_ai, "prefill_flops_per_byte": prefill_ai,
        "decode_verdict": "memory-bound" if decode_ai < ridge else "compute-bound",
        "prefill_verdict": "memory-bound" if prefill_ai < ridge else "compute-bound",
        "decode_tok_s_eager": eager_tps, "ttft_s_eager": eager_ttft,
    }


def nano_vllm_workload(vocab: int, n: int, lo: int, hi: int, seed: int = 0):
    """nano-vllm's benchmark: random prompt ids, prompt and output lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]
    params = [SamplingParams(temperature=0.6, max_tokens=int(rng.integers(lo, hi + 1)), ignore_eos=True,
                             seed=i) for i in range(n)]
    return prompts, params


def bench_throughput(llm: LLM, n: int, lo: int, hi: int, static_batch: int) -> dict:
    """Continuous batching against static batching on the same engine and workload.

    Static batching (the pre-Orca way): a batch of requests starts together, every one is
    padded to the longest output (here: made to generate that many tokens, the extra ones
    discarded), and the next batch starts only when the whole batch is done."""
    prompts, params = nano_vllm_workload(llm.engine.model_config.vocab_size, n, lo, hi)
    useful = sum(p.max_tokens for p in params)
    cont = run_timed(llm, prompts, params)
    eng, warm = llm.engine, {}
    if eng.async_scheduling:
        # Async against synchronous steps (each waiting for its own ids), both warm (the CUDA
        # graphs the first run captured), each on the prompts with their ids shifted (the
        # same lengths; nothing in the prefix cache).
        V = eng.model_config.vocab_size
        for shift, mode in ((1, False), (2, True)):
            eng.async_scheduling = mode
            warm[mode] = run_timed(llm, [[3 + (t - 3 + shift) % (V - 3) for t in p] for p in prompts],
                                   params)["elapsed"]
    t = time.perf_counter()
    for b in range(0, n, static_batch):
        group = params[b:b + static_batch]
        longest = max(p.max_tokens for p in group)
        padded = [SamplingParams(temperature=p.temperature, max_tokens=longest, ignore_eos=True, seed=p.seed)
                  for p in group]
        llm.generate(prompts[b:b + static_batch], padded)
        _progress("static batches", b // static_batch + 1, -(-n // static_batch))
    static_s = time.perf_counter() - t
    return {"requests": n, "lengths": [lo, hi], "useful_output_tokens": useful,
            "continuous_s": cont["elapsed"], "continuous_tok_s": useful / cont["elapsed"],
            "static_batch": static_batch, "static_s": static_s, "static_tok_s": useful / static_s,
            "speedup": static_s / cont["elapsed"], "async_scheduling": eng.async_scheduling,
            "synchronous_tok_s": useful / warm[False] if warm else None,
            "async_warm_tok_s": useful / warm[True] if warm else None,
            "async_speedup": warm[False] / warm[True] if warm else None}


def bench_overhead(llm: LLM, batches: tuple[int, ...] = (1, 64), new_tokens: int = 64) -> dict:
    """Decode tokens/s and where a decode step's time goes, at several batch sizes."""
    vocab = llm.engine.model_config.vocab_size
    rows = []
    for b in batches:
        prompts = [[1] + np.random.default_rng(i).integers(3, vocab, 16).tolist() for i in range(b)]
        p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))     # warm-up
        eng = llm.engine
        eng.step_time = dict.fromkeys(eng.step_time, 0.0)
        steps = eng.num_steps
        t = time.perf_counter()
        llm.generate(prompts, p)
        elapsed = time.perf_counter() - t
        n = eng.num_steps - steps
        rows.append({"batch": b, "decode_tok_s": b * new_tokens / elapsed, "steps": n,
                     **{f"{k}_ms_per_step": 1e3 * v / n for k, v in eng.step_time.items()}})
    return {"rows": rows}


# (kind, substrings of a GPU kernel's or CPU op's name), first match wins. dense_mma, which runs
# quant_mma_kernel on 16-bit weights, counts as a quantized matmul here.
KERNEL_KINDS = (
    ("quantized matmul", ("quant_gemv", "quant_mma", "quant_gemm", "dequantize")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::linear",
                "aten::matmul", "aten::bmm", "_weight_int")),
    ("attention", ("paged_decode", "paged_prefill", "attention", "sdpa", "flash")),
    ("RMSNorm", ("rms_norm",)),
    ("RoPE + cache write", ("rope", "index_copy")),
    ("SiLU x up", ("silu",)),
)


def bench_profile(llm: LLM, batches: tuple[int, ...], steps: int = 8) -> dict:
    """Where a decode step's time goes, kernel by kernel (torch.profiler): for each batch
    size, `steps` decode steps of that many running sequences, with CUDA graphs and without
    (on a GPU), and with synchronous steps where the engine schedules asynchronously, each
    kernel's time per step, the kinds summed, and the step's wall time against the device's
    busy time (the difference: the GPU waiting for the host)."""
    from torch.profiler import ProfilerActivity, profile
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    gpu = eng.device.type == "cuda"
    graphed, overlap = eng.runner.use_graphs, eng.async_scheduling
    modes = [("graphs", True, overlap)] if graphed else []              # (mode, CUDA graphs, async steps)
    modes.append(("eager", False, overlap))
    if overlap:                                   # the same steps, each waiting for its own ids
        modes.append(("graphs, synchronous steps" if graphed else "synchronous steps", graphed, False))
    out = []
    for b in batches:
        for mode, graphs, async_steps in modes:
            eng.runner.use_graphs, eng.async_scheduling = graphs, async_steps
            prompts = [[1] + np.random.default_rng(i).integers(3, vocab, 16).tolist() for i in range(b)]
            p = SamplingParams(temperature=0, max_tokens=2 * steps + 8, ignore_eos=True)
            for q in prompts:
                eng.add_request(q, p)
            for _ in range(4):                            # prefill, then decode until warm (graph captured)
                eng.step()
            _sync(eng.device)
            t = time.perf_counter()
            for _ in range(steps):
                eng.step()
            _sync(eng.device)
            wall = (time.perf_counter() - t) / steps
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    eng.step()
                _sync(eng.device)
            while eng.has_unfinished():
                eng.step()
            rows = []
            for e in prof.key_averages():
                if gpu:      # device kernels only (CPU ops carry their kernels' time too)
                    us = e.self_device_time_total if str(e.device_type).endswith("CUDA") else 0
                else:        # CPU: operators' own time; the decode step itself is not an op
                    us = e.self_cpu_time_total if e.key.startswith("aten::") else 0
                if us > 0:
                    kind = next((k for k, subs in KERNEL_KINDS if any(x in e.key.lower() for x in subs)), "other")
                    rows.append({"name": e.key, "kind": kind, "us_per_step": us / steps, "calls_per_step": e.count / steps})
            rows.sort(key=lambda r: -r["us_per_step"])
            busy = sum(r["us_per_step"] for r in rows)
            kinds: dict[str, float] = {}
            for r in rows:
                kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["us_per_step"]
            out.append({"batch": b, "mode": mode, "wall_ms_per_step": 1e3 * wall, "busy_ms_per_step": busy / 1e3,
                        "kinds_us": kinds, "top": rows[:12]})
    eng.runner.use_graphs, eng.async_scheduling = graphed, overlap
    return {"steps": steps, "rows": out}


def bench_host(batch: int = 256, steps: int = 100, warmup: int = 4) -> dict:
    """The engine's own cost per decode step, without a model: the forward pass replaced by
    zeros and the logits by random numbers, so what is left is what the host does every step
    (scheduling, the runner's inputs through the CUDA-graph input path, sampling with
    per-request seeds, outputs) for `batch` running requests of the nano-vllm workload: the
    floor of a step on a fast GPU. On a GPU the stubs and the sampling run there; the rest
    is host Python either way, so a CPU measures most of it too.

    The prompts (100-1024 tokens each) are prefilled first, with the forward stubbed there
    too (the stubbed decode steps never read the cache it would have written), over many
    steps: the step's token budget (max_num_batched_tokens) takes a few prompts at a time, and
    the requests already prefilled decode meanwhile. Every request's max_tokens is one more
    than the steps that run, prefill included, so none finishes before the last timed step: a
    first engine counts the prefill steps (which requests a step schedules does not depend on
    the tokens sampled: no EOS, no stop strings), a second one runs them again, then `warmup`
    decode steps and the `steps` timed ones, twice: every request streaming (a RequestOutput
    each per step, as 256 SSE clients get) and none (LLM.generate's requests, which get one
    when they finish). Then `steps` // 4 more final-only steps under cProfile: where the host's
    time goes, by function (its own time, without what it calls), as a share of the profiled
    steps' time (the profiler slows Python calls, so the shares, not the times, are the figure).
    Then `steps` final-only steps with async scheduling (LLMEngine.step: on a CPU the host is
    the device, so this measures its bookkeeping, not an overlap), and last `steps` final-only
    steps with a frequency penalty on every request. Each timed row is split as the engine's
    step_time splits it (schedule, runner inputs, sampling, outputs), with the logits stub's
    own time taken out of sampling: on the CPU, sampling is the tensor math a GPU would run."""
    def stubbed_engine() -> nanoserve.LLMEngine:
        eng = LLM("random:nanocoder-5m-8k", max_model_len=2048, num_blocks=40000).engine
        D, V = eng.model_config.hidden_size, eng.model_config.vocab_size
        dev = eng.device
        eng.runner.use_graphs = True                     # the padded static-buffer path (captured on a GPU)
        eng.runner.use_piecewise_graphs = False          # its pieces would run the real layers, not the stub
        eng.model.forward = lambda input_ids, positions, kv_caches, meta: torch.zeros(len(input_ids), D, device=dev)
        g = torch.Generator(dev).manual_seed(0)

        def logits_stub(h: torch.Tensor) -> torch.Tensor:       # timed: it stands for the LM head
            t = time.perf_counter()
            out = torch.randn(h.shape[0], V, generator=g, device=dev)
            eng.step_time["stub"] += time.perf_counter() - t
            return out
        eng.runner.compute_logits = logits_stub
        eng.step_time["stub"] = 0.0
        return eng

    def prefill(eng: nanoserve.LLMEngine, max_tokens: int) -> int:
        """Add the requests and step until every prompt is computed -> the steps that took."""
        for p, sp in zip(prompts, params):
            eng.add_request(p, SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True, seed=sp.seed))
        n = 0
        while eng.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in eng.scheduler.running):
            eng.step()
            n += 1
        return n

    eng = stubbed_engine()
    prompts, params = nano_vllm_workload(eng.model_config.vocab_size, batch, 100, 1024)
    prefill_steps = prefill(eng, max_tokens=eng.max_model_len)          # counted; only the context ends one
    del eng
    _free_memory()
    eng = stubbed_engine()
    again = prefill(eng, max_tokens=prefill_steps + warmup + 4 * steps + steps // 4 + 2)
    if again != prefill_steps:
        raise RuntimeError(f"bench host: the prefill took {again} steps, not the {prefill_steps} counted")
    for _ in range(warmup):
        eng.step()
    graph_steps = eng.runner.graphs.steps if eng.runner.graphs else 0
    r = {"batch": batch, "prefill_steps": prefill_steps, "warmup_steps": warmup, "steps": steps}
    def timed(key: str) -> None:
        eng.step_time = dict.fromkeys(eng.step_time, 0.0)
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        r[key] = {"ms_per_step": 1e3 * (time.perf_counter() - t) / steps,
                  **{f"{k}_ms": 1e3 * v / steps for k, v in eng.step_time.items() if k != "draft"}}

    for streaming in (True, False):
        for req in eng.outputs.requests.values():
            req.stream = streaming
        timed("streaming" if streaming else "final_only")
    eng.async_scheduling = True              # the host's bookkeeping of it (the CPU has nothing to overlap)
    timed("final_only_async")
    eng.async_scheduling = False
    eng.step()                               # the step still in flight: its outputs
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps // 4):
        eng.step()
    profile.disable()
    for seq in eng.scheduler.running:                   # every request now penalizes repeats too
        seq.params = dataclasses.replace(seq.params, frequency_penalty=0.1)
    timed("final_only_penalized")
    r["graph_path_steps"] = eng.runner.graphs.steps - graph_steps
    if len(eng.scheduler.running) != batch:             # the engine ends a failed step's requests
        raise RuntimeError(f"bench host: {batch - len(eng.scheduler.running)} requests ended early; "
                           "a step failed (see the engine's message above)")
    stats = pstats.Stats(profile).stats                  # {(file, line, name): (calls, _, own time, ...)}
    total = sum(v[2] for v in stats.values()) or 1.0
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    r["profile"] = [{"function": f"{Path(f).name}:{line} {name}" if line else name, "share": v[2] / total,
                     "calls_per_step": v[0] / max(1, steps // 4)} for (f, line, name), v in top]
    return r


class TransformersBaseline:
    """Hugging Face transformers' `generate` in a child interpreter, tools/hf_generate.py
    (which says why it cannot run in this process), asked over a pipe. The child's stderr is
    this process's, so its errors show where the benchmark's do; it ends when its stdin
    closes (close(), or this process ending)."""

    def __init__(self, model_dir: str, device: str, dtype: str, threads: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(ROOT / "tools" / "hf_generate.py"), str(Path(model_dir).resolve()),
             device, dtype, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
        self.info = self._read()                     # {"transformers": version, "vocab_size", "threads"}

    def generate(self, prompts: list[list[int]], new_tokens: list[int], **options) -> tuple[float, list[list[int]]]:
        """The prompts as one left-padded batch, run to the longest of new_tokens ->
        (seconds of the generate call, each prompt's first new_tokens[i] tokens)."""
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens, "generate": options}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["seconds"], r["tokens"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tools/hf_generate.py exited with code {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()

    def __enter__(self) -> "TransformersBaseline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_hf_static(model_dir: str, device: str, dtype: str, n: int, lo: int, hi: int, batch: int) -> dict | None:
    """The same workload through Hugging Face transformers' `generate`, statically batched
    (left padding, every request runs to its batch's longest output), in a child process
    (TransformersBaseline) with as many torch threads as this process has; the time is
    the sum of its generate calls. None when transformers is not installed or the model is
    not a checkpoint directory."""
    if importlib.util.find_spec("transformers") is None or str(model_dir).startswith("random:"):
        return None
    with TransformersBaseline(model_dir, device, dtype, torch.get_num_threads()) as hf:
        prompts, params = nano_vllm_workload(hf.info["vocab_size"], n, lo, hi)
        elapsed = 0.0
        for b in range(0, n, batch):
            group, gp = prompts[b:b + batch], params[b:b + batch]
            longest = max(p.max_tokens for p in gp)
            seconds, _ = hf.generate(group, [longest] * len(group), do_sample=True, temperature=0.6, top_k=0)
            elapsed += seconds
            _progress("transformers batches", b // batch + 1, -(-n // batch))
    useful = sum(p.max_tokens for p in params)
    return {"transformers": hf.info["transformers"], "batch": batch, "threads": hf.info["threads"],
            "seconds": elapsed, "tok_s": useful / elapsed}


def bench_versus_transformers(model_dir: str, kw: dict, rounds: int, prefix_len: int) -> dict | None:
    """nanoserve in this process beside Hugging Face transformers' `generate` in a child
    process (TransformersBaseline), one torch thread each; greedy, so both must produce the
    same tokens.

    How the two are compared: rounds alternate which goes first (nanoserve then transformers,
    then the other way round), so that both see the same machine noise; while the child
    generates this process waits on the pipe, so the two never run at the same time. Each
    side's time is its own generate call (the child times `generate` alone; sending the
    prompts and reading the tokens back are outside it), and the figures are medians of the
    rounds.

    Three workloads: one request (a 32-token prompt, 256 new tokens); 64 requests at once
    (prompts of 16-64 tokens, 16-128 new tokens each; transformers gets them as one
    left-padded batch and runs it to the longest output, as static batching must); 16
    requests sharing a prefix_len-token prefix, 16 own tokens each, 32 new tokens (a fresh
    prefix every round, so only sharing within the round is cached).
    -> per workload the useful output tok/s of every round, medians and per-round ratios."""
    if importlib.util.find_spec("transformers") is None or str(model_dir).startswith("random:"):
        return None
    torch.set_num_threads(1)
    llm = LLM(model_dir, **{**kw, "cpu_threads": 1})
    hf = TransformersBaseline(model_dir, kw["device"], kw["dtype"], threads=1)
    vocab = hf.info["vocab_size"]
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return [1] + rng.integers(3, vocab, n - 1).tolist()

    def workload(name: str) -> tuple[list[list[int]], list[int]]:
        if name == "batch 1":
            return [ids(32)], [256]
        if name == "64 requests":
            return [ids(int(n)) for n in rng.integers(16, 65, 64)], rng.integers(16, 129, 64).tolist()
        prefix = ids(prefix_len)
        return [prefix + rng.integers(3, vocab, 16).tolist() for _ in range(16)], [32] * 16

    def run_nano(prompts: list[list[int]], new: list[int]) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in new]
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        return time.perf_counter() - t, [o.token_ids for o in outs]

    def run_hf(prompts: list[list[int]], new: list[int]) -> tuple[float, list[list[int]]]:
        return hf.generate(prompts, new, do_sample=False)

    result = {"transformers": hf.info["transformers"], "threads": torch.get_num_threads(),
              "hf_threads": hf.info["threads"], "rounds": rounds, "prefix_len": prefix_len}
    for name in ("batch 1", "64 requests", f"16 requests, shared {prefix_len}-token prefix"):
        prompts, new = workload(name)
        run_nano(prompts, [4] * len(new)), run_hf(prompts, [4] * len(new))         # warm-up
        nano_s, hf_s, same, tokens = [], [], 0, 0
        for r in range(rounds):
            prompts, new = workload(name)
            if r % 2:                                       # alternate who goes first
                (b, tb), (a, ta) = run_hf(prompts, new), run_nano(prompts, new)
            else:
                (a, ta), (b, tb) = run_nano(prompts, new), run_hf(prompts, new)
            nano_s.append(a)
            hf_s.append(b)
            same += sum(x == y for x, y in zip(ta, tb))
            tokens += sum(new)
            _progress(name, r + 1, rounds)
        tokens /= rounds                                    # useful output tokens per round (mean)
        ratios = sorted(h / n for n, h in zip(nano_s, hf_s))
        result[name] = {"requests": len(prompts), "output_tokens_per_round": tokens,
                        "nano_tok_s": [tokens / s for s in nano_s], "hf_tok_s": [tokens / s for s in hf_s],
                        "nano_tok_s_median": tokens / float(np.median(nano_s)),
                        "hf_tok_s_median": tokens / float(np.median(hf_s)),
                        "speedup_median": float(np.median(ratios)), "speedup_range": [ratios[0], ratios[-1]],
                        "identical_outputs": same, "outputs": rounds * len(prompts)}
    hf.close()
    return result


def bench_tp(model: str, kw: dict, configs: tuple[tuple[int, int | None], ...], batches: tuple[int, ...],
             new_tokens: int) -> dict:
    """Decode step time with the model sharded over N ranks, for each (ranks, threads per
    rank) in configs (threads None: the engine's default), and the share of rank 0's step
    spent in all-reduce (two per layer, plus the embedding's; on the CPU over gloo and
    loopback TCP). The time in all-reduce includes waiting for the slowest rank."""
    rows = []
    for n, threads in configs:
        with LLM(model, **{**kw, "tensor_parallel_size": n, "cpu_threads": threads}) as llm:
            vocab = llm.engine.model_config.vocab_size
            for b in batches:
                prompts = [[1] + np.random.default_rng(i).integers(3, vocab, 16).tolist() for i in range(b)]
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))    # warm-up
                tp, steps = llm.engine.tp, llm.engine.num_steps               # tp: None on one rank
                if tp is not None:
                    tp.reduce_seconds = 0.0
                t = time.perf_counter()
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
                elapsed = time.perf_counter() - t
                n_steps = llm.engine.num_steps - steps
                rows.append({"ranks": n, "threads_per_rank": torch.get_num_threads(), "batch": b,
                             "step_ms": 1e3 * elapsed / n_steps, "decode_tok_s": b * new_tokens / elapsed,
                             "all_reduce_share": tp.reduce_seconds / elapsed if tp is not None else 0.0})
                _progress(f"tp={n}", batches.index(b) + 1, len(batches))
    base = {r["batch"]: r["step_ms"] for r in rows if r is rows[0] or r["ranks"] == rows[0]["ranks"] and
            r["threads_per_rank"] == rows[0]["threads_per_rank"]}
    for r in rows:
        r["speedup"] = base[r["batch"]] / r["step_ms"]
    return {"model": model, "rows": rows}


def next_line_tasks(n: int, context_chars: int = 600) -> list[tuple[str, str]]:
    """A held-out task with an exact answer: (the text of a held-out standard-library file up
    to a line break, that file's next line), for lines of at least 8 non-blank characters."""
    sys.path.insert(0, str(ROOT / "tools"))
    from train_tiny import corpus                          # the files the bundled models never saw
    _, held = corpus()
    candidates = []
    for text in held:
        pos = text.find("\n", context_chars)
        while pos != -1 and pos + 1 < len(text):
            end = text.find("\n", pos + 1)
            line = text[pos + 1:end if end != -1 else len(text)]
            if len(line.strip()) >= 8:
                candidates.append((text[text.find("\n", pos - context_chars) + 1:pos + 1], line))
            pos = end
    step = max(1, len(candidates) // n)
    return candidates[::step][:n]


def bench_sparse_quality(model_dir: str, windows: int = 16, seq_len: int = 128, calib_samples: int = 16) -> dict:
    """Held-out perplexity of the model dense and pruned to 2:4 (magnitude, Wanda, Wanda then
    int4 in groups of 32), fp32 on the CPU: what sparsity costs in quality. The held-out text
    is the standard-library files tools/train_tiny.py kept out of training; calibration
    (Wanda's input norms) is sequences the model samples itself, as quant.py does."""
    sys.path.insert(0, str(ROOT / "tools"))
    from quant_eval import SPARSE_CONFIGS, evaluate, held_out_and_calibration, sparse_quality
    llm = LLM(model_dir, device="cpu", dtype="float32")
    held, calib = held_out_and_calibration(llm, windows, seq_len, calib_samples)
    dense, _, ref = evaluate(llm.engine.model, None, held)
    rows = [{"weights": "dense fp32", "ppl": dense, "kl": 0.0}]
    configs = [c for c in SPARSE_CONFIGS if c[2] != 8]            # int8 adds nothing int4 does not show
    for row in sparse_quality(llm.engine.model, calib, ref, held, configs):
        rows.append({"weights": row["config"], "ppl": row["ppl"], "kl": row["kl"]})
        _progress("2:4 quality", len(rows) - 1, len(configs))
    return {"windows": windows, "seq_len": seq_len, "rows": rows}


def _gpu_time(fn: Callable[[], object], calls: int = 50) -> tuple[float, float]:
    """fn's time per call on the GPU (events around `calls` back-to-back calls: a GPU left
    idle while the host prepares the next call counts) and the host's time per call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls / 1e3, host


def _graph_time(fn: Callable[[], object], calls: int = 10) -> float | str:
    """fn's time per call replayed from a CUDA graph of `calls` calls (the kernels alone: no
    host work between them), or why it cannot be captured."""
    def repeated() -> None:
        for _ in range(calls):
            fn()
    try:
        graph, _ = nanoserve.capture_graph(repeated, None)
        return _gpu_time(graph.replay, 10)[0] / calls
    except Exception as e:                      # noqa: BLE001  (reported in the table)
        return f"not capturable: {type(e).__name__}: {str(e)[:100]}"


def bench_sparse_speed(device: torch.device, dtype: torch.dtype = torch.float16) -> dict | None:
    """2:4 sparse against dense matmuls, y = x W^T, on a GPU: Llama-2-7B's projection shapes
    (q/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008) at decode sizes (1 and 16 rows)
    and prefill sizes (2,048 and 8,192 rows), W pruned to 2:4 and held as PyTorch's
    semi-structured sparse tensor, in each of its two forms (cuSPARSELt, CUTLASS), against the
    same W dense (cuBLAS). Each is timed eagerly (what serving pays), replayed from a CUDA
    graph (its kernels alone) and by the host's time per call: where the eager time is the
    host's, the GPU waits between calls (PyTorch's cuSPARSELt path has built its matmul
    descriptors and plan on every call: pytorch/pytorch#153825). None without a GPU with sparse
    tensor cores (compute capability 8.0 on)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return None
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    rows = []
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
        W = torch.randn(out_f, in_f, device=device, dtype=dtype)
        W = quant.prune_24(W.float(), W.float().abs()).to(dtype)
        forms = {}
        for name, force_cutlass in (("cuSPARSELt", False), ("CUTLASS", True)):
            SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
            try:
                forms[name] = to_sparse_semi_structured(W)
            except Exception as e:              # noqa: BLE001  (a form this build lacks)
                forms[name] = f"{type(e).__name__}: {str(e)[:100]}"
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        for m in (1, 16, 2048, 8192):
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            dense_s, dense_host = _gpu_time(lambda: F.linear(x, W))
            row = {"shape": [out_f, in_f], "rows": m, "dense_s": dense_s, "dense_host_s": dense_host,
                   "dense_graph_s": _graph_time(lambda: F.linear(x, W)),
                   "dense_TFLOPs": 2 * m * out_f * in_f / dense_s / 1e12}
            for name, Ws in forms.items():
                if isinstance(Ws, str):
                    row[name] = Ws
                    continue
                eager, host = _gpu_time(lambda: F.linear(x, Ws))
                row[name] = {"eager_s": eager, "host_s": host, "graph_s": _graph_time(lambda: F.linear(x, Ws)),
                             "type": type(Ws).__name__,
                             "max_abs_diff": (F.linear(x, Ws).float() - F.linear(x, W).float()).abs().max().item()}
            timed = [f["eager_s"] for f in (row.get("cuSPARSELt"), row.get("CUTLASS")) if isinstance(f, dict)]
            row["sparse_s"] = min(timed) if timed else float("nan")
            row["speedup"] = dense_s / row["sparse_s"]
            rows.append(row)
    return {"dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(device), "rows": rows}


def sparse_speed_text(row: dict) -> str:
    """One row of bench_sparse_speed as text: each form's eager, graph and host time per call."""
    def us(v: float | str) -> str:
        return f"{v * 1e6:.1f}" if isinstance(v, float) else v
    parts = [f"dense {us(row['dense_s'])} us eager / {us(row['dense_graph_s'])} graph "
             f"({row['dense_TFLOPs']:.0f} TFLOP/s)"]
    for name in ("cuSPARSELt", "CUTLASS"):
        f = row.get(name)
        parts.append(f"{name}: {f}" if not isinstance(f, dict) else
                     f"{name} {us(f['eager_s'])} us eager / {us(f['graph_s'])} graph / host {us(f['host_s'])} us "
                     f"(max |diff| {f['max_abs_diff']:.3g})")
    return f"best 2:4 eager {row['speedup']:.2f}x dense; " + "; ".join(parts)


def bench_cascade(small_dir: str, large_dir: str, kw: dict, n: int, thresholds: tuple[float, ...]) -> dict:
    """Accuracy (exact match of the next line, greedy) against cost for small only, large only
    and the cascade at each threshold. Cost: measured seconds for all requests, and FLOPs per
    request, 2 x parameters per token each model processed (prompt and output; an escalated
    request pays for both models). Prefix caching off, so repeated runs do not get cheaper."""
    tasks = next_line_tasks(n)
    kw = {**kw, "enable_prefix_caching": False}
    small, large = LLM(small_dir, **kw), LLM(large_dir, **kw)
    params = {name: sum(p.numel() for p in llm.engine.model.parameters()) for name, llm in
              (("small", small), ("large", large))}
    sp = SamplingParams(temperature=0, max_tokens=40, stop=["\n"])
    prompts = [p for p, _ in tasks]

    def score(outs, escalated: list[bool], models: str) -> dict:
        right = sum(o.text.rstrip() == line.rstrip() for o, (_, line) in zip(outs, tasks))
        start = sum(o.text[:12] == line[:12] for o, (_, line) in zip(outs, tasks))     # the line's first 12 chars
        flops = 0.0
        for o, esc in zip(outs, escalated):
            tokens = len(o.prompt_token_ids) + len(o.token_ids)
            flops += 2 * tokens * (params[models] if models != "cascade" else
                                   params["small"] + (params["large"] if esc else 0))
        return {"accuracy": right / len(tasks), "start_accuracy": start / len(tasks),
                "escalated": sum(escalated) / len(tasks),
                "gflops_per_request": flops / len(tasks) / 1e9}

    rows = []
    for name, llm in (("small only", small), ("large only", large)):
        t = time.perf_counter()
        outs = llm.generate(prompts, sp)
        rows.append({"config": name, "seconds": time.perf_counter() - t,
                     **score(outs, [name == "large only"] * len(outs), name.split()[0])})
    for th in thresholds:
        cascade = nanoserve.Cascade(small, large, th)
        t = time.perf_counter()
        answers = cascade.generate(prompts, sp)
        elapsed = time.perf_counter() - t
        rows.append({"config": f"cascade, threshold {th:g}", "threshold": th, "seconds": elapsed,
                     **score([a.output for a in answers], [a.escalated for a in answers], "cascade")})
        _progress("thresholds", thresholds.index(th) + 1, len(thresholds))
    small.close(), large.close()
    return {"tasks": len(tasks), "small": small_dir, "large": large_dir, "params": params, "rows": rows}


def bench_memory(llm: LLM, n: int, lo: int, hi: int) -> dict:
    """KV bytes per token, GQA's saving, and what paging saves against max-length reservation."""
    eng, mc = llm.engine, llm.engine.model_config
    per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * eng.dtype.itemsize
    mha = per_token * mc.num_attention_heads // mc.num_key_value_heads
    prompts, params = nano_vllm_workload(mc.vocab_size, n, lo, hi, seed=1)
    lengths = [len(p) + sp.max_tokens for p, sp in zip(prompts, params)]
    bs = eng.cfg.block_size
    max_len = eng.max_model_len
    # At the moment every request holds its full length: paged allocation reserves whole
    # blocks (waste < one block each), static reservation max_model_len per request.
    paged_slots = sum(-(-L // bs) * bs for L in lengths)
    used = sum(lengths)
    budget = eng.num_blocks * bs * per_token
    return {
        "kv_bytes_per_token": per_token, "kv_bytes_per_token_if_mha": mha,
        "gqa_saving": mc.num_attention_heads / mc.num_key_value_heads,
        "paged_waste_fraction": 1 - used / paged_slots,
        "max_len_reservation_waste_fraction": 1 - used / (max_len * n),
        "kv_budget_bytes": budget,
        "max_concurrent_seqs_paged": int(budget // (per_token * paged_slots / n)),
        "max_concurrent_seqs_reserved": int(budget // (per_token * max_len)),
        "mean_sequence_tokens": used / n, "max_model_len": max_len,
    }


def bench_prefix(llm: LLM, system_len: int, n: int) -> dict:
    """TTFT of requests that share a long system prompt, prefix caching on vs off."""
    vocab = llm.engine.model_config.vocab_size
    rng = np.random.default_rng(2)
    system = [1] + rng.integers(3, vocab, system_len - 1).tolist()
    out = {}
    for caching in (False, True):
        llm.engine.block_manager.caching = caching
        llm.engine.block_manager.hash_to_block.clear()
        prompts = [system + rng.integers(3, vocab, 20).tolist() for _ in range(n)]
        params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * n
        r = run_timed(llm, prompts, params, arrivals=[0.25 * i for i in range(n)])   # one after another
        out["on" if caching else "off"] = {"ttft_p50_s": _percentile(r["ttft"], 50),
                                           "ttft_mean_s": sum(r["ttft"]) / n}
    llm.engine.block_manager.caching = llm.engine.cfg.enable_prefix_caching
    out["system_prompt_tokens"] = system_len
    out["ttft_speedup"] = out["off"]["ttft_mean_s"] / out["on"]["ttft_mean_s"]
    return out


def bench_chunked(model: str, engine_kw: dict, long_len: int, chunk_budget: int) -> dict:
    """While 8 requests decode, a long prompt arrives: their inter-token latency, chunked
    prefill on vs off. Without chunking one step computes the whole prompt and every
    running request stalls for it; with chunking each step adds at most a budget's worth."""
    out = {}
    for chunked in (False, True):
        kw = dict(engine_kw, enable_chunked_prefill=chunked, enable_prefix_caching=False,
                  max_model_len=long_len + 64, max_num_batched_tokens=chunk_budget if chunked else long_len + 64)
        llm = LLM(model, **kw)
        vocab = llm.engine.model_config.vocab_size
        rng = np.random.default_rng(3)
        prompts = [[1] + rng.integers(3, vocab, 16).tolist() for _ in range(8)]
        prompts.append([1] + rng.integers(3, vocab, long_len - 1).tolist())
        params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)] * 8 + \
                 [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
        llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=4))              # warm-up
        r = run_timed(llm, prompts, params, arrivals=[0.0] * 8 + [0.3])
        itl = [b - a for i in range(8) for a, b in zip(r["token_times"][i], r["token_times"][i][1:])]
        out["chunked" if chunked else "unchunked"] = {
            "itl_max_s": max(itl), "itl_p99_s": _percentile(itl, 99), "itl_p50_s": _percentile(itl, 50),
            "long_prompt_ttft_s": r["ttft"][8]}
        del llm
        _free_memory()
    out.update(long_prompt_tokens=long_len, chunk_budget=chunk_budget)
    return out


def bench_spec(model: str, draft: str, engine_kw: dict, ks: tuple[int, ...], n_tokens: int,
               temperature: float = 0.0) -> dict:
    """Batch-1 speedup of speculative decoding against the measured per-token acceptance
    a and cost ratio c, beside the expected (1 - a^(k+1)) / ((1 - a)(k c + 1))."""
    base = LLM(model, **engine_kw)
    vocab = base.engine.model_config.vocab_size
    prompts = [[1] + np.random.default_rng(s).integers(3, vocab, 24).tolist() for s in range(4)]
    if base.tokenizer is not None:
        prompts = ["def main():\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self",
                   "    for i in range("]
    params = [SamplingParams(temperature=temperature, max_tokens=n_tokens, ignore_eos=True, seed=i)
              for i in range(len(prompts))]

    def timed(llm: LLM) -> float:
        llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=8))          # warm-up
        t = time.perf_counter()
        for pr, p in zip(prompts, params):                                           # batch 1
            llm.generate(pr, p)
        return time.perf_counter() - t

    base_s = timed(base)
    del base
    _free_memory()
    c = timed(LLM(draft, **engine_kw)) / base_s              # per-token cost, draft / target
    rows = []
    for k in ks:
        _free_memory()
        llm = LLM(model, draft_model=draft, num_speculative_tokens=k, **engine_kw)
        s = timed(llm)
        st = llm.stats()
        del llm
        a = st["spec_token_acceptance"]
        expected = (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1)) if a < 1 else (k + 1) / (k * c + 1)
        rows.append({"k": k, "token_acceptance": a, "acceptance_rate": st["spec_acceptance_rate"],
                     "tokens_per_step": st["spec_tokens_per_step"], "measured_speedup": base_s / s,
                     "expected_speedup": expected})
    return {"draft": str(draft), "temperature": temperature, "cost_ratio_c": c,
            "target_tok_s": len(prompts) * n_tokens / base_s, "rows": rows}


def bench_quant(model: str, engine_kw: dict, prompt_len: int = 256, new_tokens: int = 32,
                batches: tuple[int, ...] = ()) -> dict:
    """Decode and prefill speed of int8 (per channel) and int4 (groups of 128) weights,
    RTN, against bf16; with batches, also each batch's decode speed (output tokens per second
    of batch B, B / the mean time per output token, 128-token prompts), where quantized
    matmuls of B rows take the mma kernel (up to 16) or its tiled version (17-255).

    Weight-only quantization cuts the bytes a decode step must read; prefill is bound by
    arithmetic, which dequantized weights do not reduce (the dequantization adds to it).
    On a GPU the fused W4A16/W8A16 kernels read packed weights; on the CPU PyTorch's
    weight-only int8/int4 kernels do (kernels.pack_for_cpu). The speedup shows only when
    the weights do not fit in the CPU's caches: use a large model (random:tinyllama-1.1b)."""
    rows = []
    for label, bits, group in (("bf16", None, 0), ("int8", 8, 0), ("int4 g128", 4, 128)):
        llm = LLM(model, **dict(engine_kw, dtype="bfloat16"))
        eng = llm.engine
        if bits:
            quant.quantize_model(eng.model, torch.zeros(1, 1, dtype=torch.long), "rtn", bits, group)
            eng.model.to(eng.device)
            nanoserve.fuse_projections(eng.model)           # as the runner does for a quantized checkpoint
        vocab = eng.model_config.vocab_size
        prompt = [1] + np.random.default_rng(0).integers(3, vocab, prompt_len - 1).tolist()
        llm.generate(prompt[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))[0]
        rows.append({"weights": label, "prefill_tok_s": prompt_len / out.metrics["time_to_first_token"],
                     "decode_tok_s": 1 / out.metrics["time_per_output_token"], "batch_tok_s": {}})
        if bits and eng.device.type == "cuda" and kernels.NORM_FOLD_MAX_ROWS:
            # The same decode with add + RMSNorm launched apart from the projections (the fold
            # off; the decode graphs captured again): what the fold saves a step.
            fold, kernels.NORM_FOLD_MAX_ROWS = kernels.NORM_FOLD_MAX_ROWS, 0
            try:
                if eng.runner.graphs is not None:
                    eng.runner.graphs.graphs.clear()
                llm.generate(prompt[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                apart = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))[0]
                rows[-1]["decode_tok_s_unfolded"] = 1 / apart.metrics["time_per_output_token"]
            finally:
                kernels.NORM_FOLD_MAX_ROWS = fold
                if eng.runner.graphs is not None:
                    eng.runner.graphs.graphs.clear()
        for B in batches:
            rng = np.random.default_rng(B)
            prompts = [[1] + rng.integers(3, vocab, 127).tolist() for _ in range(B)]
            # The same prompts first: the batch's graphs are captured, and the timed run finds
            # the prompts' full blocks cached, so its prefill is one step and every request
            # decodes from the second step on (64 x 128 fresh tokens would be 4 steps of chunks).
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
            rows[-1]["batch_tok_s"][B] = B / float(np.mean([o.metrics["time_per_output_token"] for o in outs]))
        del llm, eng
        _free_memory()
    for r in rows:
        r["decode_speedup"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
        r["prefill_speedup"] = r["prefill_tok_s"] / rows[0]["prefill_tok_s"]
        r["batch_speedup"] = {B: v / rows[0]["batch_tok_s"][B] for B, v in r["batch_tok_s"].items()}
    return {"rows": rows, "prompt_tokens": prompt_len}


def bench_prefill(llm: LLM, prompt_len: int = 4096) -> dict:
    """Time to first token of one long prompt (fresh: no cached prefix) against the same
    weights run over the whole prompt by PyTorch's SDPA without a cache (the model's
    forward_dense, less the LM head): what the paged prefill path (chunks, paged attention,
    the cache writes) costs beside the plainest fast prefill. The baseline is the training
    path: q/k/v and gate/up as separate matmuls, RoPE by the twin, K/V repeated for GQA, so it
    is a little slower than the same layers could be and the ratio a little flattering (most
    on a small model; at 7B the matmuls dominate). The prompt is cut to the engine's
    max_model_len less one."""
    eng = llm.engine
    T = min(prompt_len, eng.max_model_len - 1)
    model, dev, vocab = eng.model, eng.device, eng.model_config.vocab_size
    rng = np.random.default_rng(0)
    warm, prompt = ([1] + rng.integers(3, vocab, T - 1).tolist() for _ in range(2))
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(warm, one)                                         # graphs, kernels, allocator
    ttft = llm.generate(prompt, one)[0].metrics["time_to_first_token"]
    ids = torch.tensor([prompt], device=dev)

    @torch.no_grad()
    def dense() -> None:
        rope = model.dense_rope(T, dev)
        x = model.model.embed_tokens(ids)                           # (1, T, D)
        for layer in model.model.layers:
            x = layer.forward_dense(x, rope)
        model.model.norm(x)
    dense()
    _sync(dev)
    t = time.perf_counter()
    dense()
    _sync(dev)
    sdpa = time.perf_counter() - t
    return {"prompt_tokens": T, "ttft_s": ttft, "sdpa_s": sdpa, "ratio": ttft / sdpa,
            "chunk_tokens": eng.cfg.max_num_batched_tokens}


def bench_sla(llm: LLM, levels: tuple[int, ...], gpu_hour_usd: float, api_usd_per_mtok: float,
              lo: int, hi: int) -> dict:
    """Per concurrency level: TTFT, per-user decode speed, the SLA verdict, and economics."""
    rows = []
    for c in levels:
        prompts, params = nano_vllm_workload(llm.engine.model_config.vocab_size, c, lo, hi, seed=c)
        r = run_timed(llm, prompts, params)
        per_user = [len(ts) / (ts[-1] - ts[0] + 1e-9) if len(ts) > 1 else float("nan")
                    for ts in r["token_times"].values()]
        tps = r["output_tokens"] / r["elapsed"]
        rows.append({"concurrency": c, "ttft_p50_s": _percentile(r["ttft"], 50),
                     "ttft_p99_s": _percentile(r["ttft"], 99), "per_user_tok_s_p50": _percentile(per_user, 50),
                     "throughput_tok_s": tps,
                     "sla_ok": _percentile(r["ttft"], 99) < 0.5 and _percentile(per_user, 10) >= 30,
                     "usd_per_mtok": gpu_hour_usd / (tps * 3600) * 1e6})
    best = max(rows, key=lambda r: r["throughput_tok_s"])
    daily_cost = gpu_hour_usd * 24
    return {"rows": rows, "gpu_hour_usd": gpu_hour_usd, "api_usd_per_mtok": api_usd_per_mtok,
            "daily_cost_usd": daily_cost,
            "break_even_tokens_per_day": daily_cost / api_usd_per_mtok * 1e6,
            "capacity_tokens_per_day": best["throughput_tok_s"] * 86400}


@dataclass
class ClientLog:
    """What the streaming clients of one load level saw."""
    ttft: list[float]
    itl: list[float]
    errors: list
    tokens: int = 0


def _streaming_client(port: int, body: dict, log: ClientLog) -> None:
    """One streamed completion: time to the first chunk, gaps between chunks, tokens."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True,
                                                                 stream_options={"include_usage": True})))
        resp = conn.getresponse()
        if resp.status != 200:
            log.errors.append(resp.status)
            return
        last = None
        for line in resp:
            if line.startswith(b"data: {"):
                now = time.perf_counter()
                (log.ttft if last is None else log.itl).append(now - (t0 if last is None else last))
                last = now
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    log.tokens += chunk["usage"]["completion_tokens"]
        conn.close()
    except OSError as e:
        log.errors.append(repr(e))


def bench_server(llm: LLM, levels: tuple[int, ...], requests_per_client: int, max_tokens: int) -> dict:
    """N concurrent streaming clients against the HTTP server on a loopback port."""
    server = http_server.make_server(llm, "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prompt = "def main():\n" if llm.tokenizer else [1, 10, 20, 30]
    rows = []
    try:
        for n in levels:
            log = ClientLog([], [], [])

            def client(c: int) -> None:
                for r in range(requests_per_client):
                    _streaming_client(port, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                                             "seed": c * 1000 + r, "ignore_eos": True}, log)

            t = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            elapsed = time.perf_counter() - t
            rows.append({"clients": n, "requests": n * requests_per_client, "errors": len(log.errors),
                         "ttft_p50_s": _percentile(log.ttft, 50), "ttft_p99_s": _percentile(log.ttft, 99),
                         "itl_p50_s": _percentile(log.itl, 50), "itl_p99_s": _percentile(log.itl, 99),
                         "throughput_tok_s": log.tokens / elapsed})
            _progress("server levels", len(rows), len(levels))
    finally:
        server.shutdown()
        server.server_close()
    return {"max_tokens": max_tokens, "rows": rows}


# ============================================================================ suites
# One entry per suite: a function that measures (through the Bench context) and returns
# (results for the JSON, table title, table rows). Suites marked own_engines build their
# own engines: on a GPU each engine sizes its KV pool from free memory, so the shared
# engine is let go before they run.

@dataclass
class Bench:
    """What the suites share: the command line, LLM keyword arguments, the workload size
    and one engine, built when first needed.

    threads: torch's threads when the benchmark started. An engine sets torch's threads for
    the whole process (one for a tiny model), and an engine left to torch's choice keeps what
    an earlier one set; so the shared engine, and each suite that builds its own, starts from
    these, as in a run of that suite alone."""
    args: argparse.Namespace
    kw: dict
    device: str
    n: int
    lo: int
    hi: int
    small: bool
    threads: int
    _llm: LLM | None = None

    def llm(self) -> LLM:
        if self._llm is None:
            torch.set_num_threads(self.threads)
            self._llm = LLM(self.args.model, **self.kw)
        return self._llm

    def release(self) -> None:
        self._llm = None
        _free_memory()


Rows = list[tuple[str, str]]


def suite_latency(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_latency(b.llm())
    graphs = f" with CUDA graphs, {r['decode_tok_s_eager']:.1f} tok/s eager" if r["decode_tok_s_eager"] else ""
    eager = f", {r['ttft_s_eager'] * 1e3:.1f} ms without graphs" if r["ttft_s_eager"] else ""
    return r, "Latency, batch 1", [
        (f"time to first token ({r['prompt_tokens']}-token prompt)", f"{r['ttft_s'] * 1e3:.1f} ms{eager}"),
        ("prefill", f"{r['prefill_tok_s']:.0f} tok/s"),
        ("decode", f"{r['decode_tok_s']:.1f} tok/s{graphs}"),
        ("weights read per token", f"{r['weight_bytes'] / 1e6:.1f} MB"),
        ("achieved weight bandwidth", f"{r['achieved_weight_GBps']:.2f} GB/s = "
                                      f"{100 * r['fraction_of_copy_bandwidth']:.1f}% of copy bandwidth "
                                      f"({r['copy_bandwidth_GBps']:.1f} GB/s)"),
        ("matmul peak measured", f"{r['matmul_TFLOPs'] * 1e3:.1f} GFLOP/s; ridge point "
                                 f"{r['ridge_flops_per_byte']:.1f} FLOP/byte"),
        ("decode arithmetic intensity", f"{r['decode_flops_per_byte']:.2f} FLOP/byte: {r['decode_verdict']}"),
        ("prefill arithmetic intensity", f"{r['prefill_flops_per_byte']:.0f} FLOP/byte: {r['prefill_verdict']}")]


def suite_profile(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_profile(b.llm(), (1, 64) if b.device == "cuda" else (1, 16))
    busy = "GPU kernels" if b.device == "cuda" else "operators (one thread)"
    rows = []
    for row in r["rows"]:
        kinds = ", ".join(f"{k} {100 * us / 1e3 / row['busy_ms_per_step']:.0f}%"
                          for k, us in sorted(row["kinds_us"].items(), key=lambda kv: -kv[1]))
        rows.append((f"batch {row['batch']}, {row['mode']}: step time", f"{row['wall_ms_per_step']:.2f} ms wall, "
                     f"{row['busy_ms_per_step']:.2f} ms in {busy} ({kinds})"))
        rows += [(f"batch {row['batch']}, {row['mode']}: {t['name'][:80]}",
                  f"{t['us_per_step']:.1f} us per step, {t['calls_per_step']:.0f} calls ({t['kind']})")
                 for t in row["top"][:8]]
    return r, f"Profile of a decode step (torch.profiler, {r['steps']} steps)", rows


def suite_host(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_host()
    rows = []
    for key, who in (("streaming", "every request streaming"), ("final_only", "no request streaming"),
                     ("final_only_async", "no request streaming, async scheduling's bookkeeping"),
                     ("final_only_penalized", "no request streaming, frequency_penalty 0.1")):
        t = r[key]
        rows += [(f"step, {who}", f"{t['ms_per_step']:.2f} ms (mean of {r['steps']} steps, after "
                                  f"{r['prefill_steps']} prefill and {r['warmup_steps']} warm-up steps)"),
                 ("of which", f"schedule {t['schedule_ms']:.2f} ms, runner inputs {t['model_ms']:.2f} ms, "
                              f"logits stub {t['stub_ms']:.2f} ms, sampling {t['sample_ms'] - t['stub_ms']:.2f} ms "
                              f"(tensor math here, kernels on a GPU), outputs {t['output_ms']:.2f} ms")]
    rows += [(f"profile, final-only: {p['function']}", f"{100 * p['share']:.0f}% of the host's time "
              f"({p['calls_per_step']:.0f} calls per step)") for p in r["profile"]]
    return r, f"Host time per decode step, model stubbed out: {r['batch']} running seeded requests", rows


def suite_throughput(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_throughput(b.llm(), b.n, b.lo, b.hi, static_batch=min(64, b.n))
    b.release()                                          # room for the transformers model
    hf = r["transformers_static"] = None if b.args.no_transformers else bench_hf_static(
        b.args.model, b.device, b.args.dtype, b.n, b.lo, b.hi, min(64, b.n))
    return r, f"Throughput: {b.n} requests, prompt and output lengths uniform in [{b.lo}, {b.hi}]", [
        ("continuous batching", f"{r['continuous_tok_s']:.0f} output tok/s ({r['continuous_s']:.1f} s)"),
        (f"static batching (batch {r['static_batch']}, padded)",
         f"{r['static_tok_s']:.0f} output tok/s ({r['static_s']:.1f} s)"),
        ("continuous / static", f"{r['speedup']:.2f}x"),
        ("continuous batching again, warm: synchronous steps against async scheduling",
         "not run (the engine schedules synchronously: CPU, speculation or tensor parallelism)"
         if r["synchronous_tok_s"] is None else
         f"{r['synchronous_tok_s']:.0f} against {r['async_warm_tok_s']:.0f} output tok/s "
         f"({r['async_speedup']:.2f}x; the prompts' ids shifted, nothing in the prefix cache)"),
        ("Hugging Face transformers generate (static batch, padded)",
         "not run (--no-transformers, or not installed)" if hf is None else f"{hf['tok_s']:.0f} output tok/s ({hf['seconds']:.1f} s, "
         f"transformers {hf['transformers']})")]


def suite_memory(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_memory(b.llm(), b.n, b.lo, b.hi)
    return r, "KV cache memory", [
        ("KV bytes per token", f"{r['kv_bytes_per_token']:,} (MHA would need "
                               f"{r['kv_bytes_per_token_if_mha']:,}: GQA saves {r['gqa_saving']:.0f}x)"),
        ("waste, paged blocks", f"{100 * r['paged_waste_fraction']:.1f}%"),
        ("waste, max-length reservation", f"{100 * r['max_len_reservation_waste_fraction']:.1f}%"),
        ("concurrent sequences in the same KV budget",
         f"paged {r['max_concurrent_seqs_paged']:,} vs reserved {r['max_concurrent_seqs_reserved']:,}")]


def suite_prefix(b: Bench) -> tuple[dict, str, Rows]:
    llm = b.llm()
    r = bench_prefix(llm, system_len=min(1024, llm.engine.max_model_len - 64), n=8)
    return r, f"Prefix caching: 8 requests sharing a {r['system_prompt_tokens']}-token system prompt", [
        ("TTFT, caching off", f"{r['off']['ttft_mean_s'] * 1e3:.1f} ms mean"),
        ("TTFT, caching on", f"{r['on']['ttft_mean_s'] * 1e3:.1f} ms mean"),
        ("speedup", f"{r['ttft_speedup']:.1f}x")]


def suite_chunked(b: Bench) -> tuple[dict, str, Rows]:
    model = b.args.model if str(b.args.model).startswith("random:") else "random:nanocoder-5m-8k"
    r = bench_chunked(model, b.kw, long_len=4000, chunk_budget=512)
    return r, f"Chunked prefill: a {r['long_prompt_tokens']}-token prompt arrives while 8 requests decode ({model})", [
        (f"{name}: running requests' inter-token latency",
         f"max {v['itl_max_s'] * 1e3:.0f} ms, p99 {v['itl_p99_s'] * 1e3:.0f} ms, "
         f"p50 {v['itl_p50_s'] * 1e3:.1f} ms; long prompt TTFT {v['long_prompt_ttft_s']:.2f} s")
        for name, v in (("without chunking", r["unchunked"]), (f"chunked (budget {r['chunk_budget']})", r["chunked"]))]


def suite_spec(b: Bench) -> tuple[dict, str, Rows]:
    args = b.args
    bundled = Path(args.model).resolve() == nanoserve.DEFAULT_MODEL.resolve()
    candidates = (nanoserve.DEFAULT_DRAFT, ROOT / "models" / "nanocoder-1m-nokd")
    drafts = [args.draft] if args.draft else [str(d) for d in candidates if bundled and d.is_dir()]
    if not drafts:
        return {}, "Speculative decoding", [("skipped", "pass --draft DIR")]
    r, rows = {}, []
    for draft in drafts:
        for temperature in (0.0, 1.0):
            res = r[f"{Path(draft).name}@T={temperature:g}"] = bench_spec(
                args.model, draft, b.kw, (2, 4, 8), n_tokens=96, temperature=temperature)
            rows += [(f"{Path(draft).name}, T = {temperature:g}, k = {row['k']}",
                      f"per-token acceptance a = {row['token_acceptance']:.2f} (accepted/proposed "
                      f"{row['acceptance_rate']:.2f}, {row['tokens_per_step']:.2f} tokens per target step); "
                      f"speedup measured {row['measured_speedup']:.2f}x, expected {row['expected_speedup']:.2f}x "
                      f"(c = {res['cost_ratio_c']:.2f}, target alone {res['target_tok_s']:.0f} tok/s)")
                     for row in res["rows"]]
    return r, "Speculative decoding, batch 1", rows


def suite_quant(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_quant(b.args.model, b.kw, batches=(16, 64) if b.device.startswith("cuda") else ())
    return r, "Weight-only quantization (RTN; int8 per channel, int4 groups of 128) against bf16", [
        (row["weights"], f"batch-1 decode {row['decode_tok_s']:.1f} tok/s ({row['decode_speedup']:.2f}x"
                         + (f"; {row['decode_tok_s_unfolded']:.1f} with add + RMSNorm launched apart"
                            if "decode_tok_s_unfolded" in row else "") + "), "
                         f"prefill {row['prefill_tok_s']:.0f} tok/s ({row['prefill_speedup']:.2f}x)"
                         + "".join(f"; batch {B} decode {v:.0f} tok/s ({row['batch_speedup'][B]:.2f}x)"
                                   for B, v in row["batch_tok_s"].items()))
        for row in r["rows"]]


def suite_prefill(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_prefill(b.llm())
    return r, f"Prefill of one {r['prompt_tokens']}-token prompt: the engine against SDPA over the same weights", [
        ("time to first token (engine: chunks of "
         f"{r['chunk_tokens']} tokens, paged attention, the cache written)", f"{r['ttft_s'] * 1e3:.1f} ms"),
        ("the same weights through SDPA, no cache (forward_dense: projections unfused)", f"{r['sdpa_s'] * 1e3:.1f} ms"),
        ("engine / SDPA", f"{r['ratio']:.2f}x (issue 34's goal at 4k tokens, Llama-2-7B bf16: <= 1.2x)")]


def suite_sla(b: Bench) -> tuple[dict, str, Rows]:
    args = b.args
    r = bench_sla(b.llm(), (1, 4, 16, 64) if b.small else (1, 16, 64, 256), args.gpu_hour_usd,
                  args.api_usd_per_mtok, b.lo, b.hi)
    return r, f"SLA (TTFT p99 < 500 ms, >= 30 tok/s per user) and cost at ${args.gpu_hour_usd}/hour", [
        (f"concurrency {row['concurrency']}",
         f"TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms / p99 {row['ttft_p99_s'] * 1e3:.0f} ms, "
         f"{row['per_user_tok_s_p50']:.0f} tok/s per user, {row['throughput_tok_s']:.0f} tok/s total, "
         f"SLA {'met' if row['sla_ok'] else 'missed'}, ${row['usd_per_mtok']:.2f} per 1M tokens")
        for row in r["rows"]] + [
        ("self-hosting beats the API above", f"{r['break_even_tokens_per_day'] / 1e6:.0f}M tokens/day "
         f"(API ${r['api_usd_per_mtok']}/1M; this machine serves at most "
         f"{r['capacity_tokens_per_day'] / 1e6:.0f}M/day)")]


def suite_overhead(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_overhead(b.llm())
    return r, "Decode speed and scheduler overhead per step", [
        (f"batch {row['batch']}", f"{row['decode_tok_s']:.0f} tok/s; per step: schedule "
         f"{row['schedule_ms_per_step']:.2f} ms, model {row['model_ms_per_step']:.2f} ms (incl. batch "
         f"preparation), sampling {row['sample_ms_per_step']:.2f} ms, outputs {row['output_ms_per_step']:.2f} ms")
        for row in r["rows"]]


def suite_server(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_server(b.llm(), (1, 8, 32, 64), requests_per_client=4, max_tokens=64)
    return r, f"Server load: N streaming clients, 4 requests each, {r['max_tokens']} tokens per request", [
        (f"{row['clients']} clients", f"TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms / p99 "
         f"{row['ttft_p99_s'] * 1e3:.0f} ms, inter-token p50 {row['itl_p50_s'] * 1e3:.1f} ms / p99 "
         f"{row['itl_p99_s'] * 1e3:.1f} ms, {row['throughput_tok_s']:.0f} tok/s, {row['errors']} errors")
        for row in r["rows"]]


def suite_transformers(b: Bench) -> tuple[dict, str, Rows]:
    if b.args.no_transformers:
        return {}, "nanoserve beside transformers", [("skipped", "--no-transformers")]
    llm_len = nanoserve.ModelConfig.from_dir(b.args.model).max_position_embeddings if Path(b.args.model).is_dir() else 0
    r = bench_versus_transformers(b.args.model, b.kw, rounds=b.args.rounds or 5, prefix_len=min(512, llm_len - 64))
    if r is None:
        return {}, "nanoserve beside transformers", [("skipped", "needs transformers and a checkpoint directory")]
    rows = [(f"{name} ({v['output_tokens_per_round']:.0f} output tokens per round)",
             f"nanoserve {v['nano_tok_s_median']:.0f} tok/s, transformers {v['hf_tok_s_median']:.0f} tok/s: "
             f"{v['speedup_median']:.2f}x (rounds {v['speedup_range'][0]:.2f}-{v['speedup_range'][1]:.2f}x); "
             f"identical outputs {v['identical_outputs']}/{v['outputs']}")
            for name, v in r.items() if isinstance(v, dict)]
    return r, (f"nanoserve beside transformers {r['transformers']} `generate` (greedy, {b.args.dtype}, "
               f"{r['threads']} thread, {r['rounds']} alternating rounds, medians)"), rows


def suite_tp(b: Bench) -> tuple[dict, str, Rows]:
    model = b.args.model if str(b.args.model).startswith("random:") else "random:tinyllama-1.1b-4l"
    units = torch.cuda.device_count() if b.device == "cuda" else os.cpu_count() or 1
    # On the CPU: one rank on every core, one rank on one core, then N ranks of cores / N.
    configs = ((1, None),) + (((1, 1),) if b.device == "cpu" else ()) + tuple((n, None) for n in (2, 4) if n <= units)
    r = bench_tp(model, b.kw, configs, (1, 8), new_tokens=16 if b.small else 64)
    return r, f"Tensor parallelism: decode with the model sharded over N ranks ({model}, {b.device})", [
        (f"{row['ranks']} rank(s) x {row['threads_per_rank']} thread(s), batch {row['batch']}",
         f"{row['step_ms']:.1f} ms per step ({row['decode_tok_s']:.1f} tok/s, {row['speedup']:.2f}x); "
         f"all-reduce {100 * row['all_reduce_share']:.1f}% of the step")
        for row in r["rows"]]


def plot_cascade(r: dict, path: Path) -> bool:
    """Accuracy against FLOPs per request, as a PNG; False when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    cascade = [row for row in r["rows"] if "threshold" in row]
    ax.plot([row["gflops_per_request"] for row in cascade], [100 * row["start_accuracy"] for row in cascade],
            "o-", label="cascade (threshold 0.3 ... 0.9)")
    for row in cascade:
        ax.annotate(f"{row['threshold']:g}", (row["gflops_per_request"], 100 * row["start_accuracy"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)
    for row, marker in zip(r["rows"][:2], ("s", "^")):
        ax.plot(row["gflops_per_request"], 100 * row["start_accuracy"], marker, markersize=9, label=row["config"])
    ax.set_xlabel("GFLOP per request")
    ax.set_ylabel("next line, first 12 characters right (%)")
    ax.set_title(f"Model cascade on {r['tasks']} held-out lines")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def suite_cascade(b: Bench) -> tuple[dict, str, Rows]:
    r = bench_cascade(str(nanoserve.DEFAULT_DRAFT), str(nanoserve.DEFAULT_MODEL), b.kw, b.args.requests or 200,
                      (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    png = Path(b.args.out).with_suffix(".cascade.png") if b.args.out else Path("cascade.png")
    r["plot"] = str(png) if plot_cascade(r, png) else None
    print(f"[bench] cascade plot: {r['plot'] or 'not written (pip install matplotlib)'}", file=sys.stderr)
    title = (f"Model cascade: next line of held-out Python, {r['tasks']} tasks, greedy (small "
             f"{r['params']['small'] / 1e6:.2f}M, large {r['params']['large'] / 1e6:.2f}M parameters)")
    return r, title, [(row["config"], f"exact line {100 * row['accuracy']:.1f}%, first 12 characters "
                                      f"{100 * row['start_accuracy']:.1f}%, escalated "
                                      f"{100 * row['escalated']:.0f}%, {row['gflops_per_request']:.3f} GFLOP per "
                                      f"request, {row['seconds']:.1f} s") for row in r["rows"]]


def suite_sparse(b: Bench) -> tuple[dict, str, Rows]:
    model = b.args.model if not str(b.args.model).startswith("random:") else str(nanoserve.DEFAULT_MODEL)
    quality = bench_sparse_quality(model)
    speed = bench_sparse_speed(torch.device(b.device))
    rows = [(row["weights"], f"held-out perplexity {row['ppl']:.3f}, KL(dense || it) {row['kl']:.4f}")
            for row in quality["rows"]]
    if speed is None:
        rows.append(("speed of 2:4 against dense matmuls", "needs a GPU with sparse tensor cores (Ampere or "
                                                            "newer, --device cuda): not measured here"))
    else:
        rows += [(f"{row['shape'][0]} x {row['shape'][1]}, {row['rows']} rows", sparse_speed_text(row))
                 for row in speed["rows"]]
    r = {"model": model, "quality": quality, "speed": speed}
    where = "the CPU" if speed is None else f"the CPU (quality) and {speed['device']} {speed['dtype']} (speed)"
    return r, f"2:4 structured sparsity: quality of {Path(model).name} and matmul speed, on {where}", rows


@dataclass
class Suite:
    run: Callable[[Bench], tuple[dict, str, Rows]]
    own_engines: bool = False            # builds its own engines (the shared one is let go first)


SUITES: dict[str, Suite] = {
    "latency": Suite(suite_latency),
    "overhead": Suite(suite_overhead),
    "profile": Suite(suite_profile),
    "host": Suite(suite_host, own_engines=True),
    "throughput": Suite(suite_throughput),
    "memory": Suite(suite_memory),
    "prefix": Suite(suite_prefix),
    "chunked": Suite(suite_chunked, own_engines=True),
    "spec": Suite(suite_spec, own_engines=True),
    "quant": Suite(suite_quant, own_engines=True),
    "prefill": Suite(suite_prefill),
    "sla": Suite(suite_sla),
    "server": Suite(suite_server),
    "transformers": Suite(suite_transformers, own_engines=True),
    "tp": Suite(suite_tp, own_engines=True),
    "cascade": Suite(suite_cascade, own_engines=True),
    "sparse": Suite(suite_sparse, own_engines=True),
}


def table(title: str, rows: Rows) -> str:
    return "\n".join([f"\n### {title}\n", "| figure | value |", "| --- | --- |"] +
                     [f"| {k} | {v} |" for k, v in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="nanoserve benchmarks: one Markdown table per suite")
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"default: all of {' '.join(SUITES)}")
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    p.add_argument("--requests", type=int, default=None, help="requests in the throughput workload")
    p.add_argument("--lengths", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="prompt and output lengths, uniform in [LO, HI] (default: 32 256 on CPU, 100 1024)")
    p.add_argument("--no-transformers", action="store_true",
                   help="skip the Hugging Face transformers baseline of the throughput suite")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of the transformers suite (5)")
    p.add_argument("--gpu-hour-usd", type=float, default=8.0)
    p.add_argument("--api-usd-per-mtok", type=float, default=0.5, help="API price per 1M output tokens")
    nanoserve.add_engine_args(p)
    return p


def run(args: argparse.Namespace) -> dict:
    suites = args.suites or list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    kw = nanoserve.llm_kwargs_from_args(args)
    for key in ("draft_model", "speculative_method", "num_speculative_tokens"):   # the spec suite sets these
        kw.pop(key)
    dev = kw["device"] = kw["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = str(args.model).removeprefix("random:") if str(args.model).startswith("random:") else None
    if (preset in nanoserve.PRESETS and nanoserve.PRESETS[preset]["vocab_size"] == 32000 and not kw["tokenizer"]
            and SHARED_LLAMA2_TOKENIZER.is_file()):
        kw["tokenizer"] = str(SHARED_LLAMA2_TOKENIZER)          # a real vocabulary for random weights
    machine = torch.cuda.get_device_name() if dev == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    small = dev == "cpu"
    lo, hi = args.lengths or ((32, 256) if small else (100, 1024))
    b = Bench(args, kw, dev, args.requests or (48 if small else 256), lo, hi, small, torch.get_num_threads())
    results: dict = {"machine": machine, "torch": torch.__version__, "model": args.model,
                     "dtype": args.dtype, "random_weights": preset is not None}
    print(f"# nanoserve benchmarks: {args.model} ({'random weights' if preset else 'trained'}), "
          f"{args.dtype}, {machine}")
    for name in suites:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        suite = SUITES[name]
        if suite.own_engines:
            b.release()
            torch.set_num_threads(b.threads)
        results[name], title, rows = suite.run(b)
        print(table(title, rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
        print(f"\n[bench] wrote {args.out}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
