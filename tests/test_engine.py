"""The core engine: model correctness, paged KV cache, continuous batching, API, CLI."""

import collections
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
import nanoserve
from nanoserve import LLM, SamplingParams
from conftest import ROOT, STORIES, TINY_CONFIG, needs_stories, write_random_checkpoint


# ----------------------------------------------------------------------------- model

@needs_stories
def test_greedy_matches_llama2c_reference():
    golden = json.loads((STORIES / "golden_greedy.json").read_text())
    llm = LLM(STORIES, device="cpu", dtype="float32")
    for case in golden["cases"]:
        params = SamplingParams(temperature=0, max_tokens=len(case["greedy_ids"]), ignore_eos=True)
        out = llm.generate(case["prompt_ids"], params)[0]
        assert out.token_ids == case["greedy_ids"]


def dense_logits(model: nanoserve.LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """The same network with plain causal attention and no cache: the oracle for paging."""
    cfg = model.config
    x = model.model.embed_tokens(torch.tensor(ids))
    pos = torch.arange(len(ids))
    cos, sin = kernels.rope_cos_sin(cfg.head_dim, len(ids), cfg.rope_theta)
    for layer in model.model.layers:
        a = layer.self_attn
        h = kernels.rms_norm_ref(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = a.q_proj(h).view(len(ids), a.n_heads, a.head_dim)
        k = a.k_proj(h).view(len(ids), a.n_kv, a.head_dim)
        v = a.v_proj(h).view(len(ids), a.n_kv, a.head_dim)
        q, k = kernels.rotary_embedding_ref(q, k, pos, cos, sin)
        rep = a.n_heads // a.n_kv
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                                           v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True)
        x = x + a.o_proj(o.transpose(0, 1).reshape(len(ids), -1))
        h = kernels.rms_norm_ref(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        x = x + layer.mlp(h)
    x = kernels.rms_norm_ref(x, model.model.norm.weight, cfg.rms_norm_eps)
    return model.lm_head(x).float()


def test_prompt_logprobs_match_dense_forward(model_dirs):
    for model_dir in model_dirs:
        llm = LLM(model_dir, device="cpu", block_size=4, max_num_batched_tokens=16)
        vocab = llm.engine.model_config.vocab_size
        ids = [1] + [random.Random(3).randrange(3, vocab) for _ in range(40)]
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=1,
                                               ignore_eos=True))[0]
        with torch.inference_mode():
            ref = dense_logits(llm.engine.model, ids + out.token_ids).log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for i in range(1, len(ids)):
            d = out.prompt_logprobs[i]
            assert ids[i] in d and len(d) <= 3
            assert d[ids[i]] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
            top2 = ref[i - 1].topk(2).indices.tolist()
            assert set(top2) <= set(d)
        for j, t in enumerate(out.token_ids):        # generated logprobs: sampled + top 1
            assert out.logprobs[j][t] == pytest.approx(ref[len(ids) - 1 + j, t].item(), abs=1e-4)
            assert t == ref[len(ids) - 1 + j].argmax().item()     # greedy


def test_prompt_logprobs_survive_preemption(tiny_model_dir):
    prompts = [list(range(3 + i, 60 + i)) for i in range(6)]
    p = SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=1, ignore_eos=True)
    ref = [o.prompt_logprobs for o in LLM(tiny_model_dir, device="cpu").generate(prompts, p)]
    small = LLM(tiny_model_dir, device="cpu", num_blocks=30, block_size=4, max_model_len=100,
                max_num_batched_tokens=24)
    outs = small.generate(prompts, p)
    assert small.stats()["preemptions"] > 0
    for o, r in zip(outs, ref):
        assert len(o.prompt_logprobs) == len(r) == 57
        for a, b in zip(o.prompt_logprobs[1:], r[1:]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_configs_of_real_models_build_with_expected_sizes(tmp_path):
    shapes = {  # config.json fields as published; expected parameter counts
        "tinyllama-1.1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                max_position_embeddings=2048, rms_norm_eps=1e-5, model_type="llama",
                                torch_dtype="bfloat16"), 1.100e9),
        "llama-2-7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                            max_position_embeddings=4096, rms_norm_eps=1e-5, model_type="llama"), 6.738e9),
        "mistral-7b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                            max_position_embeddings=32768, rope_theta=1e6, sliding_window=4096,
                            model_type="mistral", architectures=["MistralForCausalLM"]), 7.242e9),
    }
    for name, (cfg, params) in shapes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        mc = nanoserve.ModelConfig.from_dir(tmp_path / name)
        with torch.device("meta"):
            model = nanoserve.LlamaForCausalLM(mc)
        n = sum(p.numel() for p in model.parameters())
        assert n == pytest.approx(params, rel=2e-3), name


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, True), (8, 1, False), (6, 2, False)])
def test_mha_mqa_gqa_and_tied_embeddings_match_dense(tmp_path, heads, kv_heads, tied):
    cfg = dict(TINY_CONFIG, num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=48,
               tie_word_embeddings=tied, head_dim=16, rope_theta=500000.0)
    d = write_random_checkpoint(tmp_path / "m", cfg)
    llm = LLM(d, device="cpu", block_size=16)
    ids = list(range(5, 42))
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = dense_logits(llm.engine.model, ids + out.token_ids)
    assert out.token_ids == ref[len(ids) - 1:-1].argmax(-1).tolist()
    if tied:
        assert llm.engine.model.lm_head.weight.data_ptr() == llm.engine.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logprobs_close_to_fp32(tiny_model_dir, dtype):
    ids = list(range(10, 60))
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    ref = LLM(tiny_model_dir, device="cpu").generate(ids, p)[0].prompt_logprobs
    out = LLM(tiny_model_dir, device="cpu", dtype=dtype).generate(ids, p)[0].prompt_logprobs
    err = max(abs(out[i][ids[i]] - ref[i][ids[i]]) for i in range(1, len(ids)))
    assert err < 0.15        # 8 (bf16) or 11 (fp16) mantissa bits through 2 layers


# ----------------------------------------------------------------------------- paged attention

@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [1, 16])
def test_paged_attention_reference_equals_dense_causal(group, block_size):
    torch.manual_seed(group * 100 + block_size)
    n_kv, hd = 2, 16
    n_heads = n_kv * group
    # (context length, new queries): decodes, a whole prompt, chunks ending mid-block.
    seqs = [(37, 1), (5, 5), (50, 13), (1, 1), (33, 33), (70, 1)]
    num_blocks = sum((c + block_size - 1) // block_size for c, _ in seqs) + 3
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd)
    free = torch.randperm(num_blocks).tolist()                  # scattered, non-contiguous blocks
    tables, ks, vs, qs = [], [], [], []
    for ctx, _ in seqs:
        nb = (ctx + block_size - 1) // block_size
        tables.append([free.pop() for _ in range(nb)])
        k, v = torch.randn(ctx, n_kv, hd), torch.randn(ctx, n_kv, hd)
        slots = torch.tensor([tables[-1][p // block_size] * block_size + p % block_size for p in range(ctx)])
        kernels.reshape_and_cache_ref(k, v, k_cache, v_cache, slots)
        ks.append(k), vs.append(v)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = [0]
    for _, n in seqs:
        qs.append(torch.randn(n, n_heads, hd))
        starts.append(starts[-1] + n)
    out = kernels.paged_attention_ref(torch.cat(qs), k_cache, v_cache, bt, torch.tensor(starts),
                                      torch.tensor([c for c, _ in seqs]), hd ** -0.5)
    for i, (ctx, n) in enumerate(seqs):
        # Dense reference: the n queries are the last n positions of a ctx-long sequence.
        q = qs[i].transpose(0, 1)                                          # (H, n, hd)
        k = ks[i].repeat_interleave(group, 1).transpose(0, 1)              # (H, ctx, hd)
        v = vs[i].repeat_interleave(group, 1).transpose(0, 1)
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]], ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- continuous batching

def _workload(vocab: int, n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 70))] for _ in range(n)]
    params = [SamplingParams(temperature=0 if i % 2 == 0 else 0.9, top_p=0.95 if i % 3 else 1.0,
                             seed=1000 + i, max_tokens=rng.randrange(4, 60), ignore_eos=True)
              for i in range(n)]
    return prompts, params


def test_batched_equals_sequential_under_preemption(model_dirs):
    for model_dir in model_dirs:
        llm = LLM(model_dir, device="cpu")
        prompts, params = _workload(llm.engine.model_config.vocab_size, 20)
        alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
        # A pool of 40 blocks of 4 tokens cannot hold 20 sequences of up to 130 tokens.
        small = LLM(model_dir, device="cpu", num_blocks=40, block_size=4, max_model_len=150,
                    max_num_batched_tokens=64)
        outs = small.generate(prompts, params)
        assert [o.token_ids for o in outs] == alone, model_dir
        stats = small.stats()
        assert stats["preemptions"] > 0
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 40
        assert small.engine.block_manager.ref_count == [0] * 40


def _served_through_the_graph_paths(model_dir, piecewise: bool):
    """20 requests in a pool of 40 blocks of 4 tokens (preemption, chunked prefill), served
    plainly and through the graph paths, run eagerly on the CPU (what a CUDA device turns
    on) -> (the plain tokens, the graphed tokens, the graphed engine)."""
    kw = dict(device="cpu", num_blocks=40, block_size=4, max_model_len=150, max_num_batched_tokens=64,
              max_num_seqs=12)
    plain = LLM(model_dir, **kw)
    prompts, params = _workload(plain.engine.model_config.vocab_size, 20)
    ref = [o.token_ids for o in plain.generate(prompts, params)]
    graphed = LLM(model_dir, **kw)
    eng = graphed.engine
    eng.runner.use_graphs, eng.runner.use_piecewise_graphs = True, piecewise
    got = [o.token_ids for o in graphed.generate(prompts, params)]
    assert eng.block_manager.ref_count == [0] * 40 and graphed.stats()["preemptions"] > 0
    return ref, got, eng


def test_decode_graph_path_pads_to_buckets_and_matches_eager(model_dirs):
    """The CUDA-graph decode path (static buffers, batches padded up to a bucket with
    slot -1 and empty contexts), run eagerly on the CPU, gives the plain path's tokens.
    The pool is small enough that its last slot is in use: a padding row that wrote
    there (slot -1 read as "the last slot") would corrupt a running sequence."""
    for model_dir in model_dirs:
        ref, got, eng = _served_through_the_graph_paths(model_dir, piecewise=False)
        assert got == ref, model_dir
        graphs = eng.runner.graphs
        assert graphs.buckets == [1, 2, 4, 8, 12] and not graphs.capture and graphs.steps > 0


def test_piecewise_graph_path_pads_to_buckets_and_matches_eager(model_dirs):
    """The piecewise-graph path for steps with prompt tokens (static buffers, steps padded up
    to a bucket of tokens with slot -1, attention run between the pieces), run eagerly on the
    CPU, gives the plain path's tokens: under chunked prefill, mixed steps and preemption,
    with the decode graph path beside it. A padding token whose slot still held a real
    token's from a longer step would overwrite that token's K/V."""
    for model_dir in model_dirs:
        ref, got, eng = _served_through_the_graph_paths(model_dir, piecewise=True)
        assert got == ref, model_dir
        pieces = eng.runner.piecewise
        assert pieces.buckets == sorted({3, 16, 32, 64, kernels.NORM_FOLD_MAX_ROWS} - {0}) and not pieces.capture
        assert pieces.steps > 0 and eng.runner.graphs.steps > 0


def test_block_table_counts_the_entries_nobody_changed():
    t = nanoserve.BlockTable([5, 6, 7])
    assert t == [5, 6, 7] and t.synced == 0
    t.synced = 3
    t.append(8)                                         # appending keeps what was copied
    assert t.synced == 3
    t[1] = 9                                            # copy-on-write
    assert t.synced == 1
    t.synced = 4
    del t[2:]                                           # truncation (speculative rollback)
    assert t == [5, 9] and t.synced == 2
    t[-1] = 4
    assert t.synced == 1
    t.clear()                                           # release (preemption)
    assert t.synced == 0
    bm = nanoserve.BlockManager(8, 4, True)
    table = nanoserve.BlockTable()
    bm.allocate(table, 10)
    assert isinstance(bm.fork(table), nanoserve.BlockTable)


def test_graph_rows_hold_each_table_after_every_kind_of_change(tiny_model_dir):
    """What the decode graph's block-table buffer holds after steps whose tables were
    appended to, copied on write, truncated, cleared and regrown, or moved to another row:
    exactly each table (the columns it uses), although only changed entries are copied."""
    eng = LLM(tiny_model_dir, device="cpu", num_blocks=64, block_size=4, max_model_len=64).engine
    graphs = nanoserve.DecodeGraphs(eng.model, eng.runner.kv_cache, 8, 16, 64, capture=False)

    def run_and_check(batch):
        n = len(batch)
        graphs.run([0] * n, [len(b) * 4 - 1 for b in batch], [-1] * n, batch)   # slot -1: no cache write
        for row, b in enumerate(batch):
            assert graphs.block_tables[row, :len(b)].tolist() == b, (row, b)

    a, b = nanoserve.BlockTable([1, 2, 3, 4]), nanoserve.BlockTable([5, 6])
    run_and_check([a, b])
    del a[2:]                                   # a lookahead given back, then a new block
    a.append(7)
    b[0] = 8                                    # copy-on-write
    run_and_check([a, b])
    a.clear()                                   # preempted, readmitted with other blocks
    a += [9, 10, 11, 12, 13]
    run_and_check([a, b])
    run_and_check([b, a])                       # rows swapped
    rng = random.Random(0)
    tables = [nanoserve.BlockTable(rng.sample(range(64), rng.randrange(1, 6))) for _ in range(5)]
    for step in range(300):
        for _ in range(rng.randrange(1, 4)):     # several changes between two steps
            t, change = rng.choice(tables), rng.randrange(6)
            if change <= 1 and len(t) < 16:
                t.append(rng.randrange(64))
            elif change == 2 and len(t) > 1:
                t[rng.randrange(len(t))] = rng.randrange(64)
            elif change == 3 and len(t) > 1:
                del t[rng.randrange(1, len(t)):]
            elif change == 4:
                t.clear()
                t += rng.sample(range(64), rng.randrange(1, 6))
            elif change == 5 and rng.random() < 0.3:
                tables.insert(0, tables.pop())
        run_and_check(tables[:rng.choice([5, 5, 5, 3])])


def test_graph_path_copies_changed_block_table_entries_only_and_matches_eager(model_dirs):
    """The decode graph path keeps each row's block table between steps and copies only the
    entries that changed. Under everything that changes a table other than by appending
    (copy-on-write of parallel samples' shared prompt block, speculative lookahead given
    back, preemption in a small pool), its tokens equal the plain path's."""
    model_dir = model_dirs[0]
    kw = dict(device="cpu", num_blocks=48, block_size=4, max_model_len=150, max_num_batched_tokens=64,
              max_num_seqs=12, speculative_method="ngram", num_speculative_tokens=2)
    prompts, params = _workload(LLM(model_dir, device="cpu").engine.model_config.vocab_size, 12, seed=1)
    params = [dataclasses.replace(p, n=2) if i % 3 == 0 else p for i, p in enumerate(params)]
    plain = LLM(model_dir, **kw)
    ref = [[c.token_ids for c in o.outputs] for o in plain.generate(prompts, params)]
    graphed = LLM(model_dir, **kw)
    eng = graphed.engine
    eng.runner.use_graphs = True
    assert [[c.token_ids for c in o.outputs] for o in graphed.generate(prompts, params)] == ref
    assert eng.runner.graphs.steps > 0 and graphed.stats()["preemptions"] > 0
    assert eng.block_manager.ref_count == [0] * 48


def test_decode_graphs_bucket_the_context_bound_for_the_split_count():
    """A decode graph fixes attention's Flash-Decoding grid for a bound on the context: the
    step takes the smallest power-of-two bucket (256 up to max_context_len) that holds its
    longest context (position + 1), so short contexts are not split as a long one is: into
    rounds of the block's loads (decode_min_part keys), not into 264 blocks' worth."""
    g = nanoserve.DecodeGraphs(None, torch.zeros(1), max_batch=12, max_blocks=400, max_context_len=5000,
                               capture=False)
    assert g.context_buckets == [256, 512, 1024, 2048, 4096, 5000]
    one_kv_head = dict(S=1, n_kv=1, group=8, head_dim=128, sm_count=132)       # 264 blocks wanted
    assert nanoserve.kernels.decode_partition(max_context=256, **one_kv_head) == 64             # 4 splits
    assert nanoserve.kernels.decode_partition(max_context=512, **one_kv_head) == 64             # 8
    assert nanoserve.kernels.decode_partition(max_context=256, **{**one_kv_head, "head_dim": 64}) == 128
    seen = []
    g._forward = lambda b, ctx: (g._spread(b), seen.append((b, ctx)), torch.zeros(b, 8))[2]
    for positions, want in (([10, 20, 30], (4, 256)), ([255], (1, 256)), ([256], (1, 512)), ([5, 511], (2, 512)),
                            ([5, 512], (2, 1024)), ([4095, 7], (2, 4096)), ([4999], (1, 5000))):
        tables = [[0] * (p // 16 + 1) for p in positions]
        out = g.run([1] * len(positions), positions, [0] * len(positions), tables)
        assert out.shape == (len(positions), 8) and seen[-1] == want, (positions, seen[-1])
        assert g.context_lens[:len(positions)].tolist() == [p + 1 for p in positions]


def test_split_counters_hold_every_decode_step_past_max_num_seqs(tiny_model_dir, monkeypatch):
    """Decode attention's split counters (AttentionMetadata.split_counters, one per sequence
    and KV head) hold every step's sequences, also when a request's samples (n) take the
    running batch past max_num_seqs: they join it after the request's admission."""
    seen = []
    forward = nanoserve.LlamaForCausalLM.forward

    def spy(self, ids, positions, kv_cache, meta):
        S = meta.query_start_loc.numel() - 1
        seen.append((S * self.config.num_key_value_heads, meta.split_counters.numel()))
        return forward(self, ids, positions, kv_cache, meta)

    monkeypatch.setattr(nanoserve.LlamaForCausalLM, "forward", spy)
    llm = LLM(tiny_model_dir, device="cpu", max_num_seqs=2)
    out = llm.generate([[1, 5, 9]], SamplingParams(n=6, max_tokens=5, temperature=1.0, ignore_eos=True, seed=3))
    assert len(out[0].outputs) == 6 and max(need for need, _ in seen) == 6 * 2
    assert all(need <= held for need, held in seen)


def test_decode_graphs_fill_in_pending_ids_inside_the_graph_and_past_its_buffer():
    """With async scheduling a decode's input is the previous step's sampled id, still on the
    device (-1 - its row): the graph's first kernels fill it in from a static copy of those
    ids; a step with more pending ids than that copy holds has them filled in before."""
    g = nanoserve.DecodeGraphs(None, torch.zeros(1), max_batch=1, max_blocks=4, max_context_len=64, capture=False)
    got = []
    g._forward = lambda b, ctx: (g._spread(b), got.append(g.input_ids[:b].tolist()), torch.zeros(b, 8))[2]
    pending = torch.arange(100, 200)                   # 100 sampled ids; the buffer holds 64
    g.run([-1 - 5], [3], [3], [[0]], pending)
    g.run([-1 - 70], [4], [4], [[0]], pending)
    g.run([7], [5], [5], [[0]])
    assert got == [[105], [170], [7]] and g.context_lens[:1].tolist() == [6]


def test_requests_join_and_leave_the_running_batch_every_step(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", max_num_seqs=4)
    eng = llm.engine
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    eng.add_request([5, 6, 7], long)
    eng.add_request([8, 9], short)
    eng.step()
    assert len(eng.scheduler.running) == 2
    finished_at = None
    for step in range(5):
        outs = eng.step()
        if any(o.finished for o in outs):
            finished_at = step
            break
    assert finished_at is not None and len(eng.scheduler.running) == 1
    eng.add_request([10, 11, 12], short)              # joins while the long one runs
    eng.step()
    assert len(eng.scheduler.running) == 2
    # max_num_seqs bounds the batch: six more requests, at most 4 running at once.
    for i in range(6):
        eng.add_request([20 + i], short)
    while eng.has_unfinished():
        eng.step()
        assert len(eng.scheduler.running) <= 4


def _async_workload(llm: LLM):
    """Requests that end in every way (EOS, a stop string, max_tokens, max_tokens of 1, an
    abort), with parallel samples, logprobs, prompt logprobs, logit_bias, penalties (counted
    on the device for a token still there), shared prefixes and streams. Every request is
    greedy or seeded, so its output does not depend on what it was batched with."""
    rng = random.Random(5)
    V = llm.engine.model_config.vocab_size
    head = "def fibonacci(n):\n    "
    reqs = []
    for i in range(18):
        prompt = head + f"x = {i}\n" if i % 3 else [1] + [rng.randrange(3, V) for _ in range(rng.randrange(2, 60))]
        p = SamplingParams(temperature=0 if i % 4 == 0 else 0.8, top_p=0.9 if i % 5 == 1 else 1.0,
                           top_k=20 if i % 5 == 2 else 0, seed=100 + i, max_tokens=rng.randrange(1, 40),
                           ignore_eos=i % 2 == 0)
        if i % 3 == 1:
            p = dataclasses.replace(p, stop=["\n", ":"], max_tokens=p.max_tokens + 10)
        if i % 3 == 2:                                 # EOS made likely, the more so the later
            p = dataclasses.replace(p, logit_bias={2: 3.0 + i / 2}, ignore_eos=False, max_tokens=40)
        if i % 7 == 3:
            p = dataclasses.replace(p, n=2, best_of=3, logprobs=2)
        if i % 8 == 5:
            p = dataclasses.replace(p, prompt_logprobs=1, logit_bias={7: 3.0})
        if i == 9:
            p = dataclasses.replace(p, frequency_penalty=0.5)
        if i == 12:
            p = dataclasses.replace(p, repetition_penalty=1.3, presence_penalty=0.4)
        reqs.append((prompt, p, i % 2 == 1))
    return reqs


def _close(a, b) -> bool:
    """Equal, floats to a relative 1e-5, through lists, tuples and dicts."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _run_async_workload(llm: LLM, graphs: bool) -> dict:
    """Serve _async_workload (request 13 aborted after its first streamed output) -> request
    id -> (its outputs' fields, the text its deltas add up to: how many outputs a stream gets
    depends on the steps its samples were batched in)."""
    eng = llm.engine
    eng.runner.use_graphs = eng.runner.use_piecewise_graphs = graphs
    ids = [eng.add_request(prompt, p, stream=stream) for prompt, p, stream in _async_workload(llm)]
    seen: dict = {}
    while eng.has_unfinished():
        for out in eng.step():
            fields = [(c.token_ids, c.text, c.finish_reason, c.logprobs, c.cumulative_logprob, c.token_texts)
                      for c in out.outputs]
            deltas = seen.get(out.request_id, (None, ""))[1] + out.delta
            seen[out.request_id] = (fields + [out.prompt_logprobs], deltas)
            if out.request_id == ids[13] and not out.finished:
                eng.abort(ids[13])
    assert eng.block_manager.ref_count == [0] * eng.num_blocks
    return seen


@pytest.mark.parametrize("graphs", [False, True])
def test_async_scheduling_gives_the_synchronous_outputs(graphs):
    """With async scheduling the engine plans and launches step n+1 before step n's ids
    reach the host (they reach the runner on the device); a request's tokens, text, stop
    and finish reason, logprobs and streamed deltas are exactly those of synchronous
    steps: under preemption (a pool of 36 blocks of 4), chunked prefill, prefix caching,
    parallel samples, penalties and an abort, on the eager and the decode-graph paths.
    Fails with any of these broken: the device-side input ids (fill_pending), the EOS check
    in resolve, the discarding of a token sampled after its sequence ended, the penalty
    count of a token still on the device."""
    if not (nanoserve.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("the bundled model is not here")
    kw = dict(device="cpu", num_blocks=36, block_size=4, max_model_len=120, max_num_batched_tokens=48,
              max_num_seqs=10)
    with pytest.raises(ValueError, match="async_scheduling"):
        nanoserve.EngineConfig(async_scheduling="yes")
    assert nanoserve.EngineConfig(device="cuda").async_scheduling and not nanoserve.EngineConfig().async_scheduling
    sync = LLM(nanoserve.DEFAULT_MODEL, async_scheduling=False, **kw)
    ref = _run_async_workload(sync, graphs)
    llm = LLM(nanoserve.DEFAULT_MODEL, async_scheduling=True, **kw)
    got = _run_async_workload(llm, graphs)
    # Tokens, text, finish reasons and deltas exactly; logprobs to 1e-5: a row's logits from
    # a batch of another size (async steps batch differently) round otherwise in the last bits.
    assert got.keys() == ref.keys()
    for rid in ref:
        assert _close(got[rid], ref[rid]), rid
    ends = collections.Counter("eos" if f[2] == "stop" and f[0][-1] == 2 else f[2] for fields, _ in ref.values()
                               for f in fields[:-1])
    assert ends["eos"] >= 3 and ends["stop"] >= 3 and ends["length"] >= 3, ends   # stop: a stop string
    assert ref["req-13"][0][0][2] is None                                # aborted while it streamed
    stats, eng = llm.stats(), llm.engine
    assert stats["preemptions"] > 0 and eng.num_overlapped_steps > eng.num_steps // 2
    assert sync.engine.num_overlapped_steps == 0
    for rid, (fields, deltas) in got.items():
        if len(fields) == 2 and fields[0][2] not in (None, "abort"):   # one sample (best_of re-ranks)
            assert deltas == fields[0][1], rid                           # streamed text adds up


def test_kv_pool_is_sized_from_the_memory_budget(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_bytes=1 << 20, block_size=16)
    per_token = 2 * 2 * 2 * 8 * 4            # K and V, 2 layers, 2 KV heads, head_dim 8, fp32
    assert llm.stats()["kv_bytes_per_token"] == per_token
    assert llm.stats()["kv_blocks_total"] == (1 << 20) // (per_token * 16)
    with pytest.raises(ValueError, match="num_blocks"):
        LLM(tiny_model_dir, device="cpu", num_blocks=3, block_size=16)   # < one max-length sequence
    with pytest.raises(ValueError, match="num_blocks=134217729 x block_size=16 exceeds"):
        LLM(tiny_model_dir, device="cpu", num_blocks=2**27 + 1, block_size=16)  # slots past int32's range


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_cpu_kv_pool_holds_what_the_engine_can_fill_is_printed_and_costs_memory_as_used(tiny_model_dir, capfd):
    llm = LLM(tiny_model_dir, device="cpu", max_num_seqs=4, max_model_len=100, block_size=16)
    assert llm.stats()["kv_blocks_total"] == 4 * 7            # 4 sequences of ceil(100 / 16) blocks
    assert "KV cache: 28 blocks of 16 tokens" in capfd.readouterr().err
    assert LLM(tiny_model_dir, device="cpu", num_blocks=50).stats()["kv_blocks_total"] == 50
    if not Path("/proc/self/statm").is_file():
        return
    # The default pool is sized for the worst case, but its pages are committed as blocks are
    # first written: a short request leaves most of it unallocated.
    before = resident_bytes()
    llm = LLM(nanoserve.DEFAULT_MODEL, device="cpu")
    llm.generate("def f(x):", SamplingParams(max_tokens=8))
    pool = llm.stats()["kv_blocks_total"] * llm.stats()["kv_bytes_per_token"] * 16
    assert pool > 1 << 30 and resident_bytes() - before < pool / 8


def test_stats_keys(tiny_model_dir):
    stats = LLM(tiny_model_dir, device="cpu").stats()
    for key in ("kv_blocks_total", "kv_blocks_free", "preemptions", "prefix_cache_hit_rate",
                "spec_acceptance_rate"):
        assert key in stats
    assert stats["spec_acceptance_rate"] is None


# ----------------------------------------------------------------------------- outputs and stopping

def test_outputs_carry_metrics_and_finish_reasons(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu")
    out = llm.generate([3, 4, 5], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    m = out.metrics
    assert 0 < m["time_to_first_token"] <= m["e2e_latency"] and m["time_per_output_token"] > 0
    # EOS stops unless ignore_eos: force it by picking the greedy token as "EOS".
    first = out.token_ids[0]
    llm.engine.scheduler.eos_token_ids = {first}
    out = llm.generate([3, 4, 5], SamplingParams(temperature=0, max_tokens=7))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_max_model_len_ends_a_sequence(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", max_model_len=20)
    out = llm.generate(list(range(3, 18)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_seeded_request_is_reproducible_and_seeds_differ(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu")
    p = lambda s: SamplingParams(temperature=1.0, max_tokens=20, seed=s, ignore_eos=True)  # noqa: E731
    a = llm.generate([7, 8, 9], p(1))[0].token_ids
    assert llm.generate([7, 8, 9], p(1))[0].token_ids == a
    assert llm.generate([7, 8, 9], p(2))[0].token_ids != a


# ----------------------------------------------------------------------------- bad input

def test_sampling_params_name_the_bad_field():
    for kwargs, field in [({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                          ({"max_tokens": 0}, "max_tokens"), ({"logprobs": -1}, "logprobs"),
                          ({"temperature": "hot"}, "temperature"), ({"stop": [""]}, "stop"),
                          ({"seed": 1.5}, "seed"), ({"prompt_logprobs": 99}, "prompt_logprobs")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_bad_prompts_are_refused_before_queueing_and_engine_keeps_serving(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", max_model_len=64)
    ok = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = llm.generate([5, 6], ok)[0].token_ids
    for prompt, msg in [([], "empty"), (list(range(3, 70)), "max_model_len"), ([5, 300], "vocabulary"),
                        ([5, -1], "vocabulary"), ("text", "tokenizer"), ([5, "x"], "integers"),
                        (3.5, "prompt")]:
        with pytest.raises(ValueError, match=msg):
            llm.generate([[5, 6], prompt], ok)        # the good prompt is not queued either
        assert not llm.engine.has_unfinished()
    assert llm.generate([5, 6], ok)[0].token_ids == expected
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


def test_missing_or_broken_model_dirs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LLM(tmp_path / "nowhere", device="cpu")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LLM(tmp_path / "bad", device="cpu")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(tmp_path / "noweights", device="cpu")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "nanoserve.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,msg", [(["--temperature", "-1"], "temperature"),
                                      (["--top-p", "2"], "top_p"),
                                      (["--max-tokens", "0"], "max_tokens"),
                                      (["--model", "/no/such/dir"], "/no/such/dir")])
def test_cli_bad_input_is_one_line_and_exit_2(args, msg):
    r = run_cli("--prompt", "hi", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert msg in r.stderr


def test_benchmarks_run_and_write_json(tmp_path):
    """A smoke test of tools/bench.py on small settings (benchmarks are not timed tests)."""
    out = tmp_path / "bench.json"
    # quant before memory: the shared engine is let go for quant's own engines, then rebuilt.
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "latency", "throughput",
                        "quant", "memory", "--requests", "4", "--no-transformers", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["latency"]["decode_verdict"] == "memory-bound"
    assert data["latency"]["prefill_verdict"] == "compute-bound"
    assert data["memory"]["gqa_saving"] == 4
    assert data["memory"]["paged_waste_fraction"] < data["memory"]["max_len_reservation_waste_fraction"]
    assert "| continuous batching |" in r.stdout and "| int4 g128 |" in r.stdout


# ----------------------------------------------------------------------------- pinned outputs
# Token ids produced before the engine was reorganised into scheduler / model runner /
# speculator (fp32, greedy or seeded, CPU): refactors of the engine must not change them.
PINNED_BUNDLED = {
    "def fibonacci(n):": [3, 262, 343, 1869, 695, 290, 291, 1111, 1830, 378, 290, 291, 1111, 1830, 1846, 3,
                          3, 262, 656, 291, 1111, 317, 271, 291],
    "import os\nimport sys\n\n": [306, 410, 306, 278, 564, 1852, 1877, 1833, 267, 468, 362, 1877, 1833, 267,
                                  468, 362, 1877, 1833, 267, 468, 362, 1877, 1833, 267],
}
# The seeded pins changed once on purpose: seeded noise moved from a torch.Generator per
# event to keyed_uniform (batched), which draws different (equally distributed) numbers.
PINNED_SEEDED = [3, 262, 343, 677, 1331, 825, 285, 294, 603, 390, 279, 1830, 618, 3, 262, 327, 376, 1105, 1841,
                 1832, 300, 1849, 1830, 1848]
PINNED_SPEC_SEEDED = [1847, 581, 1465, 1858, 361, 1847, 966, 678, 301, 3, 263, 276, 1846, 931, 1866, 990, 1841, 515,
                      278, 376, 931, 1866, 990, 1841]
PINNED_STORIES = ([1, 38, 501, 263, 131, 292], [333, 362, 293, 462, 458, 397, 458, 458, 458, 458, 458, 330, 264,
                                                473, 473, 456, 302, 465, 466, 465, 465, 465, 465, 465])


def test_greedy_and_seeded_outputs_are_pinned_on_the_bundled_model():
    if not (nanoserve.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("the bundled model is not in this checkout")
    llm = LLM(nanoserve.DEFAULT_MODEL, device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(list(PINNED_BUNDLED), greedy)
    assert [o.token_ids for o in outs] == list(PINNED_BUNDLED.values())
    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=5, ignore_eos=True)
    assert llm.generate("def fibonacci(n):", seeded)[0].token_ids == PINNED_SEEDED
    spec = LLM(nanoserve.DEFAULT_MODEL, device="cpu", draft_model=nanoserve.DEFAULT_DRAFT, num_speculative_tokens=4)
    long_seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=5, ignore_eos=True)
    out = spec.generate("class Config:\n    def __init__(self", long_seeded)[0]
    assert out.token_ids[:24] == PINNED_SPEC_SEEDED           # (draft windows depend on max_tokens)
    assert [o.token_ids for o in spec.generate(list(PINNED_BUNDLED), greedy)] == list(PINNED_BUNDLED.values())


@needs_stories
def test_greedy_output_is_pinned_on_stories260k():
    prompt, expected = PINNED_STORIES
    out = LLM(STORIES, device="cpu").generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out[0].token_ids == expected


# ----------------------------------------------------------------------------- layout

def test_no_name_is_used_above_its_definition():
    """Each module reads top to bottom: a function, class or constant of the module is used
    (called, built, read) only below the line that defines it. Type annotations may name a
    class defined further down (two classes that refer to each other)."""
    import ast
    for name in ("nanoserve", "parallel", "server", "quant", "kernels"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        defined = {}
        for node in tree.body:
            targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for t in targets:
                defined.setdefault(t, node.lineno)
        annotations = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
                parts = [a.annotation for a in args] + [node.returns]
            elif isinstance(node, ast.AnnAssign):
                parts = [node.annotation]
            else:
                continue
            annotations |= {id(n) for part in parts if part is not None for n in ast.walk(part)}
        early = sorted({(n.lineno, n.id) for node in tree.body for n in ast.walk(node)
                        if isinstance(n, ast.Name) and id(n) not in annotations
                        and defined.get(n.id, 0) > n.lineno})
        assert early == [], f"{name}.py uses names above their definitions: {early}"


def test_the_readme_reading_map_matches_the_sections():
    """The README's "Read in this order" table: for each file, ranges that run from line 1
    to its last line without a gap, each after the first starting at the banner of the
    section it names."""
    import re
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Read in this order"):readme.index("## Features")]
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    current = None
    for row in table.splitlines():
        m = re.match(r"\| (?:`([^`]+)`)? *\| (\d+)-(\d+) \| (.+?): ", row)
        if m:
            current = m.group(1) or current
            ranges.setdefault(current, []).append((int(m.group(2)), int(m.group(3)), m.group(4)))
    assert {"nanoserve.py", "server.py", "parallel.py", "kernels.py", "quant.py"} <= set(ranges)
    for name, rows in ranges.items():
        lines = (ROOT / name).read_text().splitlines()
        starts = [1] + [i + 1 for i, line in enumerate(lines) if re.match(r"# (={20,}|-{20,}) ", line)]
        now = ", ".join(f"{a}-{b - 1}" for a, b in zip(starts, starts[1:] + [len(lines) + 1]))
        hint = f"{name}'s sections are now at lines {now}: update the README's table"
        assert rows[0][0] == 1 and rows[-1][1] == len(lines), hint
        for (_, end, _), (start, _, _) in zip(rows, rows[1:]):
            assert start == end + 1, hint
        for start, _, section in rows[1:]:
            assert re.match(rf"# [=-]+ {re.escape(section)}$", lines[start - 1]), hint


def test_imports_point_one_way():
    """tools -> quant / server / parallel -> nanoserve -> kernels, each import at the top of
    its module, with one stated exception: an entry point that selects an optional backend
    imports it inside the function that selects it (the CLI's serve(), server.py; LLMEngine
    and the CLI's torchrun worker, parallel.py). No other import sits inside a function to
    work around a cycle."""
    import ast
    level = {"kernels": 0, "nanoserve": 1, "quant": 2, "parallel": 2, "server": 2}
    backends = {("nanoserve", "LLMEngine.__init__", "parallel"), ("nanoserve", "main", "parallel"),
                ("nanoserve", "serve", "server")}

    def functions(body: list, prefix: str = ""):          # (qualified name, node) of every def
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + node.name
                if not isinstance(node, ast.ClassDef):
                    yield name, node
                yield from functions(node.body, name + ".")

    lazy = set()
    for name in level:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert all(level[m] < level[name] for m in top & set(level) - {name}), \
            f"{name}.py imports a module beside or above it: {sorted(top & set(level))}"
        assert "tools" not in top
        for qualname, fn in functions(tree.body):
            for inner in ast.walk(fn):
                if isinstance(inner, ast.ImportFrom):
                    assert inner.module not in level, f"{name}.py imports {inner.module} lazily in {qualname}"
                if isinstance(inner, ast.Import):
                    for m in {a.name for a in inner.names} & set(level):
                        assert (name, qualname, m) in backends, f"{name}.py imports {m} lazily in {qualname}"
                        lazy.add((name, qualname, m))
    assert lazy == backends            # each stated exception is where it is said to be


def _paged_setup(seqs: list[tuple[int, int]], n_kv: int, group: int, hd: int, bs: int):
    """Random caches, shuffled block tables and queries for sequences of (context, new tokens)."""
    num_blocks = sum((c + bs - 1) // bs for c, _ in seqs) + 2
    k_cache, v_cache = torch.randn(num_blocks, bs, n_kv, hd), torch.randn(num_blocks, bs, n_kv, hd)
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range((c + bs - 1) // bs)] for c, _ in seqs]
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = torch.tensor([0] + [n for _, n in seqs]).cumsum(0)
    q = torch.randn(int(starts[-1]), n_kv * group, hd)
    lens = torch.tensor([c for c, _ in seqs])
    positions = torch.cat([torch.arange(c - n, c) for c, n in seqs])
    slots = torch.cat([torch.tensor([tables[i][p // bs] * bs + p % bs for p in range(c - n, c)])
                       for i, (c, n) in enumerate(seqs)])
    return k_cache, v_cache, bt, starts, q, lens, positions, slots


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("seqs", [
    [(c, 1) for c in (1, 3, 17, 40, 41, 64, 5, 2, 90, 33)] * 4 + [(30, 30), (50, 7)],   # 42: sorted batches + twin
    [(c, 1) for c in (9, 70, 33)],                                                        # one batch in order, padded
    [(57, 1)]])                                                                            # batch 1, no padding
def test_cpu_attention_path_equals_the_reference_twin(group, seqs):
    """kernels.paged_attention_cpu (a per-step plan: length-sorted, padded decode batches as
    one batched matmul each) against the plain twin: mixed batches of decodes of many
    lengths, a prompt, a chunk after cached context; a small step; a single decode."""
    torch.manual_seed(group)
    n_kv, hd, bs = 2, 16, 4
    k_cache, v_cache, bt, starts, q, lens, positions, slots = _paged_setup(seqs, n_kv, group, hd, bs)
    cos, sin = kernels.rope_cos_sin(hd, 128, 10000.0)
    plan = kernels.plan_from_tensors(bt, starts, lens, positions, slots, cos, sin, bs, n_kv)
    ref = kernels.paged_attention_ref(q, k_cache, v_cache, bt, starts, lens, hd ** -0.5)
    out = kernels.paged_attention_cpu(q, k_cache, v_cache, plan, hd ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)     # fp32 matmuls in another order


def test_cpu_rope_cache_and_norm_equal_their_twins_bit_for_bit():
    """The CPU path's RoPE + cache write (q and k together, halves swapped by a flip, cos/sin
    gathered once per step) and its RMSNorm do the twins' fp32 arithmetic in the same order:
    exactly equal results, so greedy tokens cannot move."""
    torch.manual_seed(0)
    n_kv, group, hd, bs = 2, 3, 16, 4
    seqs = [(5, 5), (40, 1), (17, 1), (23, 3)]
    k_cache, v_cache, bt, starts, q, lens, positions, slots = _paged_setup(seqs, n_kv, group, hd, bs)
    k, v = torch.randn(q.shape[0], n_kv, hd), torch.randn(q.shape[0], n_kv, hd)
    cos, sin = kernels.rope_cos_sin(hd, 128, 10000.0)
    plan = kernels.plan_from_tensors(bt, starts, lens, positions, slots, cos, sin, bs, n_kv)
    for dtype in (torch.float32, torch.bfloat16):          # 16-bit: rotated in fp32, as the twin does
        qd, kd, vd, kc, vc = (t.to(dtype) for t in (q, k, v, k_cache, v_cache))
        kc2, vc2 = kc.clone(), vc.clone()
        q_ref = kernels.rope_and_cache_ref(qd, kd, vd, positions, cos, sin, kc, vc, slots)
        q_cpu = kernels.rope_and_cache_cpu(qd, kd, vd, kc2, vc2, plan)
        assert torch.equal(q_cpu, q_ref) and torch.equal(kc2, kc) and torch.equal(vc2, vc)
    x, w = torch.randn(7, 96), torch.randn(96)
    assert torch.equal(kernels.rms_norm_cpu(x, w, 1e-5), kernels.rms_norm_ref(x, w, 1e-5))


def test_cpu_serving_layout_is_input_major_with_the_same_values(tmp_path, tiny_model_dir):
    """On the CPU in fp32, serving stores every plain linear's weight of at least 64K values
    input-major (the (out, in) tensor a view of an (in, out) one: BLAS's faster matrix-vector
    order); the values, the Hugging Face names and a tied head's (V, D) rows are unchanged;
    smaller weights, and other dtypes, keep their rows."""
    from conftest import TINY_CONFIG, write_random_checkpoint
    untied = write_random_checkpoint(tmp_path / "m", dict(TINY_CONFIG, hidden_size=256, intermediate_size=512,
                                                          vocab_size=512, num_attention_heads=4, num_key_value_heads=2))
    for path, tied in ((untied, False), (nanoserve.DEFAULT_MODEL, True)):
        model, cfg = nanoserve.load_model(path, torch.float32, torch.device("cpu"))
        assert cfg.tie_word_embeddings == tied
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(2, cfg.hidden_size)
        layer = model.model.layers[0]
        want = [layer.self_attn.o_proj(x), layer.mlp.up_proj(x), model.lm_head(x)]
        nanoserve.fuse_projections(model)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert m.weight.stride(0) == 1 and m.weight.stride(1) >= m.weight.shape[0]   # input-major
        for got, w in zip((layer.self_attn.o_proj(x), layer.mlp.up_proj(x), model.lm_head(x)), want):
            # the same sums in another order: fp32 rounding only (outputs here are of order 10)
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-4)
        assert model.lm_head.weight.is_contiguous() == tied                # a tied head keeps its rows
        nanoserve.fuse_projections(model)                                 # twice: still the same values
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    for path, dtype in ((tiny_model_dir, torch.float32), (untied, torch.bfloat16)):
        small, _ = nanoserve.load_model(path, dtype, torch.device("cpu"))
        nanoserve.fuse_projections(small)                 # 64 x 64 weights, or bf16: rows kept
        assert all(p.is_contiguous() for p in small.parameters())


def test_fused_projections_equal_the_separate_linears_and_keep_the_checkpoint():
    """FusedLinear (q/k/v and gate/up as one matmul each) computes what the separate
    projections compute, keeps no second copy of the weights, and leaves state_dict (the
    Hugging Face names and values) as it was."""
    model, _ = nanoserve.load_model("random:nanocoder-5m-8k", torch.float32, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.model.layers[0]
    x = torch.randn(3, model.config.hidden_size)
    a, m = layer.self_attn, layer.mlp
    separate = (torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1), torch.cat([m.gate_proj(x), m.up_proj(x)], -1))
    nanoserve.fuse_projections(model)
    torch.testing.assert_close(a.qkv(x), separate[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.gate_up(x), separate[1], atol=1e-6, rtol=1e-6)
    assert a.k_proj.weight.untyped_storage().data_ptr() == a.qkv.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    a.k_proj.weight.mul_(2)                                  # in place (AWQ's scaling): seen by the fusion
    assert a.qkv.holds(a.q_proj, a.k_proj, a.v_proj) and torch.equal(a.qkv(x)[:, a.q_proj.out_features:][:, :a.k_proj.out_features], a.k_proj(x))
    m.up_proj = torch.nn.Linear(m.up_proj.in_features, m.up_proj.out_features, bias=False)   # replaced (quantization)
    assert not m.gate_up.holds(m.gate_proj, m.up_proj)
    torch.testing.assert_close(m(x), m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x)))


def test_decode_split_policy_fills_the_gpu_fits_shared_memory_and_merges_only_when_needed():
    """kernels.decode_partition (Flash-Decoding's keys per split, chosen on the host): on an
    H100 (132 SMs) a lone long sequence is split until the grid has two blocks per SM, a
    large batch that already fills the GPU gets one split (nothing to merge), no split is
    shorter than one round of the block's loads (decode_min_part), and the scores always
    fit the shared-memory budget."""
    sms = 132
    for S in (1, 4, 64, 256):
        for n_kv, G, hd in ((8, 4, 128), (8, 8, 128), (2, 4, 64), (1, 8, 256), (32, 1, 128)):
            for ctx in (0, 1, 100, 2048, 4097, 32768, 131072):
                part = kernels.decode_partition(S, n_kv, G, hd, ctx, sms)
                splits = max(1, -(-ctx // part))
                assert part % 32 == 0 and part >= 32 and splits * part >= ctx
                # scores, q, the warps' partials, and the partition's block ids (block size 1 at worst)
                assert (9 * G * hd + G * part + part + 2) * 4 <= kernels.DECODE_SMEM_BYTES, (S, n_kv, G, hd, ctx)
                least = kernels.decode_min_part(hd)
                assert least == {64: 128, 128: 64, 256: 32}[hd]                 # 16 KB of 16-bit rows
                assert splits <= max(1, -(-ctx // least)) or part * G * 4 > 150_000
                if S * n_kv >= 2 * sms and (9 * G * hd + (G + 1) * ctx + 64) * 4 <= kernels.DECODE_SMEM_BYTES:
                    assert splits == 1                                  # the batch fills the GPU
                if ctx >= 2 * sms * least:
                    assert S * n_kv * splits >= 0.9 * 2 * sms           # long contexts fill it too
                                                                        # (parts rounded up to 32 keys)
    assert kernels.decode_partition(1, 8, 4, 128, 32768, sms) == kernels.decode_partition(1, 8, 4, 128, 32768, sms)
    for budget in (99 * 1024, 163 * 1024):                             # sm_86 and A100 opt-in limits
        for G, hd in ((8, 128), (8, 256), (1, 64)):
            part = kernels.decode_partition(256, 8, G, hd, 131072, 108, budget)
            assert (9 * G * hd + G * part + part + 2) * 4 <= budget


def test_host_benchmark_runs_past_a_prefill_of_several_steps():
    """tools/bench.py host stubs the model's forward and the logits on engines of its own,
    prefills its requests and times decode steps through the CUDA-graph input path. Run at a
    size whose prefill takes several steps (32 prompts of 100-1024 tokens, 2048 tokens a
    step): requests given a fixed max_tokens ended there before the timed steps did. The
    stub has the forward's signature, so a change of that signature fails here too."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench                                  # its dataclasses look themselves up
    spec.loader.exec_module(bench)
    forward, graph_forward = nanoserve.LlamaForCausalLM.forward, nanoserve.DecodeGraphs._forward
    r = bench.bench_host(batch=32, steps=3, warmup=2)
    assert r["batch"] == 32 and r["prefill_steps"] >= 5 and r["warmup_steps"] == 2
    # 4 timed modes, the step that takes the last async one's outputs, the profile
    assert r["graph_path_steps"] == 4 * r["steps"] + 1 + r["steps"] // 4 == 13
    modes = ("streaming", "final_only", "final_only_async", "final_only_penalized")
    assert all(r[k]["ms_per_step"] > 0 for k in modes)
    # each row's parts: the logits stub is timed inside sampling, and the parts fit in the step
    assert all(0 < r[k]["stub_ms"] <= r[k]["sample_ms"] for k in modes)
    assert all(sum(r[k][f"{part}_ms"] for part in ("schedule", "model", "sample", "output")) <= r[k]["ms_per_step"]
               for k in modes)
    assert nanoserve.LlamaForCausalLM.forward is forward and nanoserve.DecodeGraphs._forward is graph_forward
