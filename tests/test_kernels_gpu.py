"""CUDA kernels against their PyTorch twins, and the engine on CUDA against the CPU path.

Skipped without a GPU (CI has none); run them on a GPU machine."""

import pytest
import torch

import kernels
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
