"""CUDA kernels against their PyTorch twins, and the engine on CUDA against the CPU path.

Skipped without a GPU (CI has none); run them on a GPU machine."""

import pytest
import torch

import kernels
import nanoserve
import quant
from nanoserve import LLM, SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_every_kernel_matches_its_reference_twin():
    for name, err, _ in kernels.self_check():
        assert err < 2e-2, name


@cuda
def test_engine_on_cuda_matches_cpu(model_dirs):
    for model_dir in model_dirs:
        prompts = [[1, 5, 9, 14], [1] + list(range(20, 90))]
        p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
        cpu = LLM(model_dir, device="cpu").generate(prompts, p)
        gpu = LLM(model_dir, device="cuda", dtype="float32").generate(prompts, p)
        assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]     # fp32 greedy: equal
        bf16 = LLM(model_dir, device="cuda", dtype="bfloat16").generate(
            prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        ref = LLM(model_dir, device="cpu").generate(prompts, SamplingParams(temperature=0, max_tokens=1,
                                                                            prompt_logprobs=0))
        for a, b in zip(bf16, ref):
            err = max(abs(next(iter(x.values())) - next(iter(y.values())))
                      for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))
            assert err < 0.25                          # bf16 has 8 mantissa bits


@cuda
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 0)])
def test_quantized_model_on_cuda_matches_the_cpu_path(model_dirs, tmp_path, bits, group):
    """A quantized checkpoint in bf16 on the GPU against the same checkpoint on the CPU in
    fp32. Steps of at most 16 tokens, so every projection takes a 1-16-row kernel: int4 in
    groups of 128 and int8 per channel the mma kernel, int4 in groups of 32 the GEMV."""
    for model_dir in model_dirs:
        model = LLM(model_dir, device="cpu").engine.model
        calib = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        cfg = quant.quantize_model(model, calib, "rtn", bits, group)
        out = tmp_path / model_dir.name
        quant.save_quantized(model, model_dir, out, cfg)
        prompts = [[1, 5, 9, 14], [1] + list(range(20, 31))]           # 4 + 12 tokens: one step of 16
        p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        gpu = LLM(out, device="cuda", dtype="bfloat16", max_num_batched_tokens=16).generate(prompts, p)
        cpu = LLM(out, device="cpu").generate(prompts, p)
        for a, b in zip(gpu, cpu):
            err = max(abs(next(iter(x.values())) - next(iter(y.values())))
                      for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))
            assert err < 0.25                          # bf16 has 8 mantissa bits


@cuda
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_launches_steps_without_waiting_for_the_gpu(model_dirs, enforce_eager):
    """With async scheduling the host schedules and launches a step without waiting for the
    device: torch's sync debug mode raises at any call that would wait, everywhere but where
    the previous step's ids are turned into outputs (LLMEngine._outputs). Its tokens equal
    synchronous steps' (fp32; greedy and seeded rows, one penalized: its in-flight token is
    counted on the device; the last, unseeded, draws from the engine's generator, whose draws
    depend on the batches)."""
    prompts = [[1] + list(range(20 + i, 60 + 3 * i)) for i in range(7)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, top_p=0.9 if i % 3 else 1.0,
                             seed=None if i == 6 else i, max_tokens=24, ignore_eos=True,
                             frequency_penalty=0.5 if i == 2 else 0.0) for i in range(7)]
    # No prefix caching: the timed run would prefill only the prompts' last blocks (other
    # GEMM shapes than the reference's whole prompts, other rounding).
    kw = dict(device="cuda", dtype="float32", enforce_eager=enforce_eager, enable_prefix_caching=False)
    ref = LLM(model_dirs[0], async_scheduling=False, **kw).generate(prompts, params)
    llm = LLM(model_dirs[0], async_scheduling=True, **kw)
    eng = llm.engine
    llm.generate(prompts, params)                      # warm-up: graphs captured, kernels loaded
    outputs = eng._outputs

    def outputs_may_wait(sampled):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return outputs(sampled)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    eng._outputs = outputs_may_wait
    steps = eng.num_overlapped_steps
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = llm.generate(prompts, params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [o.token_ids for o in got[:6]] == [o.token_ids for o in ref[:6]]
    assert eng.num_overlapped_steps - steps >= 20


@cuda
def test_piecewise_graph_prefill_equals_eager_prefill(model_dirs):
    """Prefills and mixed steps replayed as piecewise CUDA graphs (attention eager between
    them) give the eager path's greedy tokens: prompts alone in every bucket (one chunked),
    then together in mixed steps. A prompt-logprob chunk's rows are read after the next step
    was launched (async scheduling). Every bucket is captured at the first step that needs
    one, and never again."""
    for model_dir in model_dirs:
        # Ids every model's vocabulary holds (the tiny random model has 300 tokens).
        prompts = [[1] + [(7 * i) % 250 + 3 for i in range(n)] for n in (2, 10, 25, 50, 200)]  # buckets 3 ... 128
        p = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, prompt_logprobs=1 if m == 9 else None)
             for m in (30, 12, 16, 9, 20)]
        kw = dict(device="cuda", dtype="float32", max_num_batched_tokens=128, max_model_len=400,
                  enable_prefix_caching=False)
        eager, llm = LLM(model_dir, enforce_eager=True, **kw), LLM(model_dir, **kw)
        for batch in ([0], [1], [2], [3], [4], [0, 1, 2, 3, 4]):
            want = eager.generate([prompts[i] for i in batch], [p[i] for i in batch])
            got = llm.generate([prompts[i] for i in batch], [p[i] for i in batch])
            assert [o.token_ids for o in got] == [o.token_ids for o in want], (model_dir, batch)
            for w, g in zip(want, got):
                if w.prompt_logprobs:
                    lp = [next(iter(d.values())) for d in g.prompt_logprobs[1:]]
                    ref = [next(iter(d.values())) for d in w.prompt_logprobs[1:]]
                    assert max(abs(a - b) for a, b in zip(lp, ref)) < 1e-3
        pieces = llm.engine.runner.piecewise
        assert pieces.capture and set(pieces.graphs) == set(pieces.buckets)
        assert pieces.buckets == sorted({3, 16, 32, 64, 128, kernels.NORM_FOLD_MAX_ROWS} - {0})
        assert all(len(g) == len(llm.engine.model.model.layers) + 1 for g, _ in pieces.graphs.values())
        captured, steps = dict(pieces.graphs), pieces.steps
        llm.generate(prompts, p)
        assert pieces.graphs == captured and pieces.steps > steps
        assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@cuda
def test_cuda_graph_decode_equals_eager_decode(model_dirs):
    for model_dir in model_dirs:
        prompts = [[1] + list(range(5, 5 + n)) for n in (3, 40, 17, 90, 1)]   # batches 5..1: buckets 8, 4, 2, 1
        p = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (30, 8, 20, 3, 12)]
        eager = LLM(model_dir, device="cuda", dtype="float32", enforce_eager=True).generate(prompts, p)
        llm = LLM(model_dir, device="cuda", dtype="float32")
        graphed = llm.generate(prompts, p)
        assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
        graphs = llm.engine.runner.graphs
        assert graphs.capture and len(graphs.graphs) >= 3 and graphs.steps > 0
        assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@cuda
def test_decode_steps_apply_rope_inside_the_attention_kernel(model_dirs):
    """A decode step's RoPE and cache write run inside the decode attention kernel
    (paged_decode_rope): an eager decode step launches no rope_cache_kernel, a prefill step
    still does; the tokens equal the CPU path's (fp32 greedy)."""
    from torch.profiler import ProfilerActivity, profile
    model_dir = model_dirs[0]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model_dir, device="cuda", dtype="float32", enforce_eager=True, async_scheduling=False)
    eng = llm.engine
    eng.add_request([1, 5, 9, 14], p)
    with profile(activities=[ProfilerActivity.CUDA]) as prefill:
        eng.step()
    with profile(activities=[ProfilerActivity.CUDA]) as decode:
        eng.step()
    names = lambda prof: " ".join(e.name for e in prof.events())
    assert "rope_cache_kernel" in names(prefill) and "rope_cache_kernel" not in names(decode)
    assert "paged_decode_kernel" in names(decode)
    while eng.has_unfinished():
        eng.step()
    cpu = LLM(model_dir, device="cpu").generate([[1, 5, 9, 14]], p)[0].token_ids
    assert llm.generate([[1, 5, 9, 14]], p)[0].token_ids == cpu


@cuda
def test_dense_mma_serves_decode_matmuls_as_cublas_does(model_dirs, monkeypatch):
    """With kernels.DENSE_MMA_MAX_ROWS set, a decode step's bf16 matmuls run on dense_mma
    (the mma kernel on dense weights), not cuBLAS, and the sampled tokens' logprobs stay
    within bf16's rounding of cuBLAS's."""
    from torch.profiler import ProfilerActivity, profile
    prompts = [[1, 5, 9, 14], [1] + list(range(20, 60))]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    kw = dict(device="cuda", dtype="bfloat16", enforce_eager=True)
    ref = LLM(model_dirs[0], **kw).generate(prompts, p)
    monkeypatch.setattr(kernels, "DENSE_MMA_MAX_ROWS", 16)
    llm = LLM(model_dirs[0], **kw)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = llm.generate(prompts, p)
    assert any("quant_mma_kernel<c10::BFloat16, 16" in e.name for e in prof.events())
    for a, b in zip(got, ref):
        n = next(i for i, (x, y) in enumerate(zip(a.token_ids + [-1], b.token_ids + [-2])) if x != y)
        diffs = [abs(a.logprobs[i][a.token_ids[i]] - b.logprobs[i][b.token_ids[i]]) for i in range(n)]
        assert n > 0 and max(diffs) < 0.25                 # equal up to the first differing token


@cuda
def test_prefill_kernel_serves_chunked_prefill_and_verification(model_dirs):
    """Chunked prefill (several queries per sequence, cached context before them) and
    n-gram verification windows go through paged_prefill; fp32 greedy equals the CPU."""
    for model_dir in model_dirs:
        prompts = [[1] + [(7 * i) % 50 + 3 for i in range(n)] for n in (300, 45, 120)]
        p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        kw = dict(max_num_batched_tokens=64, speculative_method="ngram", num_speculative_tokens=3)
        cpu = LLM(model_dir, device="cpu", **kw).generate(prompts, p)
        gpu = LLM(model_dir, device="cuda", dtype="float32", **kw).generate(prompts, p)
        assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]


def launches_and_replays(run, eager: torch.Tensor, counters: torch.Tensor) -> list[str]:
    """run() once more under the profiler -> the CUDA kernels it launched; then run() captured
    as a CUDA graph (as DecodeGraphs captures a step) must replay to eager's bits three times,
    leaving the split counters zero."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    launched = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    graph, out = nanoserve.capture_graph(run, None)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager) and not counters.any()
    return launched


@cuda
def test_split_decode_merges_in_its_own_launch_and_replays_in_a_graph():
    """Decode attention over several splits is one kernel (the last split of each group to
    finish merges the group's partials): with the caller's counters it launches nothing
    else; captured in a CUDA graph and replayed on the same counters, it gives the eager
    result to the bit every time and leaves the counters zero."""
    ext = kernels.cuda_extension()
    q, kc, vc, bt, lens = kernels._random_paged(3, [1000, 37, 0], 4, 8, 64, 16, torch.bfloat16, "cuda")
    starts = torch.arange(4, device="cuda", dtype=torch.int32)
    counters = torch.zeros(3 * 4, device="cuda", dtype=torch.int32)
    run = lambda: ext.paged_decode(q, kc, vc, bt, lens, 1024, 0.125, 128, counters)     # 8 splits
    eager = run()
    ref = kernels.paged_attention_ref(q, kc, vc, bt, starts, lens, 0.125)
    assert (eager.float() - ref.float()).abs().max() < 2e-2 * ref.float().abs().max()
    launched = launches_and_replays(run, eager, counters)
    assert len(launched) == 1 and "paged_decode_kernel" in launched[0], launched


@cuda
def test_quantized_layer_splits_k_in_one_launch_and_replays_in_a_graph():
    """A narrow bf16 int4 layer (4,096 x 4,096, Llama-2-7B's o_proj) at 1 and 16 rows (the mma
    kernel) and 40 rows (its tiled version) splits K over blocks: each call is one kernel
    launch (the last split of a tile adds the partials), and, captured in a CUDA graph on the
    layer's split counters and replayed, it gives the eager result to the bit every time and
    leaves the counters zero."""
    torch.manual_seed(0)
    layer = nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(torch.randn(4096, 4096), 4, 128, True), 4, 128,
                                             torch.bfloat16).cuda()
    dev = torch.device("cuda")
    for rows in (1, 16, 40):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        split = (kernels._quant_mma_splits if rows <= kernels.QUANT_MMA_MAX_ROWS else kernels._quant_gemm_splits)
        assert split(rows, 4096, 4096, 4, dev) > 1
        run = lambda: layer(x)
        eager = run()
        ref = kernels.quant_linear_ref(x, layer.qweight, layer.scales, layer.zeros, 4, 128)
        assert (eager.float() - ref.float()).abs().max() < 2e-2 * ref.float().abs().max()
        launched = launches_and_replays(run, eager, layer.cache["split_counters"])
        assert len(launched) == 1 and "quant_" in launched[0], launched


@cuda
@pytest.mark.parametrize("weights", ["int4", "bf16"])
def test_projection_adds_and_norms_in_one_launch_and_replays_in_a_graph(monkeypatch, weights):
    """Llama-2-7B's o_proj (bf16 int4, or bf16 on dense_mma) and the add + RMSNorm after it
    (RMSNorm.after): at 1 and kernels.NORM_FOLD_MAX_ROWS rows one kernel launch (the
    projection's last block norms the rows), past it two; either way the bits of the
    projection then fused add + RMSNorm, and, captured in a CUDA graph on the layer's
    counters and replayed, the eager bits every time with the counters left zero."""
    torch.manual_seed(0)
    if weights == "int4":
        layer = nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(torch.randn(4096, 4096), 4, 128, True), 4, 128,
                                                 torch.bfloat16).cuda()
    else:
        monkeypatch.setattr(kernels, "DENSE_MMA_MAX_ROWS", 16)
        layer = nanoserve.Linear(4096, 4096, bias=False).to("cuda", torch.bfloat16).requires_grad_(False)
    norm = nanoserve.RMSNorm(4096, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data.normal_()
    for rows in (1, kernels.NORM_FOLD_MAX_ROWS, kernels.NORM_FOLD_MAX_ROWS + 1):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        h, r = norm.after(layer, x, residual)
        want = norm(layer(x), residual)
        assert torch.equal(h, want[0]) and torch.equal(r, want[1])
        launched = launches_and_replays(lambda: norm.after(layer, x, residual)[0], h, layer.cache["split_counters"])
        assert len(launched) == (1 if rows <= kernels.NORM_FOLD_MAX_ROWS else 2), launched


@cuda
def test_fused_gate_up_stores_silu_times_up_in_one_launch_and_replays_in_a_graph():
    """Llama-2-7B's gate and up in bf16 int4, fused: LlamaMLP's activation at 1 and 16 rows is
    one kernel launch (quant_mma_silu_and_mul), the bits of the fused matmul then
    silu_and_mul, and replays in a CUDA graph to the bit with the counters left zero."""
    torch.manual_seed(0)
    parts = [nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(torch.randn(11008, 4096), 4, 128, True), 4, 128,
                                              torch.bfloat16).cuda() for _ in range(2)]
    fused = nanoserve.FusedQuantLinear(parts)
    counters = kernels._split_counters(fused.cache, 2 * 11008, torch.device("cuda"))   # the layer's, if it splits
    for rows in (1, 16):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        y = fused.silu_and_mul(x)
        assert torch.equal(y, kernels.silu_and_mul(*fused(x).chunk(2, dim=-1)))
        launched = launches_and_replays(lambda: fused.silu_and_mul(x), y, counters)
        assert len(launched) == 1 and "quant_mma" in launched[0], launched


def test_decode_kernel_takes_only_the_layouts_it_was_written_for():
    """paged_decode reads a cached row as 16-byte loads over a power-of-two number of lanes
    and keeps G <= 8 heads' sums in registers; other shapes are routed to paged_prefill."""
    def fits(heads, kv_heads, head_dim, dtype):
        return kernels._decode_kernel_fits(torch.empty(1, heads, head_dim, dtype=dtype),
                                           torch.empty(1, 16, kv_heads, head_dim, dtype=dtype))
    assert fits(32, 32, 128, torch.bfloat16) and fits(32, 4, 64, torch.float16) and fits(8, 1, 256, torch.bfloat16)
    assert fits(32, 8, 128, torch.float32)                       # 512-byte rows: 32 lanes
    assert not fits(64, 4, 128, torch.bfloat16)                  # G = 16
    assert not fits(32, 8, 96, torch.bfloat16)                   # 12 lanes per row
    assert not fits(32, 8, 256, torch.float32)                   # 64 lanes per row


@cuda
def test_24_sparse_checkpoint_runs_on_semi_structured_tensors(tmp_path):
    """A 2:4 checkpoint in fp16 on a GPU with sparse tensor cores: use_semi_structured (the
    engine's semi_structured_sparsity flag) makes every projection a semi-structured sparse
    tensor, and the logits stay those of the same weights run dense."""
    import subprocess
    import sys
    from pathlib import Path

    import nanoserve
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 sparse tensor cores need compute capability 8.0 or later")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "s24"
    r = subprocess.run([sys.executable, str(root / "quant.py"), "--model", str(nanoserve.DEFAULT_MODEL), "--method",
                        "sparse24", "--bits", "16", "--calib-samples", "4", "--calib-len", "64", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sparse, _ = nanoserve.load_model(out, torch.float16, torch.device("cuda"))
    names = nanoserve.quantized_linear_names(sparse)
    assert nanoserve.use_semi_structured(sparse) == names                 # not done by load_model (slower)
    assert all(isinstance(sparse.get_submodule(n).weight, torch.sparse.SparseSemiStructuredTensor) for n in names)
    ids = torch.tensor([[1] + list(range(40, 100))], device="cuda")
    dense = LLM(out, device="cuda", dtype="float16", enforce_eager=True).engine.model
    for n in names:                                        # the same weights, dense
        dense.get_submodule(n).weight = torch.nn.Parameter(sparse.get_submodule(n).weight.to_dense())
    a, b = sparse.forward_dense(ids).float(), dense.forward_dense(ids).float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    llm = LLM(out, device="cuda", dtype="float16", semi_structured_sparsity=True)            # the serving flag
    assert all(isinstance(llm.engine.model.get_submodule(n).weight, torch.sparse.SparseSemiStructuredTensor)
               for n in names)
    assert len(llm.generate("import os\n", SamplingParams(temperature=0, max_tokens=16))[0].token_ids) == 16
