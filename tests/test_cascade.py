"""Model cascade: the small model answers, unsure answers go to the large one."""

import math

import pytest

import nanoserve
from nanoserve import LLM, Cascade, SamplingParams

PROMPTS = ["import os\n", "def main(", "class Stack:\n    def push(self, x):\n", "for i in range(", "x = ["]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def pair():
    return LLM(nanoserve.DEFAULT_DRAFT, device="cpu"), LLM(nanoserve.DEFAULT_MODEL, device="cpu")


def test_threshold_routes_each_request_to_the_model_that_answers_it(pair):
    small, large = pair
    alone = {"small": small.generate(PROMPTS, GREEDY), "large": large.generate(PROMPTS, GREEDY)}
    scored = small.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, logprobs=0))
    mean = [sum(math.exp(lp[t]) for t, lp in zip(o.token_ids, o.logprobs)) / len(o.token_ids) for o in scored]
    lowest = [min(math.exp(lp[t]) for t, lp in zip(o.token_ids, o.logprobs)) for o in scored]
    middle = sorted(mean)[len(mean) // 2]                      # escalates the requests below the median
    for threshold, confidence, want in ((0.0, "mean", mean), (1.01, "mean", mean), (middle, "mean", mean),
                                        (middle, "min", lowest)):
        c = Cascade(small, large, threshold, confidence)
        outs = c.generate(PROMPTS, GREEDY)
        for i, out in enumerate(outs):
            assert out.confidence == pytest.approx(want[i], abs=1e-6)
            assert out.escalated == (want[i] < threshold)
            assert out.token_ids == alone["large" if out.escalated else "small"][i].token_ids
            assert out.logprobs is None                        # not asked for, not returned
        assert c.num_escalated == sum(w < threshold for w in want) and c.num_requests == len(PROMPTS)
    assert not any(o.escalated for o in Cascade(small, large, 0).generate(PROMPTS, GREEDY))
    assert all(o.escalated for o in Cascade(small, large, 1.01).generate(PROMPTS, GREEDY))
    assert 0 < sum(m < middle for m in mean) < len(mean)       # the middle threshold splits the batch
    assert all(lo <= m + 1e-9 for lo, m in zip(lowest, mean))


def test_bad_cascade_arguments_are_refused_by_name(pair):
    small, large = pair
    for bad in (-0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            Cascade(small, large, bad)
    with pytest.raises(ValueError, match="confidence"):
        Cascade(small, large, 0.5, confidence="max")
    with pytest.raises(ValueError, match="sampling_params"):
        Cascade(small, large, 0.5).generate(PROMPTS, [GREEDY])
