"""Sampling follows softmax(logits / T) after top-k and top-p filtering, exactly.

Each test draws N samples, then runs a chi-square goodness-of-fit test at significance
level ALPHA = 1e-3 against the distribution computed by hand. A sample on a token of
probability zero fails at once. Power is shown by running the same test on broken
samplers (filtering off, temperature ignored), which must be rejected.
"""

import math
import random

import pytest
import torch

import nanoserve
from nanoserve import SamplingParams

ALPHA = 1e-3
N = 40_000


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= observed) for X ~ chi2(df), df = support size - 1; 0 if a zero-prob cell was hit."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def expected_probs(logits: torch.Tensor, t: float, top_k: int, top_p: float) -> torch.Tensor:
    """Written independently of nanoserve: sort, cut at k, cut at mass p, renormalise."""
    p = torch.softmax(logits.double() / t, -1)
    order = p.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    k_p = torch.tensor([p[i] for i in order[: top_k or len(order)]])
    total = float(k_p.sum())
    for i in order[: top_k or len(order)]:
        if mass >= top_p * total:
            break
        kept.append(i)
        mass += float(p[i])
    out = torch.zeros_like(p)
    out[kept] = p[kept]
    return out / out.sum()


def draw(logits: torch.Tensor, params: SamplingParams, n: int = N, seed: int = 0,
         sampler=nanoserve.sample) -> torch.Tensor:
    rows = logits.expand(n, -1).clone()
    tokens = sampler(rows, [params] * n, [None] * n, torch.Generator().manual_seed(seed))
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.4, 0.0, -0.5, -1.0, -2.0, -3.0])
CASES = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.7), (2.0, 3, 0.5)]


@pytest.mark.parametrize("t,top_k,top_p", CASES)
def test_sampler_matches_filtered_softmax(t, top_k, top_p):
    params = SamplingParams(temperature=t, top_k=top_k, top_p=top_p)
    counts = draw(LOGITS, params)
    assert chi_square_pvalue(counts, expected_probs(LOGITS, t, top_k, top_p)) > ALPHA


def _no_filter_sampler(logits, params, gens, default):
    plain = [SamplingParams(temperature=p.temperature) for p in params]
    return nanoserve.sample(logits, plain, gens, default)


def _no_temperature_sampler(logits, params, gens, default):
    plain = [SamplingParams(temperature=1.0, top_k=p.top_k, top_p=p.top_p) for p in params]
    return nanoserve.sample(logits, plain, gens, default)


@pytest.mark.parametrize("t,top_k,top_p", [c for c in CASES if c[1] or c[2] < 1])
def test_test_rejects_a_sampler_without_filtering(t, top_k, top_p):
    params = SamplingParams(temperature=t, top_k=top_k, top_p=top_p)
    counts = draw(LOGITS, params, sampler=_no_filter_sampler)
    assert chi_square_pvalue(counts, expected_probs(LOGITS, t, top_k, top_p)) < ALPHA


@pytest.mark.parametrize("t", [0.7, 1.3])
def test_test_rejects_a_sampler_ignoring_temperature(t):
    params = SamplingParams(temperature=t)
    counts = draw(LOGITS, params, sampler=_no_temperature_sampler)
    assert chi_square_pvalue(counts, expected_probs(LOGITS, t, 0, 1.0)) < ALPHA


def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 1000)
    tokens = nanoserve.sample(logits, [SamplingParams(temperature=0)] * 64, [None] * 64, torch.Generator())
    assert torch.equal(tokens, logits.argmax(-1))


def test_per_request_key_makes_a_row_independent_of_its_batch():
    logits = torch.randn(8, 50)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(8)]
    keys = [nanoserve.Sampler.key(i, 5, nanoserve.SAMPLE) for i in range(8)]
    alone = [nanoserve.sample(logits[i:i + 1], params[i:i + 1], keys[i:i + 1],
                              torch.Generator().manual_seed(99)).item() for i in range(8)]
    mixed = keys[:4] + [None] * 4                                    # seeded rows beside unseeded ones
    batch = nanoserve.sample(logits, params, mixed, torch.Generator().manual_seed(7))
    assert batch.tolist()[:4] == alone[:4]
    assert nanoserve.sample(logits, params, keys, torch.Generator()).tolist() == alone


def _keyed_counts(logits, keys, noise=None):
    """Token counts of one draw per key, every row with the same logits (seeded rows only);
    noise(keys, V): a replacement for the keyed Exp(1) noise (a broken sampler)."""
    probs = torch.softmax(logits, -1).expand(len(keys), -1)
    if noise is None:
        tokens = nanoserve.draw(probs, keys, torch.Generator())
    else:
        tokens = (probs / noise(keys, logits.shape[-1])).argmax(-1)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def test_keyed_noise_samples_the_distribution():
    """Seeded requests' noise (a hash of the event key and the column, no generator): 40,000
    consecutive seeds, one draw each from softmax(LOGITS), chi-square at ALPHA. Power: the
    same test rejects uniform noise in place of exponential, and a weak hash whose columns
    move together (the key plus the column, no mixing)."""
    keys = [nanoserve.Sampler.key(seed, 7, nanoserve.SAMPLE) for seed in range(N)]
    probs = torch.softmax(LOGITS.double(), -1)
    assert chi_square_pvalue(_keyed_counts(LOGITS, keys), probs) > ALPHA
    uniform = lambda k, n: nanoserve.keyed_uniform(k, n, "cpu")                              # noqa: E731
    assert chi_square_pvalue(_keyed_counts(LOGITS, keys, uniform), probs) < ALPHA
    unmixed = lambda k, n: -torch.log(((torch.tensor(k)[:, None] + torch.arange(n)) % 1000 + 0.5) / 1000)  # noqa: E731
    assert chi_square_pvalue(_keyed_counts(LOGITS, keys, unmixed), probs) < ALPHA
    u = nanoserve.keyed_uniform(keys[:64], 4096, "cpu")
    # The GPU's path (int64 tensors) gives the CPU's bits (numpy uint32), and one column alone
    # the first column of many.
    k32 = [nanoserve._fmix32((k & 0xFFFFFFFF) ^ nanoserve._fmix32(k >> 32)) for k in keys[:64]]
    as_tensors = nanoserve._column_bits(torch.tensor(k32)[:, None], torch.arange(4096))
    assert torch.equal((as_tensors.float() + 0.5) * 2.0 ** -24, u)
    assert torch.equal(nanoserve.keyed_uniform(keys[:64], 1, "cpu")[:, 0], u[:, 0])
    assert 0 < u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01


def _fmix32_as_published(h: int) -> int:
    """MurmurHash3's fmix32 on a Python int, written independently of nanoserve's."""
    for shift, c in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * c) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_keyed_uniform_is_one_hash_on_every_path():
    """The CPU's numpy uint32 columns, the GPU's int64 tensor kernels (run here on CPU
    tensors, and on a GPU when there is one) and a plain-Python fmix32 give the same bits:
    keys at the edges of their 32-bit halves, and B, n that leave the CPU's last block of
    rows short (blocks of 65536 // 3000 = 21 rows)."""
    g = torch.Generator().manual_seed(0)
    keys = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 2**32, 2**63 - 1]
    keys += torch.randint(2**63 - 1, (56,), generator=g).tolist()
    n = 3000
    u = nanoserve.keyed_uniform(keys, n, "cpu")                                      # (64, n)
    k32 = [_fmix32_as_published((k & 0xFFFFFFFF) ^ _fmix32_as_published(k >> 32)) for k in keys]
    for i in range(len(keys)):
        for j in (0, 1, 1234, n - 1):
            bits = _fmix32_as_published((k32[i] + j * 0x9E3779B9) & 0xFFFFFFFF) >> 8
            assert u[i, j] == (bits + 0.5) * 2.0 ** -24, (keys[i], j)
    as_tensors = nanoserve._column_bits(torch.tensor(k32)[:, None], torch.arange(n))
    assert torch.equal((as_tensors.float() + 0.5) * 2.0 ** -24, u)
    if torch.cuda.is_available():
        assert torch.equal(nanoserve.keyed_uniform(keys, n, "cuda").cpu(), u)


def test_chi_square_pvalue_is_calibrated():
    # Under the null the p-value is uniform: about ALPHA of 2000 honest runs fall below 0.05.
    probs = torch.tensor([0.5, 0.3, 0.2])
    g = torch.Generator().manual_seed(0)
    below = sum(chi_square_pvalue(torch.bincount(torch.multinomial(probs, 500, True, generator=g),
                                                 minlength=3).double(), probs) < 0.05 for _ in range(2000))
    assert abs(below / 2000 - 0.05) < 0.02
    assert math.isclose(chi_square_pvalue(torch.tensor([50.0, 50.0]), torch.tensor([0.5, 0.5])), 1.0)


# ----------------------------------------------------------------------------- penalties

def _reference_penalties(logits, p, prompt, output):
    """vLLM's definitions, one token at a time."""
    out = logits.clone()
    for t in range(logits.shape[0]):
        count = output.count(t)
        if (t in prompt or count) and p.repetition_penalty != 1:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        out[t] += (p.logit_bias or {}).get(t, 0.0)
    return out


@pytest.mark.parametrize("kw", [dict(presence_penalty=1.5), dict(frequency_penalty=0.7), dict(frequency_penalty=-0.5),
                                dict(repetition_penalty=1.3), dict(repetition_penalty=0.8),
                                dict(logit_bias={3: -100, 7: 5.5}),
                                dict(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.2,
                                     logit_bias={0: 100})])
def test_penalties_and_logit_bias_match_a_direct_computation(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g) * 3
    prompts, outputs = [[1, 2], [5], []], [[3, 3, 4], [], [9, 9, 9, 1]]
    params = [SamplingParams(**kw)] * 3
    before = logits.clone()
    got = nanoserve.apply_penalties(logits, params, prompts, outputs)
    assert torch.equal(logits, before)                          # a new tensor: the logprobs read these
    for i in range(3):
        torch.testing.assert_close(got[i], _reference_penalties(logits[i], params[i], prompts[i], outputs[i]))
    plain = nanoserve.apply_penalties(logits, [SamplingParams()] * 3, prompts, outputs)
    assert plain is logits                                      # nothing to do: no copy


def test_penalty_counts_kept_per_sequence_equal_counting_the_lists():
    """The engine's penalties (Sampler.penalize over PenaltyCounts, which counts only the
    tokens appended since the last step) equal apply_penalties on the whole token lists,
    bit for bit, through 30 steps of: tokens appended one or three at a time (a speculative
    window), a sequence listed twice in a step (a window's rows), draft tokens on top, a
    sequence without penalties beside them, one cut short (a stop string), finished ones
    whose rows new sequences reuse, and steps that take 4 of the 6 sequences with rows for
    only 4 (max_num_seqs): a sequence outside the step gives its row up, rebuilt later."""
    rng = random.Random(0)
    V = 50
    sampler = nanoserve.Sampler(torch.device("cpu"), 0, V, 4)
    kinds = [dict(frequency_penalty=0.5), dict(presence_penalty=-1.0, repetition_penalty=1.3),
             dict(repetition_penalty=0.7, logit_bias={4: 3.0}), {}]

    def new_seq(i):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 9))]
        return nanoserve.Sequence(f"r{i}", None, prompt, len(prompt), SamplingParams(**kinds[i % 4]),
                                  nanoserve.Metrics(0.0))
    seqs = [new_seq(i) for i in range(6)]
    for step in range(30):
        for s in seqs:
            s.token_ids += [rng.randrange(V) for _ in range(rng.choice([1, 1, 3]))]
        if step % 7 == 3:                                       # a stop string cuts one short
            seqs[1].token_ids = seqs[1].token_ids[:seqs[1].num_prompt_tokens + 1]
        if step % 5 == 4:                                       # one finishes, a new one comes
            seqs[0].finish_reason = "length"
            seqs = seqs[1:] + [new_seq(6 + step)]
        step_seqs = rng.sample(seqs, 4)
        rows = step_seqs + step_seqs[:2]
        extra = [[rng.randrange(V) for _ in range(rng.randrange(3))] for _ in rows]
        logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(step)) * 3
        params = [s.params for s in rows]
        got = sampler.penalize(logits, params, rows, extra)
        want = nanoserve.apply_penalties(logits, params, [s.token_ids[:s.num_prompt_tokens] for s in rows],
                                         [s.output_ids + e for s, e in zip(rows, extra)])
        assert torch.equal(got, want), step
    assert sampler.penalty_counts.counts.shape[0] == 5          # never more rows than max_num_seqs + 1


def test_penalties_apply_per_row_in_a_mixed_batch():
    logits = torch.zeros(2, 6)
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    got = nanoserve.apply_penalties(logits, params, [[0], [0]], [[2, 2], [2, 2]])
    assert got[0, 2] == -2.0 and got[1, 2] == 0.0


def test_sampling_metadata_is_remade_only_when_the_batch_changes_its_requests(tiny_model_dir, monkeypatch):
    """The sampler's parameter tensors (SamplingMetadata) cross to the device when a step's
    rows are other requests than the last step's, not at every step. Two rows at a time: a
    request that finishes hands its row to a waiting one with other parameters (greedy after
    sampled, top-k, top-p), which the kept tensors must not carry over: every request's
    tokens are those it gets alone."""
    requests = [SamplingParams(temperature=1.0, seed=1, max_tokens=2, ignore_eos=True),
                SamplingParams(temperature=0.7, top_k=5, seed=2, max_tokens=11, ignore_eos=True),
                SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                SamplingParams(temperature=1.3, top_p=0.8, seed=4, max_tokens=3, ignore_eos=True)]
    prompts = [[1, 5, 9], [1, 7], [1, 3, 3, 8], [1, 2]]
    llm = nanoserve.LLM(tiny_model_dir, device="cpu", max_num_seqs=2)
    alone = [llm.generate([q], p)[0].token_ids for q, p in zip(prompts, requests)]
    made, make = [], nanoserve.SamplingMetadata.make
    monkeypatch.setattr(nanoserve.SamplingMetadata, "make",
                        staticmethod(lambda params, *a: made.append(len(params)) or make(params, *a)))
    steps = llm.engine.num_steps
    together = [o.token_ids for o in llm.generate(prompts, requests)]
    assert together == alone
    # 11 steps: {0, 1} for 2, then 2 joins as 0 ends (4 steps), then 3 as 2 ends (3), then 1 alone.
    assert made == [2, 2, 2, 1] and llm.engine.num_steps - steps == 11
    # an empty batch, and a greedy one (an argmax: no parameters copied)
    assert nanoserve.SamplingMetadata.make([], 10, torch.device("cpu")).temperature.shape == (0,)
    made.clear()
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=3))
    assert made == []
