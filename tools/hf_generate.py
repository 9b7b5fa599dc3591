"""Hugging Face transformers' `generate` behind a pipe: the baseline tools/bench.py measures
nanoserve against, in an interpreter of its own.

    python -I tools/hf_generate.py MODEL_DIR DEVICE DTYPE THREADS

transformers 5 imports Hugging Face's `kernels` package whenever a module named `kernels`
can be found, and with nanoserve's directory on sys.path that module is nanoserve's
kernels.py: the import fails, and within one process whichever `kernels` comes first, the
other side gets the wrong one. So the benchmark starts this script with `python -I`
(isolated: neither the script's directory nor the working directory nor PYTHONPATH is on
sys.path) and talks to it in JSON lines. It loads the checkpoint and writes

    {"transformers": version, "vocab_size": V, "threads": torch threads}

then answers each request on stdin,

    {"prompts": [[token ids], ...], "new_tokens": [n, ...], "generate": {generate's options}}

with {"seconds": s, "tokens": [[token ids], ...]}: the prompts run as one left-padded batch
to the longest output (static batching, as `generate` batches), each row's first n new
tokens, and s the time of the generate call alone (the pipe and the JSON are outside it).
"""

import json
import os
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> None:
    model_dir, device, dtype, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # Replies go to the pipe on fd 1; everything else printed (by Python or by C code) to stderr.
    pipe = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        pipe.write(json.dumps(obj) + "\n")
        pipe.flush()

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    reply({"transformers": transformers.__version__, "vocab_size": hf.config.vocab_size,
           "threads": torch.get_num_threads()})
    for line in sys.stdin:
        req = json.loads(line)
        prompts, new = req["prompts"], req["new_tokens"]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)            # (B, width)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(new), min_new_tokens=max(new),
                              pad_token_id=0, **req["generate"])                             # (B, width + max(new))
        sync(device)
        seconds = time.perf_counter() - t
        reply({"seconds": seconds, "tokens": [row[:n] for row, n in zip(out[:, width:].tolist(), new)]})


if __name__ == "__main__":
    main()
