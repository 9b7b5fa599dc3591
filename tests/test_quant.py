"""quant.py: RTN, packing, GPTQ, AWQ, quantized checkpoints."""

import json
import subprocess
import sys

import pytest
import torch

import nanoserve
import kernels
import quant
from nanoserve import LLM, SamplingParams
from conftest import ROOT, STORIES, TINY_CONFIG, write_random_checkpoint


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [0, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, symmetric):
    torch.manual_seed(bits * 1000 + group_size)
    W = torch.randn(48, 172) * torch.rand(48, 1) * 3           # 172: not a multiple of the group
    codes, scale, zero = quant.quantize_rtn(W, bits, group_size, symmetric)
    W_hat = kernels.dequantize_ref(codes, scale, zero, group_size)
    G = group_size or 172
    s = scale.repeat_interleave(G, 1)[:, :172]
    assert ((W - W_hat).abs() <= s / 2 + 1e-6).all()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        assert codes.abs().max() <= qmax
        torch.testing.assert_close(scale[:, 0], W[:, :G].abs().amax(1) / qmax)   # s = max|w| / (2^(b-1) - 1)
    else:
        assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1


@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_unpack_round_trip(signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = torch.randint(lo, hi + 1, (16, 37), dtype=torch.int8)
    packed = nanoserve.pack_int4(codes, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 19)   # two per byte
    assert torch.equal(kernels.unpack_int4(packed, 37, signed), codes)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 0, True), (4, 32, True), (4, 128, True),
                                                     (4, 64, False), (4, 256, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_weight_only_kernels_match_the_reference_twin(bits, group_size, symmetric, dtype):
    """kernels.pack_for_cpu + PyTorch's int8/int4 CPU kernels against quant_linear_ref.
    fp32: both accumulate in fp32 from the same weights, 1e-5 relative. bf16: the twin
    rounds the dequantized weight to bf16 and the kernels do not (or round elsewhere),
    so about 2^-8 relative per product; 2e-2 of the output's max covers it."""
    torch.manual_seed(bits + group_size)
    W = torch.randn(96, 512)
    layer = nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(W, bits, group_size, symmetric), bits, group_size,
                                         dtype)
    x = torch.randn(2, 5, 512, dtype=dtype)
    y = layer(x)                                                       # the CPU kernels
    assert layer.cache["cpu"][1] is not None                          # repacked once, kept
    ref = kernels.quant_linear_ref(x, layer.qweight, layer.scales, layer.zeros, bits, group_size)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.shape == (2, 5, 96)
    assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    layer.scales = layer.scales * 2                                    # a new buffer repacks
    torch.testing.assert_close(layer(x).float(), 2 * y.float(), rtol=tol, atol=tol * ref.float().abs().max())


def test_cpu_weight_only_kernels_fall_back_where_the_layout_does_not_fit():
    # K = 172 (not a multiple of 64), N = 40 (not of 16), int8 in groups, int3, int4 per channel.
    for (N, K), bits, G in (((48, 172), 8, 0), ((48, 172), 4, 32), ((40, 256), 4, 32), ((48, 256), 8, 32),
                            ((48, 256), 3, 32), ((48, 256), 4, 0)):
        layer = nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(torch.randn(N, K), bits, G, True), bits, G,
                                             torch.float32)
        assert kernels.pack_for_cpu(layer.qweight, layer.scales, layer.zeros, bits, G, K, torch.float32) is None
        x = torch.randn(3, K)
        torch.testing.assert_close(layer(x), kernels.quant_linear_ref(x, layer.qweight, layer.scales, None, bits, G))


def test_the_memory_budget_knows_which_steps_dequantize():
    """kernels.quant_linear_dequantizes follows quant_linear_cuda's choice of kernel: the mma
    kernels (no temporary) up to 255 rows for int4 groups of 128 and per-channel int8 in
    16-bit dtypes; the GEMV (none) up to 16 rows for other groups or fp32; dequantize +
    cuBLAS past those; the twin (a temporary at every size) where K is not a multiple of 32.
    (A CPU device counts as one with tensor cores here, as for the emulator.)"""
    dq = kernels.quant_linear_dequantizes
    dev, bf16 = torch.device("cpu"), torch.bfloat16
    assert not any(dq(r, 4096, 4, 128, bf16, dev) for r in (1, 16, 17, 255)) and dq(256, 4096, 4, 128, bf16, dev)
    assert not dq(200, 4096, 8, 0, bf16, dev) and dq(300, 4096, 8, 0, bf16, dev)
    assert not dq(16, 4096, 4, 32, bf16, dev) and dq(17, 4096, 4, 32, bf16, dev)
    assert not dq(16, 4096, 4, 128, torch.float32, dev) and dq(17, 4096, 4, 128, torch.float32, dev)
    assert dq(1, 172, 4, 0, bf16, dev) and not dq(0, 172, 4, 0, bf16, dev)


def test_split_counters_outlive_reloads_casts_and_a_larger_layer():
    """The GPU kernels' split counters (kernels._split_counters) sit in the layer's cache, and
    a CUDA graph holds their address: a smaller layer sharing the cache reuses them, a larger
    one gets a new buffer while the old one stays alive (cache["retired"]), and reloading or
    casting the layer keeps them (only the CPU repacking goes)."""
    cpu = torch.device("cpu")
    layer = nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(torch.randn(200, 256), 4, 128, True), 4, 128,
                                             torch.bfloat16)
    layer(torch.randn(3, 256, dtype=torch.bfloat16))                    # the CPU repacking
    counters = kernels._split_counters(layer.cache, 200, cpu)
    assert "cpu" in layer.cache and not counters.any()
    assert kernels._split_counters(layer.cache, 100, cpu) is counters
    layer.load_state_dict(layer.state_dict())
    layer.to(torch.float16)
    assert "cpu" not in layer.cache and layer.cache["split_counters"] is counters
    bigger = kernels._split_counters(layer.cache, 4000, cpu)
    assert bigger is not counters and len(bigger) >= 4000 // 32 and layer.cache["retired"] == [counters]


def test_gptq_output_error_is_lower_than_rtn_on_calibration_inputs():
    torch.manual_seed(0)
    # Correlated inputs with a few large channels, as in real activations.
    X = torch.randn(2048, 128) @ (torch.randn(128, 128) / 8 + torch.eye(128))
    X[:, :4] *= 10
    W = torch.randn(64, 128)
    H = 2 * X.T @ X / X.shape[0]
    import kernels
    for bits, G in [(4, 0), (3, 0), (4, 32), (3, 32)]:
        rtn = kernels.dequantize_ref(*quant.quantize_rtn(W, bits, G), G)
        gptq = kernels.dequantize_ref(*quant.gptq_quantize(W, H, bits, G), G)
        e_rtn = (X @ (W - rtn).T).norm()
        e_gptq = (X @ (W - gptq).T).norm()
        assert e_gptq < 0.8 * e_rtn, (bits, G)
        act = kernels.dequantize_ref(*quant.gptq_quantize(W, H, bits, G, act_order=True), G)
        assert (X @ (W - act).T).norm() < e_rtn


def test_awq_scale_search_lowers_output_error_with_salient_channels():
    torch.manual_seed(1)
    X = torch.randn(1024, 96)
    X[:, :3] *= 30                                             # salient input channels
    W = torch.randn(64, 96)
    import kernels
    rtn = kernels.dequantize_ref(*quant.quantize_rtn(W, 3, 32), 32)
    s, alpha = quant.awq_search_scale([W], X, 3, 32, True)
    awq = kernels.dequantize_ref(*quant.quantize_rtn(W * s, 3, 32), 32) / s
    assert alpha > 0
    assert (X @ (W - awq).T).norm() < (X @ (W - rtn).T).norm()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    if (STORIES / "model.safetensors").is_file():
        return STORIES
    return write_random_checkpoint(tmp_path_factory.mktemp("q") / "m", dict(TINY_CONFIG, intermediate_size=172))


@pytest.mark.parametrize("method,bits,group", [("rtn", 8, 0), ("rtn", 4, 32), ("gptq", 4, 32),
                                               ("awq", 4, 32), ("gptq", 3, 0)])
def test_quantized_checkpoint_round_trips_bit_exactly_and_the_engine_runs_it(small_model, tmp_path,
                                                                               method, bits, group):
    llm = LLM(small_model, device="cpu")
    model = llm.engine.model
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    cfg = quant.quantize_model(model, calib, method, bits, group)
    out = tmp_path / "q"
    quant.save_quantized(model, small_model, out, cfg)
    qllm = LLM(out, device="cpu", max_num_batched_tokens=32)
    for name, t in model.state_dict().items():
        assert torch.equal(qllm.engine.model.state_dict()[name], t), name
    assert isinstance(qllm.engine.model.model.layers[0].mlp.down_proj, nanoserve.QuantLinear)
    prompts = [[1, 20, 30, 40] * k for k in range(1, 6)]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = qllm.generate(prompts, p)
    # Every engine feature on the quantized model: batching, chunking, prefix caching, spec.
    assert all(len(o.token_ids) == 12 for o in outs)
    spec = LLM(out, device="cpu", speculative_method="ngram", num_speculative_tokens=3, max_num_batched_tokens=32)
    assert [o.token_ids for o in spec.generate(prompts, p)] == [o.token_ids for o in outs]
    if bits == 8:     # int8 stays close to the float model
        ref = llm.generate(prompts, p)
        same = sum(a.token_ids == b.token_ids for a, b in zip(ref, outs))
        assert same >= 3


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 32, False), (8, 0, True), (3, 0, False)])
@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_quantized_projections_fuse_into_one_matmul_with_the_same_results(small_model, monkeypatch, bits, group,
                                                                         symmetric, cpu_kernels):
    """fuse_projections runs q/k/v and gate/up of a quantized model as one quantized matmul
    each (FusedQuantLinear): the same outputs to the bit (each output channel is the same
    sum of the same products), the same greedy tokens, the checkpoint's names and values
    unchanged, no second copy of the codes; a replaced projection ends the fusion until
    fuse_projections runs again. On PyTorch's CPU kernels and on the twin."""
    monkeypatch.setattr(kernels, "USE_CPU_FAST_PATHS", cpu_kernels)
    llm = LLM(small_model, device="cpu")
    model = llm.engine.model
    calib = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quant.quantize_model(model, calib, "rtn", bits, group, symmetric)
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, model.config.hidden_size)
    separate = (torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1), torch.cat([m.gate_proj(x), m.up_proj(x)], -1))
    prompts = [[1, 20, 30, 40] * k for k in range(1, 5)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(prompts, greedy)]          # the engine's fusion made before quantizing:
    before = {k: v.clone() for k, v in model.state_dict().items()}      # no longer holds, the projections run alone
    nanoserve.fuse_projections(model)
    assert isinstance(a.qkv, nanoserve.FusedQuantLinear) and isinstance(m.gate_up, nanoserve.FusedQuantLinear)
    assert torch.equal(a.qkv(x), separate[0]) and torch.equal(m.gate_up(x), separate[1])
    assert a.v_proj.qweight.untyped_storage().data_ptr() == a.qkv.qweight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want
    m.up_proj = nanoserve.QuantLinear.from_codes(m.up_proj.codes().clone(), m.up_proj.scales, m.up_proj.zeros, bits, group,
                                                 torch.float32)            # replaced: runs alone again
    assert not m.gate_up.holds(m.gate_proj, m.up_proj)
    torch.testing.assert_close(m(x), m.separate(x), rtol=0, atol=0)
    nanoserve.fuse_projections(model)
    assert m.gate_up.holds(m.gate_proj, m.up_proj) and torch.equal(m.gate_up(x), separate[1])
    a.k_proj.scales = a.k_proj.scales * 2                                  # new scales: runs alone again
    assert not a.qkv.holds(a.q_proj, a.k_proj, a.v_proj)


def test_projections_of_different_formats_or_input_orders_stay_separate():
    torch.manual_seed(0)
    W = torch.randn(64, 128)

    def q(bits: int, group: int, perm: torch.Tensor | None = None) -> nanoserve.QuantLinear:
        m = nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(W, bits, group), bits, group, torch.float32)
        m.perm = perm                                  # act-order: x read in this order
        return m
    assert nanoserve.FusedQuantLinear.fusable([q(4, 32), q(4, 32)])
    assert not nanoserve.FusedQuantLinear.fusable([q(4, 32), q(8, 0)])
    assert not nanoserve.FusedQuantLinear.fusable([q(4, 32), q(4, 64)])
    assert not nanoserve.FusedQuantLinear.fusable([q(4, 32), torch.nn.Linear(128, 64)])
    order = torch.randperm(128)
    assert nanoserve.FusedQuantLinear.fusable([q(4, 32, order), q(4, 32, order.clone())])
    assert not nanoserve.FusedQuantLinear.fusable([q(4, 32, order), q(4, 32, torch.randperm(128))])
    assert not nanoserve.FusedQuantLinear.fusable([q(4, 32, order), q(4, 32)])
    x = torch.randn(2, 128)
    parts = [q(4, 32, order), q(4, 32, order.clone())]
    separate = torch.cat([p(x) for p in parts], -1)
    assert torch.equal(nanoserve.FusedQuantLinear(parts)(x), separate)     # act-order: x permuted once


def test_quant_cli_writes_a_checkpoint_the_cli_runs(small_model, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, str(ROOT / "quant.py"), "--model", str(small_model), "--method", "gptq",
                        "--bits", "4", "--group-size", "32", "--out", str(out), "--calib-samples", "4",
                        "--calib-len", "32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layer 1/" in r.stderr                               # progress is shown
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    llm = LLM(out, device="cpu")
    assert len(llm.generate([1, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids) == 5
    bad = subprocess.run([sys.executable, str(ROOT / "quant.py"), "--model", str(small_model), "--group-size",
                          "-3", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "group-size" in bad.stderr and "Traceback" not in bad.stderr


def test_kv_budget_sets_aside_the_dequantized_weight_of_the_largest_projection(small_model, monkeypatch):
    """On a GPU a large enough step dequantizes each quantized projection into a dense
    temporary before cuBLAS (kernels.quant_linear_dequantizes: here int4 groups of 32, which
    the mma kernels do not take, from 17 rows, and a K of 172 at any row count); the KV pool
    is sized around the largest, twice when the piecewise graphs' largest step makes one too
    (their pool keeps it)."""
    llm = LLM(small_model, device="cpu")
    model = llm.engine.model
    calib = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (8 << 30, 16 << 30))
    cfg = nanoserve.EngineConfig(device="cpu", max_num_batched_tokens=64, max_num_seqs=4, gpu_memory_utilization=0.5)

    def budget(graph_tokens: int = 0) -> int:          # 0: no piecewise graphs
        fake = type("Runner", (), {"device": torch.device("cuda"), "cfg": cfg, "model": model,
                                   "dtype": torch.bfloat16, "use_piecewise_graphs": graph_tokens > 0,
                                   "piecewise_max_tokens": graph_tokens,
                                   "reserved_bytes": nanoserve.ModelRunner.reserved_bytes})()
        return nanoserve.ModelRunner.kv_budget_bytes(fake)

    dense = {n: budget(n) for n in (0, 64, 256)}
    c = model.config
    assert dense[0] - dense[64] == 64 * (4 * c.hidden_size + 3 * c.intermediate_size) * 4
    quant.quantize_model(model, calib, "rtn", 4, 32)
    largest = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, nanoserve.QuantLinear))
    assert largest >= model.config.hidden_size * model.config.intermediate_size
    assert dense[0] - budget() == largest * 2
    assert dense[64] - budget(64) == dense[256] - budget(256) == 2 * largest * 2   # graph steps dequantize
    nanoserve.fuse_projections(model)                        # gate and up dequantize as one
    fused = 2 * model.config.hidden_size * model.config.intermediate_size
    assert dense[0] - budget() == max(largest, fused) * 2 and fused > largest
