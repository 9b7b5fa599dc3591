"""Model cascade: the small model answers, unsure answers go to the large one."""

import math

import pytest

import nanoserve
from nanoserve import LLM, Cascade, SamplingParams
from server import make_server

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
            assert out.output.token_ids == alone["large" if out.escalated else "small"][i].token_ids
            assert out.output.logprobs is None                 # not asked for, not returned
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


def test_n_samples_escalate_on_the_least_confident_one_and_vocabularies_must_match(pair, tiny_model_dir):
    small, large = pair
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=5)
    scored = small.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=5, logprobs=0))
    for out, s in zip(Cascade(small, large, 0).generate(PROMPTS[:2], params), scored):
        per_sample = [sum(math.exp(lp[t]) for t, lp in zip(c.token_ids, c.logprobs)) / len(c.token_ids)
                      for c in s.outputs]
        assert len(per_sample) == 3 and out.confidence == pytest.approx(min(per_sample), abs=1e-6)
        assert all(c.logprobs is None for c in out.output.outputs)
    other = LLM(tiny_model_dir, device="cpu")                    # not the pair's 2048 tokens
    with pytest.raises(ValueError, match="vocabulary"):
        Cascade(other, large, 0.5)


def test_server_serves_the_cascade_and_counts_escalations(pair):
    """--cascade-small: every answer, plain or streamed, is the one the library's Cascade
    gives (the small model's or, escalated, the large model's), says which in its
    `cascade` field, and /metrics counts the requests and the escalations."""
    import json
    import threading
    from test_server import completion, request, stream
    small, large = pair
    scored = small.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, logprobs=0))
    mean = sorted(sum(math.exp(lp[t]) for t, lp in zip(o.token_ids, o.logprobs)) / len(o.token_ids) for o in scored)
    cascade = Cascade(small, large, mean[len(mean) // 2])
    want = cascade.generate(PROMPTS, GREEDY)
    assert 0 < sum(o.escalated for o in want) < len(want)
    server = make_server(cascade, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for prompt, w in zip(PROMPTS, want):
            status, body = completion(port, prompt=prompt, max_tokens=10, temperature=0)
            assert status == 200 and body["choices"][0]["text"] == w.output.text
            assert body["cascade"]["escalated"] == w.escalated
            assert body["cascade"]["confidence"] == pytest.approx(w.confidence, abs=1e-6)
            assert body["model"] == "nanocoder-5m" and body["usage"]["completion_tokens"] == len(w.output.token_ids)
            chunks = stream(port, prompt=prompt, max_tokens=10, temperature=0)
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == w.output.text
            assert chunks[-1]["cascade"]["escalated"] == w.escalated
        status, text = request(port, "GET", "/metrics")
        metrics = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert int(metrics["nanoserve_cascade_requests_total"]) == 2 * len(PROMPTS)
        assert int(metrics["nanoserve_cascade_escalated_total"]) == 2 * sum(o.escalated for o in want)
        status, body = completion(port, prompt="x", max_tokens=10 ** 6)     # checked against both models
        assert status == 400 and json.loads(json.dumps(body))["error"]["param"] == "max_tokens"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_cascade_flags(capsys):
    args = ["--prompt", "def main(", "--max-tokens", "6", "--temperature", "0", "--cascade-small", str(nanoserve.DEFAULT_DRAFT)]
    assert nanoserve.main(args) == 2
    assert "--cascade-small DIR and --cascade-threshold T go together" in capsys.readouterr().err
    assert nanoserve.main(args + ["--cascade-threshold", "-1"]) == 2
    assert "--cascade-threshold must be" in capsys.readouterr().err
    assert nanoserve.main(args + ["--cascade-threshold", "1.5"]) == 0
    out, err = capsys.readouterr()
    assert "answered by the large model" in err
    assert out.strip() == LLM(nanoserve.DEFAULT_MODEL, device="cpu").generate(["def main("], SamplingParams(
        temperature=0, max_tokens=6))[0].text.strip()
