#!/usr/bin/env bash
# Download the wheels TRL's side of benchmarks/grpo.py needs on the GPU machine into two groups,
# .whl/c and .whl/d, each under 60 MiB (one device call carries at most 64 MiB), and check them.
#
# That machine: Python 3.12, linux x86_64, no package index; its image holds torch 2.11,
# transformers 5.17 (so huggingface-hub 1.x), peft 0.21 and jax 0.11 with their dependencies, but
# not trl, datasets, pyarrow, pandas or bitsandbytes. The versions below are the newest that fit
# that image (datasets 5.1+ needs huggingface-hub >= 1.31, which transformers 5.17 may not have).
# Small pure-Python dependencies the image probably holds (requests, fsspec, tqdm, ...) are carried
# too: benchmarks/install_wheels.py installs a wheel only where the image lacks a fitting version,
# so they cost only bytes. numpy is never carried (it would shadow the image's for jax and torch).
# bitsandbytes (the NF4 baseline) is a third group of its own: its 43 MB wheel in .whl/a.
#
# On the machine: carry .whl/c in one call and .whl/d in the next (same warm machine), each running
#   bash benchmarks/device_check.sh OUT COMMIT rl-deps
# (installs what is carried into .devenv/rl, skipping what is there already), then stage grpo.
#
# Usage: bash benchmarks/fetch_rl_wheels.sh     (idempotent; PYTHON=... picks the pip to use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
platform=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:
          --no-deps)
group_c=(pyarrow==26.0.1)
group_d=(trl==1.16.0 datasets==5.0.1 accelerate==1.15.0 pandas==3.1.1 python-dateutil==4.0.0
         tzdata==2026.6 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 psutil==7.2.2
         fsspec==2026.6.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
         aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0
         frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 tqdm==4.70.1
         filelock==4.3.2 packaging==26.4 pyyaml==6.0.4 typing-extensions==4.16.0
         httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 idna==3.21
         certifi==2026.10.19.post1)
# What the check takes the image to hold besides the carried wheels: the documented stack at the
# lowest versions its own requirements allow (jax 0.11 needs numpy >= 2.1; transformers 5.17
# needs huggingface-hub >= 1.5).
image=(torch==2.11.0 transformers==5.17.0 peft==0.21.0 safetensors==0.8.0 numpy==2.1.0
       huggingface-hub==1.5.0 jinja2==3.1.6)

"$PY" -m pip download -q "${platform[@]}" -d .whl/c "${group_c[@]}"
"$PY" -m pip download -q "${platform[@]}" -d .whl/d "${group_d[@]}"
for group in .whl/c .whl/d; do
  mib=$(du -sm "$group" | cut -f1)
  echo "$group: $(ls "$group"/*.whl | wc -l) wheels, ${mib} MiB"
  [ "$mib" -lt 60 ] || { echo "$group is over 60 MiB: split it"; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Every wheel installs on the machine's platform (tags), offline ...
"$PY" -m pip install -q --dry-run --no-index --ignore-installed --target "$tmp/t" \
  "${platform[@]}" .whl/c/*.whl .whl/d/*.whl
# ... and with the image, the carried set leaves no requirement unmet.
bnb=(); [ -d .whl/a ] && bnb=(.whl/a/bitsandbytes-*.whl)
"$PY" benchmarks/install_wheels.py --check --target "$tmp/t" --image "${image[@]}" \
  -- .whl/c .whl/d "${bnb[@]}"
