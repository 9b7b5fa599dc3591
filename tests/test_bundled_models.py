"""The bundled model pair: present, small, runnable out of the box, and the draft distilled."""

import json
import re
import subprocess
import sys
import time

import pytest

import nanoserve
from nanoserve import LLM, SamplingParams
from conftest import ROOT

MODELS = ROOT / "models"


def test_bundled_models_are_small_hf_checkpoints():
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024
    for d, lo, hi in ((nanoserve.DEFAULT_MODEL, 4e6, 6e6), (nanoserve.DEFAULT_DRAFT, 0.8e6, 1.3e6)):
        for f in ("config.json", "model.safetensors", "tokenizer.model"):
            assert (d / f).is_file()
        n = sum(t.numel() for t in nanoserve.load_checkpoint(d).values())
        assert lo <= n <= hi, (d, n)
    target = json.loads((nanoserve.DEFAULT_MODEL / "config.json").read_text())
    assert target["num_attention_heads"] > target["num_key_value_heads"]          # GQA
    assert (nanoserve.DEFAULT_MODEL / "tokenizer.model").read_bytes() == \
        (nanoserve.DEFAULT_DRAFT / "tokenizer.model").read_bytes()


def test_tokenizer_keeps_indentation_and_newlines():
    tok = nanoserve.Tokenizer(nanoserve.DEFAULT_MODEL / "tokenizer.model")
    src = "def f(x):\n\tif x:\n        return x  # é 😀\n\n"
    assert tok.decode(tok.encode(src)) == src


def test_cli_prints_python_looking_code_offline_within_seconds():
    t = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "nanoserve.py"), "--prompt", "def fibonacci(n):",
                        "--seed", "0", "--max-tokens", "80", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert time.time() - t < 60
    out = r.stdout
    assert len(out.strip()) > 40
    # Python-looking: indented lines and Python keywords or syntax.
    assert re.search(r"\n( {4}|\t)\S", out)
    assert re.search(r"\b(return|if|for|def|self|import|in|is|None)\b|[=():]", out)
    assert "TTFT" in r.stderr and "tok/s" in r.stderr


def test_distilled_draft_is_accepted_more_often_than_the_undistilled_one():
    """Measured in the engine (greedy, k = 4) on prompts from the held-out style of code."""
    prompts = ["def main():\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self",
               "    for i in range(", "if __name__ == '__main__':\n"]
    p = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    rates = {}
    for name in ("nanocoder-1m-draft", "nanocoder-1m-nokd"):
        llm = LLM(nanoserve.DEFAULT_MODEL, device="cpu", draft_model=MODELS / name, num_speculative_tokens=4)
        llm.generate(prompts, p)
        rates[name] = llm.stats()["spec_acceptance_rate"]
    assert rates["nanocoder-1m-draft"] > rates["nanocoder-1m-nokd"], rates


@pytest.mark.parametrize("seed", [0])
def test_training_is_deterministic_given_a_seed(tmp_path, seed):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "train_tiny.py"), "--out", str(out), "--seed",
                            str(seed), "--target-steps", "2", "--draft-steps", "2", "--batch", "2",
                            "--eval-windows", "2"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        runs.append([(out / m / "model.safetensors").read_bytes() for m in
                     ("nanocoder-5m", "nanocoder-1m-draft", "nanocoder-1m-nokd")])
    assert runs[0] == runs[1]
