#!/usr/bin/env bash
# Create .benchenv/tunix: Python 3.12 with Tunix's sampler (google-tunix 0.1.7 + qwix 0.1.8 +
# jax 0.11.2), for benchmarks/generate.py --tunix and benchmarks/grpo.py (its GRPO learner).
# Tunix pins its own flax, so it lives apart from .venv. Idempotent; about 300 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.benchenv/tunix
if [ -x "$ENV/bin/python" ] && "$ENV/bin/python" -c "import tunix, qwix" 2>/dev/null; then
  echo "$ENV ready"; exit 0
fi
PY=$(pyenv root 2>/dev/null)/versions/$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -V | tail -n 1)/bin/python3
[ -x "$PY" ] || PY=python3.12
mkdir -p .benchenv
"$PY" -m venv "$ENV"
"$ENV/bin/python" -m pip install -q --no-cache-dir "google-tunix==0.1.7" "qwix==0.1.8" \
  "jax==0.11.2" "jaxlib==0.11.2" safetensors transformers
"$ENV/bin/python" -c "import tunix, qwix, jax; print('tunix env:', jax.__version__)"
