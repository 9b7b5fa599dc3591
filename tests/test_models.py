"""The Llama-family checkpoints people run today, checked against transformers' own models.

Each case builds a tiny random model with transformers (its config class, its weights),
saves it with save_pretrained, loads the directory into nanoserve, and compares fp32
prompt logprobs (within 1e-4) and greedy tokens (equal) over a prompt longer than the
scaled RoPE's original context. transformers runs in an interpreter of its own
(hf_oracle.py says why): it builds every family's checkpoint once and computes the
references there. Skipped without transformers (it is in requirements-dev.txt).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import nanoserve
from hf_oracle import HAS_TRANSFORMERS, run_clean
from nanoserve import LLM, SamplingParams

if not HAS_TRANSFORMERS:
    pytest.skip("transformers is not installed (it is in requirements-dev.txt)", allow_module_level=True)
tokenizers = pytest.importorskip("tokenizers")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    # name: (config class, config fields)
    "llama2": ("LlamaConfig", dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3.1": ("LlamaConfig", dict(SMALL, rope_parameters=LLAMA3_ROPE, bos_token_id=0, eos_token_id=[1, 2])),
    "llama3.2-tied": ("LlamaConfig", dict(SMALL, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "tinyllama-gqa": ("LlamaConfig", dict(SMALL, num_attention_heads=8, num_key_value_heads=1)),
    "smollm-head-dim": ("LlamaConfig", dict(SMALL, head_dim=32, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "llama-linear": ("LlamaConfig", dict(SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                 "factor": 4.0})),
    "llama-yarn": ("LlamaConfig", dict(SMALL, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                               "factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-attention-bias": ("LlamaConfig", dict(SMALL, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(SMALL, sliding_window=4096,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-tied": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True)),
}


PROMPT = [(37 * i + 11) % 300 + 3 for i in range(100)]      # 100 positions: past the original 64
NEW_TOKENS = 20


def build_hf_models(out_dir: str, families: dict, prompt: list[int], new_tokens: int) -> dict:
    """Run by run_clean, where transformers can be imported: each family's transformers model
    with peaked random weights, saved as users have it in out_dir/<family>, and its references
    over prompt -> {family: {"logprobs": fp32 (T, V), "greedy": new_tokens token ids}}."""
    import torch
    import transformers
    refs = {}
    for family, (cls_name, fields) in families.items():
        cfg = getattr(transformers, cls_name)(**fields)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:            # large enough that greedy tokens have no near-ties
                    p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
                elif name.endswith("bias"):
                    p.normal_(0, 0.5)
        model.save_pretrained(f"{out_dir}/{family}")
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)            # (T, V)
            greedy = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        refs[family] = {"logprobs": logprobs, "greedy": greedy}
    return refs


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> tuple[Path, dict]:
    """(directory of every family's checkpoint, the references build_hf_models computed)."""
    out = tmp_path_factory.mktemp("hf")
    return out, run_clean(build_hf_models, str(out), FAMILIES, PROMPT, NEW_TOKENS)


def save_hf_model(hf_models: tuple[Path, dict], path: Path, family: str) -> dict:
    """The family's transformers checkpoint, copied into path (tests change its files)
    -> its references."""
    out, refs = hf_models
    shutil.copytree(out / family, path, dirs_exist_ok=True)
    return refs[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(tmp_path, hf_models, family):
    ref = save_hf_model(hf_models, tmp_path, family)
    llm = LLM(tmp_path, device="cpu", dtype="float32", max_model_len=200)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                              prompt_logprobs=0))[0]
    ours = torch.tensor([out.prompt_logprobs[i][PROMPT[i]] for i in range(1, len(PROMPT))])
    theirs = ref["logprobs"][torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert (ours - theirs).abs().max() < 1e-4, family
    assert out.token_ids == ref["greedy"], family


def test_both_config_generations_load_the_same_network(tmp_path, hf_models):
    """transformers 5 writes rope_theta and its scaling inside rope_parameters; older configs
    have them at the top level (rope_scaling with "type"). Both give the same logits."""
    save_hf_model(hf_models, tmp_path / "new", "llama3.1")
    raw = json.loads((tmp_path / "new" / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    legacy = dict(raw, rope_theta=rope.pop("rope_theta"), rope_scaling=dict(rope, type=rope.pop("rope_type")))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(legacy))
    (tmp_path / "old" / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    ids = list(range(3, 120))
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    new = LLM(tmp_path / "new", device="cpu").generate(ids, p)[0].prompt_logprobs
    old = LLM(tmp_path / "old", device="cpu").generate(ids, p)[0].prompt_logprobs
    assert new == old
    assert nanoserve.ModelConfig.from_dir(tmp_path / "old").rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, hf_models, change, field):
    save_hf_model(hf_models, tmp_path, "llama2")
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, **change)))
    with pytest.raises(ValueError, match=field):
        LLM(tmp_path, device="cpu")


def test_a_sliding_window_shorter_than_the_context_caps_it_and_longer_asks_are_refused(tmp_path, hf_models):
    save_hf_model(hf_models, tmp_path, "mistral")
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, sliding_window=128)))
    assert LLM(tmp_path, device="cpu").engine.max_model_len == 128
    with pytest.raises(ValueError, match="sliding_window"):
        LLM(tmp_path, device="cpu", max_model_len=200)


# ----------------------------------------------------------------------------- tokenizer.json

def train_byte_level_bpe(path, vocab_size: int = 300) -> "tokenizers.Tokenizer":
    """A byte-level BPE (Llama 3 / Qwen2 style) trained here, with special tokens, saved as
    tokenizer.json plus the tokenizer_config.json that names its BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin|>", "<|end|>", "<|eot|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def add(a, b):\n    return a + b\n", "café naïve 東京 😀 emoji", "for i in range(10):\n    print(i)\n"] * 50
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin|>", "eos_token": "<|end|>"}))
    return tok


def test_tokenizer_json_loads_with_bos_eos_and_generation_config_eos_ids(tmp_path, hf_models):
    save_hf_model(hf_models, tmp_path, "qwen2")
    tok = train_byte_level_bpe(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    llm = LLM(tmp_path, device="cpu")
    t = llm.tokenizer
    assert isinstance(t, nanoserve.HFTokenizer) and t.bos_id == 0 and t.eos_ids == {1, 2}
    ids = t.encode("def add(a, b):")
    assert ids[0] == 0 and ids[1:] == tok.encode("def add(a, b):", add_special_tokens=False).ids
    assert t.decode(ids) == "def add(a, b):"                 # special tokens are not in the text
    out = llm.generate("for i in", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.prompt_token_ids == t.encode("for i in")
    # Both EOS ids stop generation: make the first greedy token EOS by listing it.
    first = out.token_ids[0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, first]}))
    stopped = LLM(tmp_path, device="cpu").generate("for i in", SamplingParams(temperature=0, max_tokens=12))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"


def test_streaming_detokenization_of_byte_level_bpe_with_split_characters(tmp_path):
    """Multi-byte characters (é, 東, 😀) span several byte-level tokens: the stream holds them
    back until complete, and the deltas join to the full decode."""
    tok = train_byte_level_bpe(tmp_path)
    t = nanoserve.HFTokenizer(tmp_path / "tokenizer.json", {"bos_token": "<|begin|>", "eos_token": "<|end|>"})
    text = "café 東京 😀 naïve emoji\n    return"
    ids = t.encode(text, bos=False)
    assert any("\ufffd" in t.decode([i]) for i in ids)        # some token is a partial character
    detok = nanoserve.IncrementalDetokenizer(t, t.encode("x = ", bos=True))
    deltas = [detok.step(i) for i in ids] + [detok.step(-1, final=True)]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert tok.decode(ids) == text


def test_a_directory_with_both_tokenizers_uses_tokenizer_json(tmp_path, hf_models):
    save_hf_model(hf_models, tmp_path, "llama2")
    train_byte_level_bpe(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not read")
    assert isinstance(LLM(tmp_path, device="cpu").tokenizer, nanoserve.HFTokenizer)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_a_quantized_qwen2_keeps_its_biases(tmp_path, hf_models, method):
    """q/k/v biases survive quantization (AWQ folds its scale into v_proj's bias too) and
    reload bit-exactly; int8 logprobs stay near fp32's, much nearer than without the biases
    (random weights of these peaked scales put int8 per channel within about 0.3)."""
    import quant
    save_hf_model(hf_models, tmp_path / "fp", "qwen2")
    llm = LLM(tmp_path / "fp", device="cpu")
    ids = [(7 * i) % 300 + 3 for i in range(60)]
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    ref = llm.generate(ids, p)[0].prompt_logprobs
    model = llm.engine.model
    calib = torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    cfg = quant.quantize_model(model, calib, method, 8, 0)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    quant.save_quantized(model, tmp_path / "fp", tmp_path / "q", cfg)
    q = LLM(tmp_path / "q", device="cpu")
    for name, t in model.state_dict().items():
        assert torch.equal(q.engine.model.state_dict()[name], t), name
    def error(out) -> float:
        return max(abs(out[i][ids[i]] - ref[i][ids[i]]) for i in range(1, len(ids)))
    with_biases = error(q.generate(ids, p)[0].prompt_logprobs)
    for layer in q.engine.model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.zero_()
    assert with_biases < 0.5 and error(q.generate(ids, p)[0].prompt_logprobs) > 3 * with_biases
