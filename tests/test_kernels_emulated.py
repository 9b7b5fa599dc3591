"""The engine on the CUDA kernels without a GPU: kernels.py's CUDA source run by kemu, the CPU
emulator in ../shared/tools/kemu (every CUDA thread executes the kernel code), against the same
engine on the PyTorch twins. kemu's run_self_check.py checks each kernel alone; this checks
what the engine hands them: the runner's metadata, its split counters over layers and steps,
the decode graphs' inputs (run without capture, as on the CPU) and the fused RoPE kernel.
Skipped with a reason where ../shared is not beside the checkout."""

import re

import pytest

import kernels
import nanoserve
from conftest import SHARED
from nanoserve import LLM, SamplingParams

KEMU = SHARED / "tools" / "kemu"
pytestmark = pytest.mark.skipif(not (KEMU / "kemu_build.py").is_file(),
                                reason="../shared/tools/kemu is not beside this checkout (only in the project's CI)")
MODEL = nanoserve.DEFAULT_MODEL.parent / "nanocoder-5m"


@pytest.fixture(scope="module")
def emulated():
    """kernels.py's CUDA extension built by kemu (the build run_self_check.py makes: cached)."""
    import sys
    sys.path.insert(0, str(KEMU))
    import kemu_build
    src = open(kernels.__file__).read()
    functions = re.findall(r"[\"'](\w+)[\"']", re.search(r"functions\s*=\s*\[([^\]]*)\]", src).group(1))
    return kemu_build.build(kernels.__file__, functions=functions)


class Counted:
    """The extension, counting calls by function."""
    def __init__(self, ext):
        self.ext, self.calls = ext, {}

    def __getattr__(self, name):
        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return getattr(self.ext, name)(*args)
        return call


@pytest.fixture
def on_emulator(emulated, monkeypatch):
    """Every tensor dispatched to the emulated kernels, their calls counted (Counted)."""
    ext = Counted(emulated)
    monkeypatch.setattr(kernels, "_cuda", lambda t: True)
    monkeypatch.setattr(kernels, "cuda_extension", lambda: ext)
    return ext


def int4_layer(N: int, K: int):
    """A bf16 QuantLinear of random weights, int4 by RTN in groups of 128."""
    import quant
    import torch
    return nanoserve.QuantLinear.from_codes(*quant.quantize_rtn(torch.randn(N, K), 4, 128, True), 4, 128,
                                             torch.bfloat16)


def generate(monkeypatch, ext, graphs: bool, prompts, params, **kw):
    """Token ids of each sample, on the emulated kernels (ext) or on the twins (None); with
    graphs, decode steps take the decode graphs' path (uncaptured on the CPU) -> (ids, runner)."""
    monkeypatch.setattr(kernels, "USE_CPU_FAST_PATHS", False)        # attention through the kernels
    monkeypatch.setattr(kernels, "_cuda", (lambda t: True) if ext is not None else (lambda t: False))
    monkeypatch.setattr(kernels, "cuda_extension", lambda: ext)
    llm = LLM(MODEL, device="cpu", dtype="float32", num_blocks=128, block_size=16, max_model_len=256,
              max_num_batched_tokens=64, **kw)
    llm.engine.runner.use_graphs = graphs
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)], llm.engine.runner


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_on_emulated_kernels_equals_the_twins(emulated, monkeypatch, graphs):
    """fp32 greedy tokens equal the twins' through chunked prefill (paged_prefill) and decode
    (paged_decode; with graphs paged_decode_rope, the step's RoPE and cache write inside),
    the contexts split (keys per split forced down to 32: several splits at these lengths, so
    the kernel's last block merges them) on the runner's one counter buffer, left zero; then
    n = 4 seeded samples of a request with max_num_seqs = 2 (decode steps past the buffer's
    first size)."""
    splits = []
    partition = kernels.decode_partition
    monkeypatch.setattr(kernels, "decode_min_part", lambda head_dim: 32)
    monkeypatch.setattr(kernels, "decode_partition",
                        lambda *a: (lambda part: (splits.append(-(-a[4] // part)), part)[1])(partition(*a)))
    prompts = [[(37 * i + 11 * j) % 1900 + 3 for j in range(n)] for i, n in enumerate((5, 60, 23, 90, 41, 9))]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ext = Counted(emulated)
    ref, _ = generate(monkeypatch, None, graphs, prompts, greedy, max_num_seqs=6)
    got, runner = generate(monkeypatch, ext, graphs, prompts, greedy, max_num_seqs=6)
    assert got == ref and max(splits) >= 4 and not runner.split_counters.any()
    assert ext.calls["paged_prefill"] and ext.calls["paged_decode_rope" if graphs else "paged_decode"] > 100
    samples = SamplingParams(n=4, temperature=0.8, seed=5, max_tokens=16, ignore_eos=True)
    ref, _ = generate(monkeypatch, None, graphs, prompts[3:4], samples, max_num_seqs=2)
    got, runner = generate(monkeypatch, ext, graphs, prompts[3:4], samples, max_num_seqs=2)
    assert got == ref and len(got[0]) == 4 and not runner.split_counters.any()
    assert emulated.kemu_reports(True) == []


def test_quantized_layer_keeps_one_buffer_of_split_counters(emulated, on_emulator):
    """A bf16 int4 QuantLinear (groups of 128) at 1 and 16 rows takes the mma kernel, at 17
    and 40 its tiled version, each with K split over blocks (2-6 ways here); the layer's cache
    holds one buffer of split counters for both, made on the first call (sized for every row
    count they take) and reused, left zero by every call; the results match the twin (bf16:
    2e-2 of the output's max, as the self-check allows) and a repeated call gives the same bits."""
    import torch
    ext = on_emulator
    torch.manual_seed(0)
    N, K = 200, 2048
    layer = int4_layer(N, K)
    buffers = set()
    for rows in (1, 16, 17, 40):
        x = torch.randn(rows, K, dtype=torch.bfloat16)
        y, again = layer(x), layer(x)
        ref = kernels.quant_linear_ref(x, layer.qweight, layer.scales, layer.zeros, 4, 128)
        counters = layer.cache["split_counters"]
        buffers.add(counters.data_ptr())
        assert torch.equal(y, again) and not counters.any()
        assert (y.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    assert ext.calls == {"quant_mma": 4, "quant_gemm": 4} and len(buffers) == 1
    cpu = torch.device("cpu")
    assert [kernels._quant_mma_splits(r, N, K, 4, cpu) for r in (1, 16)] == [2, 2]
    assert min(kernels._quant_gemm_splits(r, N, K, 4, cpu) for r in (17, 40)) >= 2
    assert emulated.kemu_reports(True) == []


def test_projection_adds_and_norms_in_its_own_launch(emulated, on_emulator, monkeypatch):
    """RMSNorm.after(a bf16 int4 QuantLinear, x, residual), the step that ends each half of a
    decoder layer: up to kernels.NORM_FOLD_MAX_ROWS rows one launch (quant_mma_add_norm, K
    split 2 ways, 4,096 channels: 512 16-byte chunks a norm row, two a thread), beyond that
    quant_mma then rms_norm; either way the bits of the layer then the norm, the layer's
    counters left zero. A forward hook on the layer (tensor parallelism's all-reduce) turns
    the fold off: the hook's output is what joins the residual stream. Then a dense bf16
    Linear on dense_mma, the same way."""
    import torch
    ext = on_emulator
    torch.manual_seed(0)
    N, K = 4096, 2048
    layer = int4_layer(N, K)
    norm = nanoserve.RMSNorm(N, 1e-5).to(torch.bfloat16)
    norm.weight.data.normal_()
    monkeypatch.setattr(kernels, "NORM_FOLD_MAX_ROWS", 4)               # the default, whatever the environment says
    assert kernels._quant_mma_splits(1, N, K, 4, torch.device("cpu")) == 2
    for rows in (1, 4, 5):
        x, residual = torch.randn(rows, K, dtype=torch.bfloat16), torch.randn(rows, N, dtype=torch.bfloat16)
        ext.calls.clear()
        h, r = norm.after(layer, x, residual)
        assert ext.calls == ({"quant_mma_add_norm": 1} if rows <= 4 else {"quant_mma": 1, "rms_norm": 1})
        want = norm(layer(x), residual)
        assert torch.equal(h, want[0]) and torch.equal(r, want[1]) and not layer.cache["split_counters"].any()
    layer.register_forward_hook(lambda module, args, y: 2 * y)
    ext.calls.clear()
    h, r = norm.after(layer, x[:1], residual[:1])
    assert ext.calls == {"quant_mma": 1, "rms_norm": 1}
    assert torch.equal(r, layer(x[:1]) + residual[:1])                     # the hook's 2 y, as layer(x) gives
    # A dense bf16 Linear of the same shape, with dense_mma on (DENSE_MMA_MAX_ROWS): the same
    # fold (dense_mma_add_norm) at 1 and 4 rows, dense_mma then rms_norm at 5, the same bits.
    monkeypatch.setattr(kernels, "DENSE_MMA_MAX_ROWS", 16)
    dense = nanoserve.Linear(K, N, bias=False).to(torch.bfloat16).requires_grad_(False)   # as served
    for rows in (1, 4, 5):
        x, residual = torch.randn(rows, K, dtype=torch.bfloat16), torch.randn(rows, N, dtype=torch.bfloat16)
        ext.calls.clear()
        h, r = norm.after(dense, x, residual)
        assert ext.calls == ({"dense_mma_add_norm": 1} if rows <= 4 else {"dense_mma": 1, "rms_norm": 1})
        want = norm(dense(x), residual)
        assert torch.equal(h, want[0]) and torch.equal(r, want[1]) and not dense.cache["split_counters"].any()
    assert emulated.kemu_reports(True) == []


def test_fused_gate_up_stores_silu_times_up_in_its_own_launch(emulated, on_emulator):
    """A bf16 int4 MLP's gate and up fused (FusedQuantLinear, 2 x 1,040 channels: the last
    16-channel tile cut short; K in 2 splits at 1 row): LlamaMLP.activation at 1 and 16 rows
    is one launch (quant_mma_silu_and_mul), at 17 the tiled matmul then silu_and_mul; either
    way the bits of silu_and_mul over the fused product's halves, the counters left zero."""
    import torch
    ext = on_emulator
    torch.manual_seed(0)
    F, K = 1040, 2048
    fused = nanoserve.FusedQuantLinear([int4_layer(F, K), int4_layer(F, K)])
    assert kernels._quant_mma_splits(1, 2 * F, K, 4, torch.device("cpu")) == 2
    for rows in (1, 16, 17):
        x = torch.randn(rows, K, dtype=torch.bfloat16)
        ext.calls.clear()
        y = fused.silu_and_mul(x)
        assert ext.calls == ({"quant_mma_silu_and_mul": 1} if rows <= 16 else {"quant_gemm": 1, "silu_and_mul": 1})
        want = kernels.silu_and_mul(*fused(x).chunk(2, dim=-1))
        assert y.shape == (rows, F) and torch.equal(y, want) and not fused.cache["split_counters"].any()
    assert emulated.kemu_reports(True) == []


@pytest.mark.parametrize("weights", ["int4", "bf16"])
def test_model_folds_its_norms_into_the_projections(emulated, monkeypatch, weights):
    """A bf16 model (nanocoder-5m: int4 by RTN in groups of 128, or its bf16 weights on
    dense_mma, kernels.DENSE_MMA_MAX_ROWS = 16) on the emulated kernels through the decode
    graphs' path: at up to kernels.NORM_FOLD_MAX_ROWS (4) sequences a decode step's output
    and down projections each add and norm in their own launch (quant_mma_add_norm or
    dense_mma_add_norm, 2 a layer), leaving one rms_norm launch a step (layer 0's input
    norm), and the greedy tokens are those of the same kernels with the fold off
    (NORM_FOLD_MAX_ROWS = 0)."""
    import quant
    import torch
    prompts = [[(37 * i + 11 * j) % 1900 + 3 for j in range(n)] for i, n in enumerate((5, 23, 9))]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    monkeypatch.setattr(kernels, "DENSE_MMA_MAX_ROWS", 16 if weights == "bf16" else 0)

    def run(fold_rows):
        monkeypatch.setattr(kernels, "NORM_FOLD_MAX_ROWS", fold_rows)
        monkeypatch.setattr(kernels, "_cuda", lambda t: False)       # load (and quantize) on the CPU
        llm = LLM(MODEL, device="cpu", dtype="bfloat16", num_blocks=64, block_size=16, max_model_len=128)
        if weights == "int4":
            model = llm.engine.model
            calib = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
            quant.quantize_model(model, calib, "rtn", 4, 128)
            nanoserve.fuse_projections(model)
        ext = Counted(emulated)
        monkeypatch.setattr(kernels, "_cuda", lambda t: True)
        monkeypatch.setattr(kernels, "cuda_extension", lambda: ext)
        llm.engine.runner.use_graphs = True
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)], ext.calls

    folded, calls = run(4)
    plain, plain_calls = run(0)
    fold = "quant_mma_add_norm" if weights == "int4" else "dense_mma_add_norm"
    layers, steps = 6, calls["paged_decode_rope"] // 6                    # decode steps
    assert folded == plain and steps >= 7
    assert calls[fold] == 2 * layers * steps and fold not in plain_calls
    assert plain_calls["rms_norm"] - calls["rms_norm"] == 2 * layers * steps
    if weights == "int4":                 # the gate/up matmul's SiLU epilogue, at every step of 1-16 rows
        assert calls["quant_mma_silu_and_mul"] >= layers * steps
    assert emulated.kemu_reports(True) == []
