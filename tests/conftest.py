"""Shared fixtures. Data under ../shared is read in place; tests that need it skip without it."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nanoserve  # noqa: E402

SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
LLAMA2_TOKENIZER = SHARED / "models" / "tokenizers" / "llama2" / "tokenizer.model"

needs_stories = pytest.mark.skipif(
    not (STORIES / "model.safetensors").is_file(),
    reason="../shared/models/stories260K is not beside this checkout (only in the project's CI)")
needs_llama2_tokenizer = pytest.mark.skipif(
    not LLAMA2_TOKENIZER.is_file(),
    reason="../shared/models/tokenizers/llama2/tokenizer.model is not beside this checkout")


def write_random_checkpoint(path: Path, config: dict, seed: int = 0, shards: int = 1,
                            std: float = 0.5) -> Path:
    """A Hugging Face-layout checkpoint with random weights (optionally sharded)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    cfg = nanoserve.ModelConfig.from_dir(path)
    torch.manual_seed(seed)
    model = nanoserve.LlamaForCausalLM(cfg)
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        # Scaled so that logits are peaked (greedy has no near-ties), as in a trained model.
        state[k] = torch.ones_like(v) if v.dim() == 1 else torch.randn_like(v) * std / v.shape[-1] ** 0.5 * 4
    save_weights(state, path, shards)
    return path


def save_weights(state: dict, path: Path, shards: int = 1) -> None:
    """model.safetensors, or `shards` files with the Hugging Face index."""
    names = list(state)
    if shards == 1:
        nanoserve.save_safetensors(state, path / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        nanoserve.save_safetensors({k: state[k] for k in part}, path / fname)
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


TINY_CONFIG = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
                   rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_CONFIG, shards=2)


@pytest.fixture(scope="session")
def model_dirs(tiny_model_dir) -> list[Path]:
    """Every model the engine tests run on: the shared trained one when present, the bundled one, a random one."""
    dirs = [tiny_model_dir]
    if (STORIES / "model.safetensors").is_file():
        dirs.append(STORIES)
    if (nanoserve.DEFAULT_MODEL / "model.safetensors").is_file():
        dirs.append(nanoserve.DEFAULT_MODEL)
    return dirs


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path | None]:
    """(model dir, tokenizer path or None) of a model with a tokenizer: the bundled model when
    present, else a random one with Llama 2's tokenizer; skips when neither is here."""
    if (nanoserve.DEFAULT_MODEL / "model.safetensors").is_file():
        return nanoserve.DEFAULT_MODEL, None
    if LLAMA2_TOKENIZER.is_file():
        cfg = dict(TINY_CONFIG, vocab_size=32000, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
        return write_random_checkpoint(tmp_path_factory.mktemp("tok") / "m", cfg), LLAMA2_TOKENIZER
    pytest.skip("no model with a tokenizer: neither models/ nor ../shared is here")
