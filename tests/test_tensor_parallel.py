"""Tensor parallelism on the CPU: N gloo ranks in N processes must produce, token for token,
what one rank does (greedy, fp32). The ranks sum partial matmuls in another order than one
rank does, so logits differ in the last bits; the checkpoints here have peaked logits (no
near-ties), as trained models do, and the outputs are compared exactly."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, STORIES, TINY_CONFIG, needs_stories, write_random_checkpoint

import nanoserve
import quant
from nanoserve import LLM, SamplingParams

PROMPTS = [[1, 17, 42, 99, 7, 3], [1] + list(range(20, 60)), [1, 250, 12], [1, 5] * 30]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def outputs(model_dir, tp: int, prompts=PROMPTS, params=GREEDY, **kw) -> list[list[int]]:
    with LLM(model_dir, device="cpu", tensor_parallel_size=tp, **kw) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory):
    """One KV head for 8 query heads: under 2 ranks the KV head is replicated."""
    return write_random_checkpoint(tmp_path_factory.mktemp("mqa"), dict(TINY_CONFIG, num_key_value_heads=1))


@pytest.mark.parametrize("case", ["random-2", "random-4", "mqa-2",
                                  pytest.param("stories-2", marks=needs_stories),
                                  pytest.param("stories-4", marks=needs_stories)])
def test_n_ranks_give_the_tokens_of_one(case, tiny_model_dir, mqa_dir):
    """random (8 heads, 2 KV heads): 2 ranks split the KV heads, 4 replicate them; mqa:
    1 KV head on 2 ranks; stories260K (8 heads, 4 KV heads, trained) on 2 and 4 ranks."""
    name, tp = case.split("-")
    model_dir = {"random": tiny_model_dir, "mqa": mqa_dir, "stories": STORIES}[name]
    prompts = [[t % 300 for t in p] for p in PROMPTS]
    assert outputs(model_dir, int(tp), prompts) == outputs(model_dir, 1, prompts)


def test_a_quantized_checkpoint_runs_sharded(tiny_model_dir, tmp_path):
    """int4 groups of 16 (RTN): q/k/v/gate/up split by rows, o/down by packed input bytes and
    whole groups of scales."""
    llm = LLM(tiny_model_dir, device="cpu")
    calib = torch.randint(3, 300, (2, 32))
    cfg = quant.quantize_model(llm.engine.model, calib, "rtn", 4, 16, True)
    quant.save_quantized(llm.engine.model, tiny_model_dir, tmp_path / "q", cfg)
    assert isinstance(LLM(tmp_path / "q", device="cpu").engine.model.model.layers[0].mlp.down_proj,
                      nanoserve.QuantLinear)
    prompts = [[t % 300 for t in p] for p in PROMPTS]
    assert outputs(tmp_path / "q", 2, prompts) == outputs(tmp_path / "q", 1, prompts)


def test_scheduling_features_compose_with_two_ranks():
    """On the bundled model (8 heads, 2 KV heads): a KV pool small enough to preempt, a
    prefill budget that chunks prompts, a shared prefix (prefix caching), n-gram and draft
    speculation, and parallel sampling (copy-on-write block copies, sent to the workers)."""
    model = nanoserve.DEFAULT_MODEL
    shared = list(range(3, 70))
    prompts = [[1] + shared + [100 + i] for i in range(4)] + [[1, 9, 8, 7] * 10]
    tight = dict(num_blocks=14, block_size=8, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=112)
    with LLM(model, device="cpu", tensor_parallel_size=2, **tight) as two:
        sharded = [o.token_ids for o in two.generate(prompts, GREEDY)]
        st = two.stats()
    assert st["preemptions"] > 0 and st["prefix_cache_hit_rate"] > 0         # the features did run
    assert sharded == outputs(model, 1, prompts, **tight)
    for spec in (dict(speculative_method="ngram"), dict(draft_model=str(nanoserve.DEFAULT_DRAFT))):
        assert outputs(model, 2, prompts[:2], **spec) == outputs(model, 1, prompts[:2])
    sampled = SamplingParams(temperature=0.8, n=2, max_tokens=12, seed=5)
    with LLM(model, device="cpu", tensor_parallel_size=2) as two, LLM(model, device="cpu") as one:
        a = [[c.token_ids for c in o.outputs] for o in two.generate(prompts[:2], sampled)]
        b = [[c.token_ids for c in o.outputs] for o in one.generate(prompts[:2], sampled)]
    assert a == b


def test_shapes_that_do_not_split_are_refused_before_any_worker_starts(tiny_model_dir):
    import multiprocessing
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(tiny_model_dir, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tiny_model_dir, device="cpu", tensor_parallel_size=0)
    assert not multiprocessing.active_children()


def _gone(pid: int) -> bool:
    """Exited (or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_workers_exit_when_the_engine_closes_or_dies(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", tensor_parallel_size=2)
    pids = [p.pid for p in llm.engine.runner.workers]
    llm.close()
    assert _wait_gone(pids, 15), "workers outlived close()"
    # A rank 0 killed outright (no cleanup runs): its workers notice and exit.
    script = (f"import sys, os, signal; sys.path.insert(0, {str(ROOT)!r}); import nanoserve\n"
              f"llm = nanoserve.LLM({str(tiny_model_dir)!r}, device='cpu', tensor_parallel_size=2)\n"
              "print(*[p.pid for p in llm.engine.runner.workers], flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert pids and _wait_gone(pids, 20), "orphaned tensor-parallel workers"


def test_torchrun_two_nodes_over_loopback_give_the_one_rank_output():
    """The multi-node path: torchrun with --nnodes 2, one process per "node", both on this
    machine over 127.0.0.1; rank 0 prints the completion, rank 1 serves as a worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--prompt", "def parse(", "--max-tokens", "16", "--temperature", "0", "--device", "cpu"]
    one = subprocess.run([sys.executable, str(ROOT / "nanoserve.py"), *args], capture_output=True, text=True,
                         timeout=120)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(ROOT / "nanoserve.py"), *args, "--tensor-parallel-size", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    results = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [r[1][-2000:] for r in results]
    assert one.returncode == 0 and one.stdout.strip()
    assert results[0][0] == one.stdout


@pytest.mark.parametrize("fmt,group,act_order", [("gptq", 32, False), ("awq", 32, False), ("gptq", 64, True)])
def test_hub_gptq_and_awq_checkpoints_shard_and_act_order_is_refused(tmp_path, fmt, group, act_order):
    """Hub layouts are converted (on the meta model's shapes), then cut per rank; an act-order
    checkpoint's row-parallel input permutation cannot be split, and says so."""
    from test_hub_quant import write_pair
    qdir, _ = write_pair(tmp_path, fmt, 4, group, sym=False, act_order=act_order)
    ids = [[1] + [(13 * i + 5) % 290 + 3 for i in range(40)]]
    if act_order:
        with pytest.raises(ValueError, match="act-order"):
            LLM(qdir, device="cpu", tensor_parallel_size=2)
        return
    assert outputs(qdir, 2, ids) == outputs(qdir, 1, ids)
