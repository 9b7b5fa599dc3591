"""Chunked prefill, mixed prefill+decode batches and prefix caching."""

import collections
import random

import pytest

import nanoserve
from nanoserve import LLM, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def check_block_invariants(llm: LLM) -> None:
    """Every block is either referenced or free, and ref counts equal the tables that hold it."""
    eng = llm.engine
    bm = eng.block_manager
    refs = collections.Counter(b for seq in eng.scheduler.running for b in seq.block_table)
    # ref_count equals refs everywhere: at the referenced blocks, and zero at all the others
    # (counted in C: the pool has tens of thousands of blocks and this runs after every step).
    assert all(bm.ref_count[b] == n for b, n in refs.items())
    assert bm.ref_count.count(0) == bm.num_blocks - len(refs)
    free = set(bm.free)
    assert len(free) == bm.num_blocks - len(refs) and free.isdisjoint(refs)
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h


def run_checked(llm: LLM, prompts, params) -> list[list[int]]:
    """generate(), stepping by hand so the block invariants are checked after every step."""
    eng = llm.engine
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        check_block_invariants(llm)
    return [done[i] for i in ids]


def shared_prefix_workload(vocab: int, n: int = 16, seed: int = 0):
    rng = random.Random(seed)
    system = [1] + [rng.randrange(3, vocab) for _ in range(90)]
    prompts = []
    for i in range(n):
        own = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 50))]
        prompts.append((system if i % 4 else system[:37]) + own)
    params = [SamplingParams(max_tokens=rng.randrange(3, 40), seed=i,
                             **(GREEDY if i % 2 == 0 else dict(temperature=0.8, ignore_eos=True)))
              for i in range(n)]
    return prompts, params


def test_outputs_identical_with_chunking_and_caching_on_or_off_and_under_eviction(model_dirs):
    for model_dir in model_dirs:
        vocab = nanoserve.ModelConfig.from_dir(model_dir).vocab_size
        prompts, params = shared_prefix_workload(vocab)
        results = {}
        for chunked in (False, True):
            for caching in (False, True):
                llm = LLM(model_dir, device="cpu", enable_chunked_prefill=chunked,
                          enable_prefix_caching=caching, block_size=8, max_model_len=256,
                          max_num_batched_tokens=256 if not chunked else 40)
                results[chunked, caching] = run_checked(llm, prompts, params)
        # A pool of 40 blocks x 8 tokens: cached blocks are evicted and sequences preempted.
        tight = LLM(model_dir, device="cpu", block_size=8, num_blocks=40, max_model_len=256,
                    max_num_batched_tokens=40)
        results["tight"] = run_checked(tight, prompts, params)
        assert tight.stats()["preemptions"] > 0
        assert tight.stats()["prefix_cache_hit_rate"] > 0
        ref = results[False, False]
        for key, got in results.items():
            assert got == ref, (model_dir, key)
        assert tight.stats()["kv_blocks_free"] == 40


def test_second_request_with_shared_200_token_prefix_prefills_only_its_suffix(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", block_size=16)
    prefix = [1] + list(range(3, 202))                       # 200 tokens
    first = llm.generate(prefix + [210, 211, 212], SamplingParams(max_tokens=5, **GREEDY))[0]
    eng = llm.engine
    eng.add_request(prefix + [220, 221, 222, 223, 224], SamplingParams(max_tokens=5, **GREEDY))
    scheduled = eng.scheduler.schedule()                     # look at what the step would compute
    (seq, n), = scheduled.items()
    assert seq.num_computed == 192                            # 12 full blocks of the prefix hit
    assert n == 205 - 192                                     # only the suffix is prefilled
    eng.abort(seq.request_id)                                 # and compare with a real run:
    second = llm.generate(prefix + [220, 221, 222, 223, 224], SamplingParams(max_tokens=5, **GREEDY))[0]
    assert second.metrics["num_cached_prompt_tokens"] == 192
    cold = LLM(tiny_model_dir, device="cpu", enable_prefix_caching=False)
    assert second.token_ids == cold.generate(prefix + [220, 221, 222, 223, 224],
                                             SamplingParams(max_tokens=5, **GREEDY))[0].token_ids
    # Prompts counted: 203 (no hit), 205 (aborted above, 192 hit), 205 (192 hit).
    assert llm.stats()["prefix_cache_hit_rate"] == pytest.approx(2 * 192 / (203 + 205 + 205))
    assert first.metrics["num_cached_prompt_tokens"] == 0


def test_fully_cached_prompt_still_computes_its_last_token(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", block_size=16)
    prompt = list(range(3, 35))                              # exactly 2 blocks
    a = llm.generate(prompt, SamplingParams(max_tokens=4, **GREEDY))[0]
    b = llm.generate(prompt, SamplingParams(max_tokens=4, **GREEDY))[0]
    assert b.metrics["num_cached_prompt_tokens"] == 16 and a.token_ids == b.token_ids


def test_shared_blocks_are_never_freed_while_read(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", block_size=4, num_blocks=200)
    eng = llm.engine
    prefix = list(range(3, 43))                               # 10 full blocks
    eng.add_request(prefix + [50], SamplingParams(max_tokens=3, **GREEDY))
    while eng.has_unfinished():
        eng.step()
    a = eng.add_request(prefix + [60], SamplingParams(max_tokens=30, **GREEDY))
    b = eng.add_request(prefix + [61], SamplingParams(max_tokens=2, **GREEDY))
    eng.step()
    sa, sb = eng.requests[a], eng.requests[b]
    shared = sa.block_table[:10]
    assert shared == sb.block_table[:10]
    assert all(eng.block_manager.ref_count[x] == 2 for x in shared)
    while eng.requests.get(b):                                # b finishes first
        eng.step()
    assert all(eng.block_manager.ref_count[x] == 1 for x in shared)
    assert not set(shared) & set(eng.block_manager.free)      # still held by a
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_free == 200


def test_cached_blocks_are_evicted_least_recently_used_first(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", block_size=4, num_blocks=20, max_model_len=64)
    old = list(range(3, 23))
    new = list(range(100, 120))
    llm.generate(old, SamplingParams(max_tokens=1, **GREEDY))
    llm.generate(new, SamplingParams(max_tokens=1, **GREEDY))
    bm = llm.engine.block_manager
    assert len(bm.match_prefix(old + [0])) == 5 and len(bm.match_prefix(new + [0])) == 5
    # 13 more blocks: the 10 never used, then cached ones, the older prompt's first, tail first.
    llm.generate(list(range(200, 250)), SamplingParams(max_tokens=1, **GREEDY))
    assert len(bm.match_prefix(old + [0])) == 2
    assert len(bm.match_prefix(new + [0])) == 5


def test_a_step_mixes_decodes_and_a_prefill_chunk_and_decodes_go_first(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", max_num_batched_tokens=32, max_model_len=400)
    eng = llm.engine
    for i in range(4):
        eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=50, **GREEDY))
    eng.step()                                                # 4 short prefills
    eng.add_request(list(range(3, 300)), SamplingParams(max_tokens=2, **GREEDY))
    chunks = []
    while len(chunks) < 5:
        scheduled = eng.scheduler.schedule()
        decodes = [n for s, n in scheduled.items() if s.num_computed + n >= s.num_tokens and n == 1]
        prefill = [n for s, n in scheduled.items() if s.num_tokens - s.num_computed > 1]
        assert len(decodes) == 4                              # every step keeps decoding
        assert sum(scheduled.values()) <= 32
        chunks += prefill
        # run the step that was scheduled
        eng.scheduler.schedule = lambda sched=scheduled: sched
        eng.step()
        del eng.scheduler.schedule
    assert chunks == [28] * 5                                  # the rest of the budget
