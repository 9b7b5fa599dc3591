"""Speculative decoding: exact rejection sampling inside the batching engine.

The statistical tests use a chi-square goodness-of-fit test at significance level
ALPHA = 1e-3 (cells with expected count < 5 pooled). Power: the same test must reject
two broken verifiers, one that skips the residual distribution on rejection and one
that always accepts (samples from the draft).
"""

import random

import pytest
import torch

import nanoserve
from nanoserve import LLM, SamplingParams
from conftest import STORIES, TINY_CONFIG, needs_stories, write_random_checkpoint
from test_sampling import chi_square_pvalue

ALPHA = 1e-3


def pooled_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    small = probs * counts.sum() < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        probs = torch.cat([probs[~small], probs[small].sum()[None]])
    return chi_square_pvalue(counts, probs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target, draft) sharing a vocabulary: the shared trained model and a random draft if
    present, else two random models."""
    root = tmp_path_factory.mktemp("spec")
    if (STORIES / "model.safetensors").is_file():
        cfg = dict(TINY_CONFIG, vocab_size=512, hidden_size=32, num_attention_heads=4,
                   num_key_value_heads=1, num_hidden_layers=1)
        return STORIES, write_random_checkpoint(root / "draft", cfg, seed=7, std=0.3)
    target = write_random_checkpoint(root / "target", TINY_CONFIG, seed=1)
    draft = write_random_checkpoint(root / "draft", dict(TINY_CONFIG, num_hidden_layers=1), seed=7, std=0.3)
    return target, draft


def prompts_for(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def all_pairs(pair):
    pairs = [pair]
    if (nanoserve.DEFAULT_DRAFT / "model.safetensors").is_file():
        pairs.append((nanoserve.DEFAULT_MODEL, nanoserve.DEFAULT_DRAFT))
    return pairs


# Verification scores k + 1 positions in one pass, plain decoding one: the same fp32 logits
# summed in another order, which differ by about 1e-6. Where the target's two best tokens are
# closer than NEAR_TIE (in logprob), either may win in either path, so greedy outputs are
# compared token for token up to the first such near-tie, and must reach it.
NEAR_TIE = 1e-4


def greedy_until_near_tie(out: nanoserve.RequestOutput) -> list[int]:
    """out's tokens before its first near-tie (out generated with logprobs=2)."""
    for i, lp in enumerate(out.logprobs):
        best = sorted(lp.values(), reverse=True)[:2]
        if len(best) == 2 and best[0] - best[1] < NEAR_TIE:
            return out.token_ids[:i]
    return out.token_ids


@pytest.mark.parametrize("method,k", [("draft", 2), ("draft", 5), ("ngram", 3)])
def test_greedy_speculative_output_equals_target_alone(pair, method, k):
    for target, draft in all_pairs(pair):
        base = LLM(target, device="cpu")
        vocab = base.engine.model_config.vocab_size
        prompts = prompts_for(vocab, 12)
        p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
        ref = [greedy_until_near_tie(o) for o in base.generate(prompts, p)]
        assert sum(map(len, ref)) > 0.8 * 40 * len(prompts)           # near-ties are rare
        spec = LLM(target, device="cpu", num_speculative_tokens=k, speculative_method=method,
                   draft_model=draft if method == "draft" else None)
        got = [o.token_ids for o in spec.generate(prompts, p)]
        assert [g[:len(r)] for g, r in zip(got, ref)] == ref
        assert [len(g) for g in got] == [40] * len(prompts)
        st = spec.stats()
        assert 0 <= st["spec_acceptance_rate"] <= 1 and st["spec_tokens_per_step"] >= 1
        assert st["kv_blocks_free"] == st["kv_blocks_total"]


def test_draft_equal_to_target_accepts_every_token_at_temperature_1(pair):
    target, _ = pair
    llm = LLM(target, device="cpu", draft_model=target, num_speculative_tokens=4)
    outs = llm.generate(prompts_for(llm.engine.model_config.vocab_size, 6),
                        SamplingParams(temperature=1.0, max_tokens=30, seed=5, ignore_eos=True))
    assert llm.stats()["spec_acceptance_rate"] == 1.0
    assert llm.stats()["spec_tokens_per_step"] > 4
    assert all(o.metrics["spec_acceptance_rate"] == 1.0 for o in outs)


def test_speculation_with_preemption_chunking_prefix_caching_and_seeds(pair):
    target, draft = pair
    vocab = nanoserve.ModelConfig.from_dir(target).vocab_size
    rng = random.Random(1)
    system = [1] + [rng.randrange(3, vocab) for _ in range(50)]
    prompts = [system + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(14)]
    greedy = [SamplingParams(temperature=0, max_tokens=rng.randrange(5, 50), ignore_eos=True) for _ in prompts]
    ref = [o.token_ids for o in LLM(target, device="cpu").generate(prompts, greedy)]
    # The budget fits every window (14 x 4 tokens) and chunked prefill still splits prompts.
    tight = dict(block_size=4, num_blocks=100, max_model_len=160, max_num_batched_tokens=64)
    spec = LLM(target, device="cpu", draft_model=draft, num_speculative_tokens=3, **tight)
    eng = spec.engine
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, greedy)]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
        # Rollback leaves nothing behind: each running sequence holds exactly the blocks
        # its computed tokens need (plus what the next step allocated), in both caches.
        for s in eng.scheduler.running:
            assert len(s.block_table) <= eng.block_manager.blocks_needed(s.num_computed + 1)
            st = eng.speculator.state.get(s)
            assert st is None or len(st.block_table) <= eng.block_manager.blocks_needed(st.num_computed)
    assert [done[i] for i in ids] == ref
    assert spec.stats()["preemptions"] > 0 and spec.stats()["prefix_cache_hit_rate"] > 0
    assert eng.block_manager.num_free == 100 and eng.speculator.bm.num_free == 100
    assert eng.block_manager.ref_count == [0] * 100 and eng.speculator.bm.ref_count == [0] * 100
    # Seeded sampling: a request's output is the same alone and in a preempting batch.
    sampled = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=30, ignore_eos=True)
               for i in range(len(prompts))]
    alone = LLM(target, device="cpu", draft_model=draft, num_speculative_tokens=3)
    solo = [alone.generate(p, sp)[0].token_ids for p, sp in zip(prompts, sampled)]
    assert [o.token_ids for o in spec.generate(prompts, sampled)] == solo


def test_speculation_through_the_graph_paths(pair):
    """The draft's single-token steps go through the padded static-buffer decode path, the
    target's and the draft's other steps (prefills, verification windows, the draft's
    catching up) through the piecewise one (CUDA graphs on a GPU, eager here). Greedy
    output equals the target alone."""
    for target, draft in all_pairs(pair):
        vocab = nanoserve.ModelConfig.from_dir(target).vocab_size
        prompts = prompts_for(vocab, 11, seed=3)
        greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        ref = [o.token_ids for o in LLM(target, device="cpu").generate(prompts, greedy)]
        spec = LLM(target, device="cpu", draft_model=draft, num_speculative_tokens=3)
        for runner in (spec.engine.runner, spec.engine.speculator.runner):
            runner.use_graphs = runner.use_piecewise_graphs = True
        assert [o.token_ids for o in spec.generate(prompts, greedy)] == ref
        draft = spec.engine.speculator.runner
        assert draft.graphs.steps > 0 and draft.piecewise.steps > 0 and spec.engine.runner.piecewise.steps > 0


# ----------------------------------------------------------------------------- distribution

def _uniform(key, default):
    return torch.rand((), generator=default) if key is None else nanoserve.keyed_uniform([key], 1, "cpu")[0, 0]


def _skip_residual(p, q, draft, rng, default):
    """Broken: on rejection, samples from p instead of normalize(max(0, p - q))."""
    out = []
    for j, x in enumerate(draft):
        if _uniform(rng(j, nanoserve.ACCEPT), default) * q[j, x] <= p[j, x]:
            out.append(x)
            continue
        out.append(int(nanoserve.draw(p[j][None], [rng(j, nanoserve.RESIDUAL)], default)[0]))
        return out
    return out + [int(nanoserve.draw(p[len(draft)][None], [rng(len(draft), 0)], default)[0])]


def _always_accept(p, q, draft, rng, default):
    """Broken: keeps every draft token, i.e. samples from the draft."""
    return list(draft) + [int(nanoserve.draw(p[len(draft)][None], [rng(len(draft), 0)], default)[0])]


def _window_counts_and_probs(target, draft, n_requests: int, k: int = 3):
    """Sample (t1, t2, ..., t_{k+2}) many times: t1 comes from the prefill's plain sample,
    t2..t_{k+2} from one speculative window (k drafts + bonus). With top_k = 2 there are
    2^(k+2) sequences; their exact probability is the product of the target's conditionals."""
    prompt = [1, 300, 400, 50]
    params = [SamplingParams(temperature=1.0, top_k=2, seed=i, max_tokens=k + 2, ignore_eos=True)
              for i in range(n_requests)]
    llm = LLM(target, device="cpu", draft_model=draft, num_speculative_tokens=k, max_num_seqs=512,
              max_num_batched_tokens=4096)
    outs = llm.generate([prompt] * n_requests, params)
    assert llm.stats()["spec_tokens_per_step"] is not None
    model = llm.engine.model
    cache = {}

    def cond(prefix: tuple) -> torch.Tensor:
        if prefix not in cache:
            with torch.inference_mode():
                logits = model.forward_dense(torch.tensor([prompt + list(prefix)]))[0, -1:]
            cache[prefix] = nanoserve.sampling_probs(logits, params[:1])[0]
        return cache[prefix]

    # Enumerate the support by walking the top-2 tree.
    support = [()]
    for _ in range(k + 2):
        support = [s + (t,) for s in support for t in cond(s).nonzero().flatten().tolist()]
    probs = torch.tensor([float(torch.prod(torch.stack([cond(s[:i])[s[i]] for i in range(len(s))])))
                          for s in support] + [0.0], dtype=torch.float64)    # last cell: impossible
    index = {s: i for i, s in enumerate(support)}
    counts = torch.zeros(len(support) + 1, dtype=torch.float64)
    for o in outs:
        counts[index.get(tuple(o.token_ids), len(support))] += 1
    return counts, probs


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """Two drafts for the target stories260K. "random": unrelated weights, so most draft
    tokens fall outside the target's top 2. "perturbed": the target with noise added to its
    weights, which ranks tokens much like the target but with other probabilities, so
    acceptances, rejections and the residual distribution all matter."""
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip("../shared/models/stories260K is not beside this checkout")
    root = tmp_path_factory.mktemp("drafts")
    cfg = dict(TINY_CONFIG, vocab_size=512, hidden_size=32, num_attention_heads=4,
               num_key_value_heads=1, num_hidden_layers=1)
    random_draft = write_random_checkpoint(root / "random", cfg, seed=11, std=1.0)
    d = root / "perturbed"
    d.mkdir()
    (d / "config.json").write_text((STORIES / "config.json").read_text())
    g = torch.Generator().manual_seed(11)
    state = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
             for k, v in nanoserve.load_checkpoint(STORIES).items()}
    nanoserve.save_safetensors(state, d / "model.safetensors")
    return {"random": random_draft, "perturbed": d}


@needs_stories
@pytest.mark.parametrize("draft", ["random", "perturbed"])
def test_spec_decode_preserves_target_distribution(drafts, draft):
    counts, probs = _window_counts_and_probs(STORIES, drafts[draft], 3000)
    assert pooled_pvalue(counts, probs) > ALPHA


@needs_stories
@pytest.mark.parametrize("broken,draft", [(_skip_residual, "perturbed"), (_always_accept, "random"),
                                          (_always_accept, "perturbed")])
def test_distribution_test_rejects_broken_verifiers(drafts, monkeypatch, broken, draft):
    monkeypatch.setattr(nanoserve, "rejection_sample", broken)
    counts, probs = _window_counts_and_probs(STORIES, drafts[draft], 3000)
    assert pooled_pvalue(counts, probs) < ALPHA


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_sample_emits_the_target_distribution(deterministic):
    """The acceptance rule alone, on fixed distributions: the first emitted token ~ p[0]."""
    V = 6
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(2, V, generator=g) * 2, -1)
    counts = torch.zeros(V, dtype=torch.float64)
    default = torch.Generator().manual_seed(1)
    no_seed = lambda j, purpose: None  # noqa: E731
    for _ in range(20000):
        if deterministic:                                    # n-gram: a point-mass proposal
            draft = [3, 1]
            toks = nanoserve.rejection_sample(p, None, draft, no_seed, default)
        else:
            draft = [int(nanoserve.draw(q[j][None], [None], default)) for j in range(2)]
            toks = nanoserve.rejection_sample(p, q, draft, no_seed, default)
        counts[toks[0]] += 1
    assert chi_square_pvalue(counts, p[0].double()) > ALPHA


def test_bad_speculative_configs_are_refused(pair, tmp_path):
    target, draft = pair
    with pytest.raises(ValueError, match="speculative_method"):
        LLM(target, device="cpu", speculative_method="medusa")
    with pytest.raises(ValueError, match="draft_model"):
        LLM(target, device="cpu", speculative_method="draft")
    with pytest.raises(ValueError, match="async_scheduling"):     # proposals need the tokens on the host
        LLM(target, device="cpu", speculative_method="ngram", async_scheduling=True)
    assert nanoserve.EngineConfig(device="cuda", speculative_method="ngram").async_scheduling is False
    other = write_random_checkpoint(tmp_path / "v", dict(TINY_CONFIG, vocab_size=999))
    with pytest.raises(ValueError, match="vocab"):
        LLM(target, device="cpu", draft_model=other)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_penalties_under_speculation_give_the_target_alones_greedy_output(pair, method):
    """The verifier applies each window position's penalties with the drafts before it
    counted as generated: greedy output equals the target alone with the same penalties."""
    target, draft = pair
    vocab = nanoserve.ModelConfig.from_dir(target).vocab_size
    prompts = prompts_for(vocab, 8, seed=5)
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
                       presence_penalty=2.0, repetition_penalty=1.5, logit_bias={5: 2.0})
    ref = [o.token_ids for o in LLM(target, device="cpu").generate(prompts, p)]
    plain = [o.token_ids for o in LLM(target, device="cpu").generate(
        prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))]
    assert ref != plain                                         # the penalties change the output
    # A draft equal to the target (its proposals ignore the penalties) makes long windows
    # whose later positions must count the drafts before them.
    spec = LLM(target, device="cpu", num_speculative_tokens=4, speculative_method=method,
               draft_model=target if method == "draft" else None)
    assert [o.token_ids for o in spec.generate(prompts, p)] == ref


def test_a_draft_models_own_step_memory_comes_out_of_the_kv_budget(pair, monkeypatch):
    """On a GPU a draft model's steps (activations, logits, its graphs' pool) take memory
    outside the shared KV pool, as the target's do (ModelRunner.kv_budget_bytes): the pool
    is sized around both. Shown for the draft's share on the CPU, where the target's budget
    is kv_cache_bytes as given, with a runner's reserved memory set to a quarter of it."""
    target, draft = pair
    budget = 1 << 22
    kw = dict(device="cpu", kv_cache_bytes=budget, draft_model=draft, num_speculative_tokens=2)
    whole = LLM(target, **kw).stats()
    monkeypatch.setattr(nanoserve.ModelRunner, "reserved_bytes", property(lambda self: budget // 4))
    less = LLM(target, **kw).stats()
    block = whole["kv_bytes_per_token"] * whole["block_size"]
    assert whole["kv_blocks_total"] == budget // block
    assert less["kv_blocks_total"] == (budget - budget // 4) // block
