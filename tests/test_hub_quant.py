"""GPTQ and AWQ checkpoints as the Hugging Face hub has them.

The checkpoints here are packed by this file's own packers, written from the formats'
published descriptions (AutoGPTQ's and AutoAWQ's pack loops: plain Python over numpy
words, not nanoserve's code). nanoserve's logits from a packed checkpoint must equal
those of an fp32 checkpoint holding the same weights dequantized here, within fp32
rounding (1e-4 on logprobs: the quantized path multiplies in another order).
"""

import json

import numpy as np
import pytest
import torch

from conftest import save_weights

import nanoserve
import quant
from nanoserve import LLM, SamplingParams

CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
              model_type="llama", tie_word_embeddings=False)
PROJ = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (128, 64), "self_attn.v_proj": (128, 64),
        "self_attn.o_proj": (128, 128), "mlp.gate_proj": (128, 256), "mlp.up_proj": (128, 256),
        "mlp.down_proj": (256, 128)}                                    # (in_features, out_features)
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]        # AutoAWQ: nibble i of a word holds column 8c + order[i]


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight: (in, out) -> (in / pf, out); word r holds rows r*pf .. r*pf+pf-1,
    row r*pf + j in bits [j*bits, (j+1)*bits)."""
    pf = 32 // bits
    out = np.zeros((q.shape[0] // pf, q.shape[1]), dtype=np.uint32)
    for r in range(out.shape[0]):
        for j in range(pf):
            out[r] |= q[r * pf + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def pack_cols(z: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """Packing along the output: (n, out) -> (n, out / pf); field i of word c holds column
    c*pf + order[i] (order: identity for GPTQ's qzeros, AWQ's interleave for AWQ)."""
    pf = 32 // bits
    order = order or list(range(pf))
    out = np.zeros((z.shape[0], z.shape[1] // pf), dtype=np.uint32)
    for c in range(out.shape[1]):
        for i in range(pf):
            out[:, c] |= z[:, c * pf + order[i]].astype(np.uint32) << np.uint32(bits * i)
    return out.view(np.int32)


def write_pair(root, fmt: str, bits: int, group: int, sym: bool = False, act_order: bool = False,
               v2: bool = False, shards: int = 1, seed: int = 0):
    """A hub-format checkpoint and an fp32 checkpoint of the same dequantized weights."""
    rng = np.random.default_rng(seed)
    qdir, fdir = root / f"{fmt}", root / "fp32"
    qdir.mkdir(), fdir.mkdir()
    dense, packed = {}, {}
    g = torch.Generator().manual_seed(seed)
    dense["model.embed_tokens.weight"] = torch.randn(300, 128, generator=g)
    dense["lm_head.weight"] = torch.randn(300, 128, generator=g) * 0.2
    dense["model.norm.weight"] = torch.ones(128)
    for layer in range(2):
        for n in ("input_layernorm", "post_attention_layernorm"):
            dense[f"model.layers.{layer}.{n}.weight"] = torch.ones(128)
        for proj, (K, N) in PROJ.items():
            G = group if group > 0 else K
            n_groups = K // G
            q = rng.integers(0, 2 ** bits, size=(K, N))
            z = np.full((n_groups, N), 2 ** (bits - 1)) if sym else rng.integers(1, 2 ** bits, size=(n_groups, N))
            s = (rng.uniform(0.5, 1.5, size=(n_groups, N)) * 2.0 / np.sqrt(K) / 2 ** (bits - 1)).astype(np.float16)
            g_idx = np.arange(K) // G
            if act_order:
                g_idx = rng.permutation(g_idx)                     # each group still has G channels
            W = s.astype(np.float32)[g_idx] * (q - z[g_idx])        # (in, out)
            name = f"model.layers.{layer}.{proj}"
            dense[f"{name}.weight"] = torch.from_numpy(W.T.copy()).float()
            if fmt == "gptq":
                packed[f"{name}.qweight"] = pack_rows(q, bits)
                stored = z if v2 else (z - 1) & (2 ** bits - 1)    # the original format stores zero - 1
                packed[f"{name}.qzeros"] = pack_cols(stored, bits)
                packed[f"{name}.g_idx"] = g_idx.astype(np.int32)
            else:
                packed[f"{name}.qweight"] = pack_cols(q, bits, AWQ_PACK_ORDER)
                packed[f"{name}.qzeros"] = pack_cols(z, bits, AWQ_PACK_ORDER)
            packed[f"{name}.scales"] = s
    hub = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in packed.items()}
    hub.update({k: v.half() for k, v in dense.items() if not k.endswith("proj.weight")})
    # The fp32 twin holds what the hub file's fp16 tensors hold.
    dense.update({k: v.float() for k, v in hub.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))})
    nanoserve.save_safetensors(dense, fdir / "model.safetensors")
    (fdir / "config.json").write_text(json.dumps(CONFIG))
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
              "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}
    (qdir / "config.json").write_text(json.dumps(dict(CONFIG, quantization_config=qc, torch_dtype="float16")))
    save_weights(hub, qdir, shards)
    return qdir, fdir


def logprobs(model_dir, ids, llm: LLM | None = None) -> torch.Tensor:
    llm = llm or LLM(model_dir, device="cpu")
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    return torch.tensor([out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))])


@pytest.mark.parametrize("fmt,bits,group,sym,act_order,v2,shards", [
    ("gptq", 4, 32, True, False, False, 1),       # the common TheBloke-style checkpoint
    ("gptq", 4, 64, False, True, False, 1),       # act-order: permuted g_idx, asymmetric zeros
    ("gptq", 8, -1, False, False, False, 1),      # 8 bits, per channel
    ("gptq", 4, 128, False, False, True, 1),      # GPTQModel's gptq_v2 (no zero offset)
    ("awq", 4, 128, False, False, False, 1),      # AutoAWQ gemm
    ("awq", 4, 32, False, False, False, 2),       # sharded
])
def test_hub_checkpoint_logits_equal_the_dequantized_fp32_checkpoint(tmp_path, fmt, bits, group, sym, act_order,
                                                                      v2, shards):
    qdir, fdir = write_pair(tmp_path, fmt, bits, group, sym, act_order, v2, shards)
    ids = [1] + [(13 * i + 5) % 290 + 3 for i in range(60)]
    llm, dense = LLM(qdir, device="cpu"), LLM(fdir, device="cpu")
    assert (logprobs(qdir, ids, llm) - logprobs(fdir, ids, dense)).abs().max() < 1e-4
    layer = llm.engine.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nanoserve.QuantLinear) and layer.symmetric == sym
    assert (layer.perm is not None) == act_order
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert llm.generate(ids, greedy)[0].token_ids == dense.generate(ids, greedy)[0].token_ids


@pytest.mark.parametrize("fmt,change,field", [
    ("gptq", {"bits": 3}, "bits"), ("gptq", {"quant_method": "bitsandbytes"}, "quant_method"),
    ("gptq", {"group_size": 256}, "group_size"), ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format"),
    ("gptq", {"lm_head": True}, "lm_head"), ("gptq", {"dynamic": {"-:.*": {}}}, "dynamic"),
    ("awq", {"version": "gemv"}, "version"), ("awq", {"bits": 8}, "bits"), ("awq", {"zero_point": False}, "zero_point"),
])
def test_unsupported_variants_are_refused_by_name(tmp_path, fmt, change, field):
    qdir, _ = write_pair(tmp_path, fmt, 4, 32)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        LLM(qdir, device="cpu")


@pytest.mark.parametrize("method,fmt,bits,group,symmetric", [("gptq", "gptq", 4, 32, True),
                                                             ("gptq", "gptq", 4, 64, False),
                                                             ("gptq", "gptq", 8, 0, True),
                                                             ("awq", "awq", 4, 32, True)])
def test_nanoserve_quantized_models_written_in_hub_formats_reload_with_identical_logits(
        tmp_path, method, fmt, bits, group, symmetric):
    """quant.py's output written as GPTQ/AWQ (scales in float16, as those formats store them)
    gives exactly the logits of the same model in nanoserve's own layout."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    model = nanoserve.LlamaForCausalLM(nanoserve.ModelConfig(**{k: v for k, v in CONFIG.items()}))
    nanoserve.save_safetensors({k: v * 3 if v.dim() == 2 else v for k, v in model.state_dict().items()},
                               src / "model.safetensors")
    llm = LLM(src, device="cpu")
    calib = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    cfg = quant.quantize_model(llm.engine.model, calib, method, bits, group, symmetric)
    for m in llm.engine.model.modules():
        if isinstance(m, nanoserve.QuantLinear):
            m.scales = m.scales.half().float()                           # what the hub formats hold
    quant.save_quantized(llm.engine.model, src, tmp_path / "ours", cfg)
    quant.save_quantized(llm.engine.model, src, tmp_path / "hub", cfg, fmt)
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    ids = [1] + list(range(20, 80))
    assert torch.equal(logprobs(tmp_path / "ours", ids), logprobs(tmp_path / "hub", ids))


def test_quant_cli_writes_a_gptq_checkpoint(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    model = nanoserve.LlamaForCausalLM(nanoserve.ModelConfig(**CONFIG))
    nanoserve.save_safetensors(model.state_dict(), src / "model.safetensors")
    r = subprocess.run([sys.executable, str(ROOT / "quant.py"), "--model", str(src), "--method", "rtn", "--bits", "4",
                        "--group-size", "32", "--format", "gptq", "--out", str(tmp_path / "q"), "--calib-samples", "2",
                        "--calib-len", "16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == 32
    assert LLM(tmp_path / "q", device="cpu").generate([1, 2, 3], SamplingParams(max_tokens=3))[0].token_ids
