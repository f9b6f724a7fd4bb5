#!/usr/bin/env bash
# The device checks in one command, for a lent GPU machine (issues "Quantized weights" and "A stage as fast as the
# best single-device engine"): bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. the CUDA kernels against dequantized references (tests/test_quant.py's CUDA tests: int4 on sm80+, the
#    dequantizing path below that), and the bundled model's tokens on CUDA equal to its tokens on the CPU;
# 2. perplexity per weight format on CUDA (bf16 activations), tests/data/heldout.txt;
# 3. decode tokens/s per format, mode ar, 12 dev prompts x 64 tokens, no draft and the default draft.
# Everything lands in OUT_DIR (default $OUT, else /tmp/gpu_check) as text and JSON; the summary is results.md.
# Needs a CUDA build of torch in .venv (install.sh pins the CPU build: install the matching CUDA wheel first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$OUT_DIR"
PY=.venv/bin/python
HS=.venv/bin/homespec
[ -x "$HS" ] || ./install.sh
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')): nothing to measure" >&2
  exit 2
fi
"$PY" - > "$OUT_DIR/device.txt" <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
EOF
DEVICE="cuda:0"
echo "# GPU check: $(cat "$OUT_DIR/device.txt")" > "$OUT_DIR/results.md"

# 1. kernels and tokens
"$PY" -m pytest tests/test_quant.py -q -p no:cacheprovider -n 0 -k "cuda" 2>&1 | tail -3 | tee "$OUT_DIR/kernels.txt"
PROMPT="Write one sentence about the moon."
for w in int4 fp32; do
  "$HS" generate "$PROMPT" -n 48 --draft none --weights "$w" --json > "$OUT_DIR/cpu-$w.json"
  "$HS" generate "$PROMPT" -n 48 --draft none --weights "$w" --device "$DEVICE" --json > "$OUT_DIR/cuda-$w.json"
done

# 2. perplexity per format
for w in bf16 int8 int4; do
  "$HS" perplexity tests/data/heldout.txt --device "$DEVICE" --dtype bf16 --weights "$w" --json \
    > "$OUT_DIR/ppl-$w.json" || echo "{\"error\": \"perplexity --weights $w failed\"}" > "$OUT_DIR/ppl-$w.json"
done

# 3. decode tokens/s per format (the bench prompts, 12 spread over the dev set)
"$PY" - "$OUT_DIR" "$DEVICE" <<'EOF' >> "$OUT_DIR/results.md"
import json, sys, time
from pathlib import Path

from homespec.cli.bench import DEFAULT_PROMPTS
from homespec.config import GenerationConfig
from homespec.engine import Engine, EngineOptions
from homespec.model.train_head import load_prompts

out, device = Path(sys.argv[1]), sys.argv[2]
prompts = load_prompts(DEFAULT_PROMPTS)
prompts = [prompts[i * len(prompts) // 12] for i in range(12)]
same = {w: json.loads((out / f"cpu-{w}.json").read_text())["tokens"] == json.loads((out / f"cuda-{w}.json").read_text())["tokens"] for w in ("int4", "fp32")}
print(f"\nTokens on CUDA equal the CPU's (48, greedy): {same}\n")
print("| weights | perplexity (bf16 activations) |\n| --- | ---: |")
for w in ("bf16", "int8", "int4"):
    r = json.loads((out / f"ppl-{w}.json").read_text())
    print(f"| {w} | {r.get('perplexity', r.get('error'))} |")
print("\n| weights | draft | tokens | s | tokens/s |\n| --- | --- | ---: | ---: | ---: |")
rows = []
for w in ("bf16", "int8", "int4"):
    for draft in ("none", "auto"):
        with Engine(EngineOptions(draft=draft, dtype="bf16", weights=w, device=device)) as engine:
            list(engine.generate(engine.encode(prompts[0]), GenerationConfig(8)))  # warm-up
            n, t = 0, time.perf_counter()
            for p in prompts:
                n += len(list(engine.generate(engine.encode(p), GenerationConfig(64)))[-1].tokens)
            s = time.perf_counter() - t
        rows.append({"weights": w, "draft": draft, "tokens": n, "s": s})
        print(f"| {w} | {draft} | {n} | {s:.1f} | {n / s:.1f} |")
(out / "decode.json").write_text(json.dumps(rows, indent=1))
EOF
cat "$OUT_DIR/results.md"
