"""Quality of RTN, GPTQ and AWQ (or, with --sparse, of 2:4 sparsity) on the bundled model:
held-out perplexity and KL(fp || quantized).

    python tools/quant_eval.py [--model models/nanocoder-5m] [--sparse] [--out runs/quant_eval.json]

Held-out data: the standard-library files tools/train_tiny.py held out from training.
Calibration: sequences sampled from the model itself (quant.py's default), so no data
set is needed; the same calibration batch serves every method.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import nanoserve  # noqa: E402
import quant  # noqa: E402
from train_tiny import corpus, encode  # noqa: E402

CONFIGS = [("int8 RTN", "rtn", 8), ("int4 RTN", "rtn", 4), ("int4 GPTQ", "gptq", 4), ("int4 AWQ", "awq", 4),
           ("int3 RTN", "rtn", 3), ("int3 GPTQ", "gptq", 3), ("int3 AWQ", "awq", 3)]


@torch.no_grad()
def evaluate(model, ref_logprobs: list[torch.Tensor] | None, windows: torch.Tensor):
    """-> (perplexity, mean KL(fp || model) per token, this model's log-probs per window)."""
    nll, kl, n, lps = 0.0, 0.0, 0, []
    for i, w in enumerate(windows):
        lp = model.forward_dense(w[None, :-1])[0].log_softmax(-1)              # (T, V)
        nll += F.nll_loss(lp, w[1:], reduction="sum").item()
        n += lp.shape[0]
        if ref_logprobs is not None:
            p = ref_logprobs[i]
            kl += (p.exp() * (p - lp)).sum().item()
        lps.append(lp)
    return math.exp(nll / n), kl / n, lps


def held_out_and_calibration(llm, windows: int, seq_len: int, calib_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (windows, seq_len + 1) token windows spread over the held-out text, and
    (calib_samples, seq_len) calibration sequences the model samples itself (seeds 0..n-1)."""
    data = encode(llm.tokenizer, corpus()[1])
    starts = torch.linspace(0, len(data) - seq_len - 2, windows).long().tolist()
    held = torch.stack([data[s:s + seq_len + 1] for s in starts])
    bos = llm.engine.model.config.bos_token_id
    outs = llm.generate([[bos]] * calib_samples,
                        [nanoserve.SamplingParams(temperature=1.0, max_tokens=seq_len - 1, ignore_eos=True, seed=i)
                         for i in range(calib_samples)])
    return held, torch.tensor([[bos] + o.token_ids for o in outs])


SPARSE_CONFIGS = (("2:4 magnitude", "magnitude", 16), ("2:4 Wanda", "wanda", 16),
                  ("2:4 Wanda + int8 (per channel)", "wanda", 8), ("2:4 Wanda + int4 (groups of 32)", "wanda", 4))


def sparse_quality(base, calib: torch.Tensor, ref: list[torch.Tensor], windows: torch.Tensor,
                   configs=SPARSE_CONFIGS):
    """Each 2:4 configuration applied to a copy of base -> yields {config, ppl, kl} rows."""
    for label, prune, bits in configs:
        model = copy.deepcopy(base)
        quant.sparsify_model(model, calib, prune, bits, 32 if bits == 4 else 0)
        ppl, kl, _ = evaluate(model, ref, windows)
        yield {"config": label, "ppl": ppl, "kl": kl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(nanoserve.DEFAULT_MODEL))
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sparse", action="store_true",
                    help="instead of the quantization sweep: 2:4 sparsity (magnitude, Wanda, Wanda + int8/int4)")
    ap.add_argument("--checkpoints", nargs="*", default=None, metavar="DIR",
                    help="instead of the RTN/GPTQ/AWQ sweep: the held-out perplexity and KL of these checkpoint "
                         "directories (e.g. GPTQ/AWQ checkpoints quant.py --format wrote) against --model")
    args = ap.parse_args()
    torch.manual_seed(0)
    llm = nanoserve.LLM(args.model, device="cpu", dtype="float32")
    base = llm.engine.model
    windows, calib = held_out_and_calibration(llm, args.windows, args.seq_len, args.calib_samples)
    ppl_fp, _, ref = evaluate(base, None, windows)
    rows = [{"config": "fp32", "group_size": None, "ppl": ppl_fp, "kl": 0.0}]
    if args.checkpoints is not None:
        print(f"| checkpoint | held-out perplexity | KL(fp32 || it) |\n| --- | --- | --- |\n"
              f"| {args.model} (fp32) | {ppl_fp:.3f} | 0 |")
        for d in args.checkpoints:
            ppl, kl, _ = evaluate(nanoserve.LLM(d, device="cpu", dtype="float32").engine.model, ref, windows)
            rows.append({"config": d, "ppl": ppl, "kl": kl})
            print(f"| {d} | {ppl:.3f} | {kl:.4f} |", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
        return
    if args.sparse:
        print(f"| weights | held-out perplexity | KL(fp32 || it) |\n| --- | --- | --- |\n| fp32 dense | {ppl_fp:.3f} | 0 |")
        for row in sparse_quality(base, calib, ref, windows):
            rows.append(row)
            print(f"| {row['config']} | {row['ppl']:.3f} | {row['kl']:.4f} |", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
        return
    print(f"| weights | per channel: ppl | KL | group 32: ppl | KL |\n| --- | --- | --- | --- | --- |\n"
          f"| fp32 | {ppl_fp:.3f} | 0 | {ppl_fp:.3f} | 0 |", flush=True)
    for label, method, bits in CONFIGS:
        cells = []
        for G in (0, 32):
            t = time.time()
            model = copy.deepcopy(base)
            quant.quantize_model(model, calib, method, bits, G)
            ppl, kl, _ = evaluate(model, ref, windows)
            rows.append({"config": label, "group_size": G, "ppl": ppl, "kl": kl, "seconds": time.time() - t})
            cells += [f"{ppl:.3f}", f"{kl:.4f}"]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "windows": args.windows, "seq_len": args.seq_len,
                                              "calibration": f"{args.calib_samples} model samples",
                                              "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
