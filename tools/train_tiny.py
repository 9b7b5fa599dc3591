"""Train nanoserve's bundled models: a sentencepiece tokenizer, a ~5M-parameter Llama/GQA
target and a ~1M-parameter draft distilled from it, on Python's own standard library.

    python tools/train_tiny.py                    # writes models/ (about 40 min on 2 CPU cores)
    python tools/train_tiny.py --quick --out /tmp/m   # a minute, for checking the pipeline

Data: every .py file of the running interpreter's standard library (tests, idlelib and
site-packages left out), sorted by path. A file is held out for evaluation when the CRC32
of its relative path is 0 mod 10, so the split is fixed and needs no list.

Knowledge distillation (Hinton et al. 2015): the draft learns from the target's whole
distribution, softened by temperature T, instead of from the one-hot next token:
    loss = T^2 * KL( softmax(z_target / T) || softmax(z_draft / T) )
The relative probabilities of the "wrong" tokens (the dark knowledge) say which tokens
the target finds plausible, which is exactly what a speculative draft must imitate: its
acceptance rate is sum_x min(p(x), q(x)) = 1 - TV(p, q). A draft of the same size trained
on the data alone is trained too, as the control.

Deterministic for a given --seed on a given machine (torch's CPU kernels).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import nanoserve  # noqa: E402

VOCAB = 2048
TARGET = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2)                     # GQA 4:1, head_dim 32
DRAFT = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1)                      # MQA, head_dim 32


def corpus() -> tuple[list[str], list[str]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
    train, held = [], []
    for p in sorted(lib.rglob("*.py")):
        rel = p.relative_to(lib).as_posix()
        if skip & set(p.relative_to(lib).parts):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        (held if zlib.crc32(rel.encode()) % 10 == 0 else train).append(text)
    return train, held


def train_tokenizer(texts: list[str], out: Path, vocab: int) -> nanoserve.Tokenizer:
    import sentencepiece as spm
    buf = io.BytesIO()
    # identity normalisation and no dummy prefix: spaces, tabs and newlines are kept as
    # they are, so indentation survives a round trip; byte fallback covers any character.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"], max_sentence_length=1 << 22, character_coverage=1.0,
        num_threads=2, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    return nanoserve.Tokenizer(out / "tokenizer.model")


def encode(tok: nanoserve.Tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t) + [tok.eos_id]                  # BOS file EOS
    return torch.tensor(ids, dtype=torch.int64)


def make_config(shape: dict, max_pos: int) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                torch_dtype="bfloat16", **shape)


def build(cfg: dict, seed: int) -> nanoserve.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = nanoserve.LlamaForCausalLM(nanoserve.ModelConfig(**{k: v for k, v in cfg.items()
                                                               if k in nanoserve.ModelConfig.__dataclass_fields__}))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):   # GPT-2 residual scaling
                p.data /= math.sqrt(2 * cfg["num_hidden_layers"])
    model.lm_head.weight = model.model.embed_tokens.weight             # tied
    return model


def batches(data: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train(model, data, steps: int, seq: int, batch: int, lr: float, seed: int, label: str,
          teacher=None, kd_temperature: float = 2.0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    it = batches(data, seq, batch, gen)
    t0 = time.time()
    for step in range(steps):
        x, y = next(it)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        logits = model.forward_dense(x)                                       # (B, T, V)
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                t_logits = teacher.forward_dense(x)
            T = kd_temperature
            loss = T * T * F.kl_div(F.log_softmax(logits / T, -1).flatten(0, 1),
                                    F.log_softmax(t_logits / T, -1).flatten(0, 1),
                                    log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"[{label}] step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"{el:.0f}s elapsed, ~{el / (step + 1) * (steps - step - 1):.0f}s left", flush=True)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, windows: int) -> float:
    """Held-out perplexity over fixed, evenly spaced windows."""
    starts = torch.linspace(0, len(data) - seq - 2, windows).long().tolist()
    nll = 0.0
    for s in starts:
        x = data[s:s + seq + 1]
        logits = model.forward_dense(x[None, :-1])[0]
        nll += F.cross_entropy(logits, x[1:], reduction="sum").item()
    return math.exp(nll / (windows * seq))


@torch.no_grad()
def expected_acceptance(target, draft, data: torch.Tensor, seq: int, windows: int) -> float:
    """Mean over held-out positions of sum_x min(p, q): the acceptance probability of one
    speculative token at temperature 1 (Leviathan et al. 2023)."""
    starts = torch.linspace(0, len(data) - seq - 2, windows).long().tolist()
    acc = []
    for s in starts:
        x = data[s:s + seq][None]
        p = target.forward_dense(x).softmax(-1)
        q = draft.forward_dense(x).softmax(-1)
        acc.append(torch.minimum(p, q).sum(-1).mean().item())
    return sum(acc) / len(acc)


def save(model, cfg: dict, out: Path, tokenizer: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    nanoserve.save_safetensors(state, out / "model.safetensors", {"format": "pt"})
    (out / "tokenizer.model").write_bytes(tokenizer.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-steps", type=int, default=1500)
    ap.add_argument("--draft-steps", type=int, default=800)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the figures")
    ap.add_argument("--quick", action="store_true", help="a few steps, to check the pipeline")
    args = ap.parse_args()
    if args.quick:
        args.target_steps, args.draft_steps = 20, 10
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_texts, held_texts = corpus()
    print(f"corpus: {len(train_texts)} training files, {len(held_texts)} held out")
    tok_dir = out / "_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tok = train_tokenizer(train_texts, tok_dir, VOCAB)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    print(f"tokens: {len(train_ids):,} train, {len(held_ids):,} held out")
    max_pos = 2048
    tcfg, dcfg = make_config(TARGET, max_pos), make_config(DRAFT, max_pos)
    target = build(tcfg, args.seed)
    n_t = sum(p.numel() for p in target.parameters())
    print(f"target: {n_t / 1e6:.2f}M parameters")
    train(target, train_ids, args.target_steps, args.seq_len, args.batch, 3e-3, args.seed, "target")
    target.eval()
    draft = build(dcfg, args.seed + 1)
    control = build(dcfg, args.seed + 1)
    n_d = sum(p.numel() for p in draft.parameters())
    print(f"draft: {n_d / 1e6:.2f}M parameters")
    train(draft, train_ids, args.draft_steps, args.seq_len, args.batch, 3e-3, args.seed + 2, "draft-kd",
          teacher=target)
    train(control, train_ids, args.draft_steps, args.seq_len, args.batch, 3e-3, args.seed + 2, "draft-ce")
    draft.eval(), control.eval()
    windows = 8 if args.quick else args.eval_windows
    metrics = {
        "seed": args.seed, "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "target_params": n_t, "draft_params": n_d,
        "target_steps": args.target_steps, "draft_steps": args.draft_steps,
        "tokens_per_step": args.seq_len * args.batch,
        "heldout_ppl_target": evaluate(target, held_ids, args.seq_len, windows),
        "heldout_ppl_draft_kd": evaluate(draft, held_ids, args.seq_len, windows),
        "heldout_ppl_draft_ce": evaluate(control, held_ids, args.seq_len, windows),
        "expected_acceptance_kd": expected_acceptance(target, draft, held_ids, args.seq_len, windows),
        "expected_acceptance_ce": expected_acceptance(target, control, held_ids, args.seq_len, windows),
        "train_seconds": round(time.time() - t0),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }
    print(json.dumps(metrics, indent=2))
    save(target, tcfg, out / "nanocoder-5m", tok_dir / "tokenizer.model")
    save(draft, dcfg, out / "nanocoder-1m-draft", tok_dir / "tokenizer.model")
    save(control, dcfg, out / "nanocoder-1m-nokd", tok_dir / "tokenizer.model")
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (tok_dir / "tokenizer.model").unlink()
    tok_dir.rmdir()


if __name__ == "__main__":
    main()
