"""Parallel sampling (n, best_of): the samples of a prompt share its KV blocks (prefilled
once, ref-counted), and each gets its own block from the first one it writes to a shared
block (copy-on-write), as PagedAttention does."""

import json
import threading

import pytest

import nanoserve
from nanoserve import LLM, SamplingParams
from server import make_server
from conftest import TINY_CONFIG, write_random_checkpoint

PROMPT = [1] + [(11 * i + 7) % 290 + 3 for i in range(37)]          # 38 tokens: a partly filled block


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("par") / "m", TINY_CONFIG)


def derived_seed(seed: int, i: int) -> int:
    """Sample i's seed (engine rule; sample 0 keeps the request's)."""
    return seed if i == 0 else (seed * 1_000_003 + i) % nanoserve.INT64_MAX


def test_each_sample_equals_the_same_request_alone_with_its_seed(model_dir):
    """If a sample wrote into another's KV (no copy-on-write), its tokens would change."""
    llm = LLM(model_dir, device="cpu", block_size=16)
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30, n=4, seed=11, ignore_eos=True)
    out = llm.generate(PROMPT, p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and out.finished
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4                 # they differ
    for i, c in enumerate(out.outputs):
        alone = LLM(model_dir, device="cpu", block_size=16).generate(
            PROMPT, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30, seed=derived_seed(11, i),
                                   ignore_eos=True))[0]
        assert c.token_ids == alone.token_ids, i
    assert out.token_ids == out.outputs[0].token_ids
    st = llm.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"] and llm.engine.block_manager.ref_count == [0] * llm.engine.num_blocks


def test_samples_share_the_prompt_blocks(model_dir):
    """n = 8 on a 200-token prompt: the prompt's 13 blocks are held once, not 8 times."""
    prompt = [1] + [(7 * i) % 290 + 3 for i in range(199)]
    p = dict(temperature=1.0, max_tokens=8, seed=0, ignore_eos=True)
    one = LLM(model_dir, device="cpu", block_size=16, enable_prefix_caching=False)
    one.generate(prompt, SamplingParams(**p))
    eight = LLM(model_dir, device="cpu", block_size=16, enable_prefix_caching=False)
    eng = eight.engine
    copies = []
    take = eng.scheduler.take_block_copies
    eng.scheduler.take_block_copies = lambda: (copies.append(c := take()), c)[1]
    out = eight.generate(prompt, SamplingParams(n=8, **p))[0]
    assert len(out.outputs) == 8
    single, shared = one.stats()["kv_blocks_peak"], eight.stats()["kv_blocks_peak"]
    assert single == 13 and shared <= single + 8                 # 8 x 13 = 104 without sharing
    assert sum(map(len, copies)) == 7                            # the partly filled block, copied by 7 samples
    assert eight.stats()["kv_blocks_free"] == eight.stats()["kv_blocks_total"]


def test_greedy_samples_agree_under_preemption(model_dir):
    ref = LLM(model_dir, device="cpu").generate(PROMPT, SamplingParams(temperature=0, max_tokens=40,
                                                                          ignore_eos=True))[0].token_ids
    small = LLM(model_dir, device="cpu", num_blocks=40, block_size=4, max_model_len=100, max_num_batched_tokens=32)
    outs = small.generate([PROMPT, PROMPT[:20]], SamplingParams(temperature=0, max_tokens=40, n=5, ignore_eos=True))
    assert small.stats()["preemptions"] > 0
    assert all(c.token_ids == ref for c in outs[0].outputs)
    assert small.engine.block_manager.ref_count == [0] * 40


def test_best_of_returns_the_n_most_likely_samples(model_dir):
    llm = LLM(model_dir, device="cpu")
    p = dict(temperature=1.0, max_tokens=12, seed=5, ignore_eos=True, logprobs=0)
    every = llm.generate(PROMPT, SamplingParams(n=6, **p))[0].outputs
    best = llm.generate(PROMPT, SamplingParams(n=2, best_of=6, **p))[0].outputs
    ranked = sorted(every, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    for c in every:                          # cumulative logprob: the sum of the chosen tokens' logprobs
        assert c.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(c.token_ids, c.logprobs)), abs=1e-4)


def test_server_n_choices_plain_streamed_and_through_the_openai_client(model_dir):
    openai = pytest.importorskip("openai")
    llm = LLM(model_dir, device="cpu", max_model_len=128)
    server = make_server(llm, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        import http.client
        body = {"prompt": PROMPT, "max_tokens": 10, "n": 3, "temperature": 1.0, "seed": 2, "ignore_eos": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(body))
        plain = json.loads(conn.getresponse().read())
        assert [c["index"] for c in plain["choices"]] == [0, 1, 2] and plain["usage"]["completion_tokens"] == 30
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)))
        texts = ["", "", ""]
        for line in conn.getresponse().read().decode().split("\n\n"):
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["text"]
        assert texts == [c["text"] for c in plain["choices"]]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=10, n=3, temperature=1.0,
                                      seed=2, extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == texts
    finally:
        server.shutdown()
        server.server_close()
    st = llm.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"]
