"""parallel: tensor parallelism for nanoserve, applied to a model that has been built.

nanoserve's model knows nothing of ranks. This file takes a loaded LlamaForCausalLM and
shards it in place, as gpt-fast's `apply_tp` does: each weight is cut to one rank's part,
the modules are resized to that part, and the forward pass gains its collectives through
forward hooks and one wrapper module. Then come the ranks themselves: rank 0's model
runner, the workers' loop, and how the processes start (spawned on this machine, or
joined from a torchrun job).

    sharding   TPGroup -> tp_local_config -> tp_shard -> apply_tp -> load_sharded
    the ranks  TensorParallelRunner -> tp_worker_loop -> start_tensor_parallel

The engine imports this file only when tensor_parallel_size > 1
(`LLM(..., tensor_parallel_size=2)`, `python nanoserve.py --tensor-parallel-size 2`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanoserve import (DTYPES, EngineConfig, LlamaForCausalLM, LLMEngine, ModelConfig, ModelRunner, QuantLinear,
                       default_cpu_threads, load_model, read_model_config)

# ============================================================================ sharding
# Megatron-LM's sharding of a decoder over N ranks, two all-reduces per layer:
#   attention  q/k/v column-parallel: rank r computes its H/N query heads and their KV
#              heads (whole heads, so attention itself needs no communication); o_proj
#              row-parallel: rank r holds the columns of its heads and the partial outputs
#              (T, D) are summed across ranks (all-reduce 1).
#   MLP        gate/up column-parallel (F/N rows each; silu acts elementwise, so the split
#              along F needs no communication), down row-parallel: all-reduce 2.
#   vocabulary the embedding and the LM head are split by vocabulary rows; the embedding's
#              lookups are summed (a rank contributes only the ids in its range), the LM
#              head's logits are gathered (each rank scores its share of the vocabulary,
#              which is what an LM head of 128K x 8K weights should not replicate).
# With fewer KV heads than ranks (GQA/MQA), KV heads are replicated: rank r keeps KV head
# r // (N / Hkv), the one its query heads use (vLLM does the same). Each rank keeps its
# own paged KV pool for its heads; all ranks share block ids and tables, since one
# scheduler (rank 0) decides them for all.

class TPGroup:
    """The ranks one model is sharded over and the collectives the model needs; world 1
    (the default) makes each a no-op. `pg` carries tensors (gloo on the CPU, NCCL on GPUs);
    `ctrl`, always gloo, carries rank 0's commands to the workers as pickled objects."""

    def __init__(self, rank: int = 0, world: int = 1, pg=None, ctrl=None, device: str = "cpu"):
        self.rank, self.world, self.pg, self.ctrl, self.device = rank, world, pg, ctrl, device
        self.reduce_seconds = 0.0           # time spent in all-reduce (the benchmark's share)

    def close(self) -> None:
        """Drop the process groups now, while the interpreter can still run their destructors
        (which stop gloo's threads). Left to the interpreter's teardown, a thread can be
        destroyed still running, which aborts the process ("terminate called without an
        active exception") after its work is done."""
        self.pg = self.ctrl = None

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum x (in place) over the ranks."""
        if self.world > 1:
            t = time.perf_counter()
            self.pg.allreduce([x]).wait()
            self.reduce_seconds += time.perf_counter() - t
        return x

    def all_gather(self, x: Tensor) -> Tensor:
        """(..., k) on every rank -> (..., world * k), rank order."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.pg.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: Tensor) -> Tensor:
        """Rank 0's x into x on every rank."""
        self.pg.broadcast(x, 0).wait()
        return x

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values (e.g. the KV bytes every rank's memory holds)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.ctrl.allreduce([t], opts).wait()
        return int(t)

    def send(self, command: tuple) -> None:
        """Rank 0: a command (a tuple of picklable values) to every worker."""
        data = torch.frombuffer(bytearray(pickle.dumps(command)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self.ctrl.broadcast(size, 0).wait()
        self.ctrl.broadcast(data, 0).wait()

    def recv(self) -> tuple:
        """A worker: wait for rank 0's next command."""
        size = torch.zeros(1, dtype=torch.int64)
        self.ctrl.broadcast(size, 0).wait()
        data = torch.empty(int(size), dtype=torch.uint8)
        self.ctrl.broadcast(data, 0).wait()
        return pickle.loads(data.numpy().tobytes())


def tp_local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """One rank's share of a model: H/N query heads, max(Hkv/N, 1) KV heads, F/N of the
    MLP, ceil(V/N) vocabulary rows. Shapes that do not split are refused by name."""
    H, Hkv, F_ = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if H % world:
        raise ValueError(f"tensor_parallel_size {world} must divide the model's num_attention_heads ({H})")
    if Hkv % world and world % Hkv:
        raise ValueError(f"tensor_parallel_size {world} and num_key_value_heads ({Hkv}) must divide one "
                         "another (KV heads are split, or replicated when fewer than the ranks)")
    if F_ % world:
        raise ValueError(f"tensor_parallel_size {world} must divide the model's intermediate_size ({F_})")
    return dataclasses.replace(cfg, num_attention_heads=H // world, num_key_value_heads=max(1, Hkv // world),
                               intermediate_size=F_ // world, vocab_size=-(-cfg.vocab_size // world),
                               head_dim=cfg.head_dim)


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def tp_shard(name: str, t: Tensor, cfg: ModelConfig, tp: TPGroup) -> Tensor:
    """Rank tp.rank's part of the whole model's tensor `name` (cfg: the whole model's
    config), as a view. Column-parallel projections keep their rows (outputs), row-parallel
    ones their columns (inputs): for a packed 4-bit qweight two inputs per byte, for scales
    and zero points whole groups. A row-parallel bias is added once, by rank 0. Norm
    weights are replicated. The vocabulary is padded with zero rows to a multiple of the ranks."""
    r, N = tp.rank, tp.world
    hd, H, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    module, _, leaf = name.rpartition(".")
    kind = module.rpartition(".")[2]
    if kind in ("embed_tokens", "lm_head"):
        n = -(-cfg.vocab_size // N)                                         # rows per rank
        part = t[r * n:(r + 1) * n]
        return torch.cat([part, part.new_zeros(n - part.shape[0], *part.shape[1:])]) if part.shape[0] < n else part
    if kind in COLUMN_PARALLEL:
        if leaf == "perm":                  # act-order: the input order, the same on every rank
            return t
        if kind == "q_proj":
            lo, n = r * (H // N) * hd, (H // N) * hd
        elif kind in ("k_proj", "v_proj"):
            head = r * Hkv // N if Hkv >= N else r // (N // Hkv)
            lo, n = head * hd, max(1, Hkv // N) * hd
        else:
            lo, n = r * (cfg.intermediate_size // N), cfg.intermediate_size // N
        return t[lo:lo + n]
    if kind in ROW_PARALLEL:
        full_in = H * hd if kind == "o_proj" else cfg.intermediate_size
        n = full_in // N
        if leaf == "bias":
            return t if r == 0 else torch.zeros_like(t)
        if leaf == "perm":
            raise ValueError(f"{name}: an act-order (desc_act) checkpoint's row-parallel layers read "
                             "their inputs in a global order and cannot be split across ranks")
        if leaf == "weight":
            return t[:, r * n:(r + 1) * n]
        if leaf == "qweight":
            per = t.shape[1] / full_in                                      # bytes per input: 1/2 or 1
            if (n * per) % 1:
                raise ValueError(f"{name}: {n} inputs per rank do not fill whole bytes of packed codes")
            w = int(n * per)
            return t[:, r * w:(r + 1) * w]
        if leaf in ("scales", "zeros"):
            groups = t.shape[1]
            if groups == 1:                                                # per channel: replicated
                return t
            if groups % N or full_in % groups:
                raise ValueError(f"{name}: {groups} quantization groups do not split over {N} ranks")
            g = groups // N
            return t[:, r * g:(r + 1) * g]
    return t


class VocabParallelEmbedding(nn.Module):
    """The embedding's rows [first, first + n) of the vocabulary, padded. A rank looks up the
    ids in its range and gives zeros for the rest; the sum over ranks is every id's row.
    The weight keeps its name (model.embed_tokens.weight) and may be the LM head's too."""

    def __init__(self, weight: nn.Parameter, first: int, tp: TPGroup):
        super().__init__()
        self.weight = weight                                                 # (V / ranks, D)
        self.first, self.tp = first, tp

    def forward(self, input_ids: Tensor) -> Tensor:
        n = self.weight.shape[0]
        local = input_ids - self.first                                       # (T,)
        mine = ((local >= 0) & (local < n)).to(self.weight.dtype)
        return self.tp.all_reduce(F.embedding(local.clamp(0, n - 1), self.weight) * mine[..., None])  # (T, D)


def apply_tp(model: LlamaForCausalLM, tp: TPGroup) -> None:
    """Shard a built model over tp's ranks in place (gpt-fast's apply_tp): every weight and
    quantized buffer is cut to this rank's part (tp_shard) and copied, so the whole tensor
    can be freed; the modules take this rank's sizes (model.config becomes
    tp_local_config's, model.vocab_size stays the whole vocabulary); and the forward pass
    gains its collectives: a sum after o_proj and down_proj and a gather of the LM head's
    logits (forward hooks), the embedding's sum (VocabParallelEmbedding). Run it before
    the model runner fuses projections. A checkpoint that cannot split raises ValueError."""
    cfg = model.config
    local = tp_local_config(cfg, tp.world)
    embed = model.model.embed_tokens
    tied = model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    D, hd, Hl, Hkvl, Fl = cfg.hidden_size, cfg.head_dim, local.num_attention_heads, \
        local.num_key_value_heads, local.intermediate_size
    sizes = {"q_proj": (D, Hl * hd), "k_proj": (D, Hkvl * hd), "v_proj": (D, Hkvl * hd),       # (in, out)
             "o_proj": (Hl * hd, D), "gate_proj": (D, Fl), "up_proj": (D, Fl), "down_proj": (Fl, D),
             "lm_head": (D, local.vocab_size)}
    for name, module in model.named_modules():
        for leaf, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tied and module is model.lm_head:
                continue                               # the embedding's weight: cut once, shared below
            part = tp_shard(f"{name}.{leaf}", t.detach(), cfg, tp).clone()
            setattr(module, leaf, nn.Parameter(part, requires_grad=False) if isinstance(t, nn.Parameter) else part)
        kind = name.rpartition(".")[2]
        if kind in sizes:
            module.in_features, module.out_features = sizes[kind]
        if isinstance(module, QuantLinear):
            module.cache.pop("cpu", None)              # a repacking of the whole weight is stale
    model.model.embed_tokens = VocabParallelEmbedding(embed.weight, tp.rank * local.vocab_size, tp)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.model.layers:
        layer.self_attn.n_heads, layer.self_attn.n_kv = Hl, Hkvl
    model.config = local

    def summed(module: nn.Module, args: tuple, out: Tensor) -> Tensor:      # a row-parallel layer's partial sums
        return tp.all_reduce(out)                                            # (T, D)

    def gathered(module: nn.Module, args: tuple, logits: Tensor) -> Tensor:  # (N, V / ranks)
        return tp.all_gather(logits)[..., :model.vocab_size]                 # (N, V), the padding cut off

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(summed)
        layer.mlp.down_proj.register_forward_hook(summed)
    model.lm_head.register_forward_hook(gathered)


def load_sharded(model_dir: str | Path, dtype: torch.dtype, device: torch.device, tp: TPGroup
                 ) -> tuple[LlamaForCausalLM, ModelConfig]:
    """This rank's share of a model. A checkpoint is loaded on the CPU as stored (views of
    the memory-mapped files, nothing read yet), sharded (only this rank's slices are read
    and copied), and only then cast to dtype and moved to the device: a rank holds its
    share, never the whole model, beyond a hub GPTQ/AWQ checkpoint's projections, which
    are converted whole first. Random weights (random:PRESET) exist only whole: each rank
    makes them on the device, as one rank would, and keeps its share.
    -> (model, the whole model's config)."""
    made = str(model_dir).startswith("random:")
    model, cfg = load_model(model_dir, dtype if made else None, device if made else torch.device("cpu"))
    apply_tp(model, tp)
    return model.to(device=device, dtype=dtype), cfg


# ============================================================================ the ranks
# Rank 0 is the engine: it schedules, samples and talks to clients, and its ModelRunner is
# a TensorParallelRunner that sends every call to the workers before making it itself, so
# all ranks run the same forward pass on their shards (the all-reduces inside keep them in
# step). Workers are a loop: receive a command, run it on their own ModelRunner. On one
# machine the engine starts them (torch.multiprocessing, "spawn"); across machines
# torchrun starts one process per rank and the rank > 0 processes enter the same loop
# (tp_worker_from_env). A speculative draft model runs on rank 0 only, unsharded: it is
# small, and its proposals are host-side token ids the target's pass then verifies.

class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: each call is first sent to the workers."""

    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, max_positions: int, tp: TPGroup,
                 workers: list):
        super().__init__(model, cfg, max_positions)
        self.tp, self.workers = tp, workers        # the engine stops the workers (stop_workers)

    def kv_budget_bytes(self) -> int:
        self.tp.send(("kv_budget",))
        return self.tp.min_int(super().kv_budget_bytes())             # what every rank can hold

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.tp.send(("allocate", num_blocks))
        super().allocate_kv_cache(num_blocks)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.tp.send(("copy_blocks", copies))
        super().copy_blocks(copies)

    def run(self, tokens: list[list[int]], starts: list[int], tables: list[list[int]],
            pending: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """pending is always None: the engine schedules synchronously (its tokens are sent)."""
        if pending is not None:
            raise ValueError("async scheduling cannot run a sharded model: the workers need every token")
        self.tp.send(("run", tokens, starts, tables))
        return super().run(tokens, starts, tables)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """The workers get the rows to score from rank 0 (every rank's hidden states are
        the same after the last all-reduce, but only rank 0 knows which rows it samples)."""
        self.tp.send(("logits", tuple(hidden.shape)))
        self.tp.broadcast(hidden.contiguous())
        return super().compute_logits(hidden)


def stop_workers(tp: TPGroup, workers: list) -> None:
    """Tell the workers to exit and wait for them (spawned ones are terminated if they hang)."""
    try:
        tp.send(("exit",))
    except Exception:                        # a worker already gone: nothing left to tell
        pass
    for p in workers:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    tp.close()


def tp_worker_loop(tp: TPGroup) -> None:
    """A worker's life: build its shard from rank 0's ("init", ...) command, then run each
    command until ("exit",)."""
    _, model_dir, cfg = tp.recv()
    model, mc = load_sharded(model_dir, DTYPES[cfg.dtype], torch.device(tp.device), tp)
    if tp.device == "cpu":
        threads = cfg.cpu_threads or default_cpu_threads(sum(p.numel() for p in model.parameters()), tp.world)
        if threads:
            torch.set_num_threads(threads)
    max_positions = LLMEngine._max_model_len(cfg.max_model_len, mc) + cfg.num_speculative_tokens + 1
    runner = ModelRunner(model, dataclasses.replace(cfg, device=tp.device), max_positions)
    with torch.inference_mode():
        while True:
            command, *args = tp.recv()
            if command == "run":
                runner.run(*args)
            elif command == "logits":
                runner.compute_logits(tp.broadcast(torch.empty(args[0], dtype=runner.dtype, device=tp.device)))
            elif command == "kv_budget":
                tp.min_int(runner.kv_budget_bytes())
            elif command == "allocate":
                runner.allocate_kv_cache(*args)
            elif command == "copy_blocks":
                runner.copy_blocks(*args)
            elif command == "exit":
                tp.close()
                return


def make_tp_group(rank: int, world: int, store: dist.Store, device: str) -> TPGroup:
    """Process groups over a shared key-value store: NCCL for tensors on GPUs, gloo on the
    CPU, and a gloo group for commands. The command group never times out: an idle server
    sends none for as long as it is idle (a dead rank 0 still ends the wait: its sockets close)."""
    data = dist.PrefixStore("data/", store)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        pg = dist.ProcessGroupNCCL(data, rank, world)
    else:
        pg = dist.ProcessGroupGloo(data, rank, world, timedelta(minutes=30))
    ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl/", store), rank, world, timedelta(days=365))
    return TPGroup(rank, world, pg, ctrl, device)


def rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device.startswith("cuda") else "cpu"


def _spawned_worker(rank: int, world: int, port: int, device: str, parent: int) -> None:
    """Entry point of a worker the engine spawned on this machine. It exits with its parent:
    a watchdog thread sees the parent go (re-parenting changes getppid) and ends the process."""
    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watchdog, daemon=True).start()
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=120))
    try:
        tp_worker_loop(make_tp_group(rank, world, store, rank_device(device, rank)))
    except Exception as e:                   # rank 0 gone, or a failure here: say so and exit
        print(f"[nanoserve] tensor-parallel worker {rank} exits: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)


def torchrun_store() -> dist.Store:
    """The key-value store of a torchrun job: torchrun's own agent store when it offers it
    (TORCHELASTIC_USE_AGENT_STORE), else one hosted by rank 0 at MASTER_ADDR:MASTER_PORT."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=timedelta(seconds=300), wait_for_workers=False)
    return dist.PrefixStore("nanoserve/", store)


def start_tensor_parallel(model_dir: str | Path, cfg: EngineConfig) -> tuple[TPGroup, list]:
    """Rank 0's side: join a torchrun job (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the
    environment), or spawn tensor_parallel_size - 1 workers on this machine; then send
    them the model to load. A model whose shapes do not split is refused before anything
    starts. -> (the group, the spawned processes)."""
    world = cfg.tensor_parallel_size
    tp_local_config(read_model_config(model_dir), world)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:                       # under torchrun
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but "
                             f"tensor_parallel_size is {world}")
        tp = make_tp_group(0, world, torchrun_store(), rank_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0))))
        workers = []
    else:
        with socket.socket() as s:                                     # a free port for the store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=timedelta(seconds=120),
                              wait_for_workers=False)
        ctx = torch.multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=_spawned_worker, args=(r, world, port, cfg.device, os.getpid()), daemon=True,
                               name=f"nanoserve-tp-{r}") for r in range(1, world)]
        for p in workers:
            p.start()
        tp = make_tp_group(0, world, store, rank_device(cfg.device, 0))
    tp.send(("init", str(model_dir), cfg))
    return tp, workers


def tp_worker_from_env(device: str) -> None:
    """A rank > 0 process of a torchrun job: serve rank 0's commands until it exits."""
    rank = int(os.environ["RANK"])
    tp_worker_loop(make_tp_group(rank, int(os.environ["WORLD_SIZE"]), torchrun_store(),
                                 rank_device(device, int(os.environ.get("LOCAL_RANK", 0)))))
