#!/usr/bin/env bash
# One GPU session's checks and timings, each under its own time limit, so one call of the device
# tool measures everything a change touched.
#
# Usage (repository root, on the GPU machine):
#   bash benchmarks/device_check.sh OUT_DIR COMMIT [STAGE ...]
# STAGE (default: check):
#   check         tests-gpu, then bench-attn-quick and bench-dispatch-quick (under 8 minutes)
#   tests-gpu     every test of tests/gpu (attention kernels and dispatch, the quantized matmuls,
#                 the training step with the default kernels)
#   bench-attn-quick      benchmarks/attention.py --quick: causal 2K and 4K, the Mosaic kernels
#                         (the Hopper default) vs cuDNN and XLA
#   bench-dispatch-quick  benchmarks/nf4_matmul.py --dispatch, NF4, M = 1, 16 and 2048 (what
#                         the model runs), forward and forward + dx
#   bench-attn-all  benchmarks/attention.py, every case, both of our backends
#   bench-dispatch  benchmarks/nf4_matmul.py --dispatch on every shape, forward and forward + dx
#   decode-nf4    GPU time of the NF4 decode tunings (M = 1, 16, 64), Triton and Mosaic, fwd + dx
#   decode-int8   the same for int8 (forward: its dx is XLA's)
#   profile-nf4   in-kernel profile of the Mosaic NF4 decode kernel (M = 1, 16)
#   profile-attn  in-kernel profile of the Mosaic attention kernels (causal 4K and 16K)
#   ptx-nf4       PTX of the Mosaic NF4 decode kernel at its default tuning, under OUT/ptx
#   trace         Llama-3-8B QLoRA fast step (NF4, no remat, 2 x 4 x 2048) under jax.profiler for
#                 3 steps after 2: time by category (GEMM, attention, dequant, copies, idle ...)
#                 and the top ops, OUT/step_trace-<date>.json, the trace under OUT/step_trace
#                 (about 1.5 minutes)
#   speed         train_e2e.py parts ours_fast, ours_fast_dense (the quantized matmuls'
#                 dense-weight residuals, as before the codes-only backward) and plain_xla, 10
#                 steps after 2 each: tokens/s and peak HBM side by side (about 3 minutes)
#   generate      benchmarks/generate.py --preset llama3-8b: Llama-3-8B shapes, NF4, batch 1 / 8
#                 / 64, prefill and decode, vs HF generate + bitsandbytes NF4 (installed from
#                 .whl/ when its wheel is there), and the HBM roofline fraction (under 7 minutes)
#   rl-deps       install the TRL baseline's wheels carried in .whl/c, .whl/d (made by
#                 benchmarks/fetch_rl_wheels.sh, one group per call if need be) and
#                 .whl/a/bitsandbytes-*.whl into .devenv/rl, offline, each only where the image
#                 lacks a fitting version (benchmarks/install_wheels.py); again in a later call on
#                 the same warm machine it adds what that call carried. Prints what is still
#                 missing, then imports trl, datasets and bitsandbytes from there (under a minute)
#   grpo          benchmarks/grpo.py --preset llama3-8b: one GRPO step (8 prompts x 8 completions,
#                 256 tokens, rollout + update) on Llama-3-8B shapes, NF4, ours against TRL's
#                 GRPOTrainer + PEFT + bitsandbytes when trl, datasets and bitsandbytes import
#                 with .devenv/rl on PYTHONPATH (stage rl-deps, this call or an earlier one on the
#                 same warm machine); else ours alone (about 5 minutes)
# Logs: OUT_DIR/<stage>.log; JSON results and traces under OUT_DIR. COMMIT is recorded in the
# JSON (the device's own checkout reports a stale HEAD).
set -u
out=${1:?OUT_DIR}
commit=${2:?COMMIT}
shift 2
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(check)
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile . || exit 1
# Tests (and inline snippets) run from a copy: the installed package, not the checkout, is what
# they import.
tests_copy=$(mktemp -d)
cp -r tests "$tests_copy/"

run() {  # run STAGE SECONDS COMMAND...
  local stage=$1 limit=$2
  shift 2
  echo "== $stage (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$stage.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0))s"
  grep -v "Warning\|warnings.warn\|^  *$" "$out/$stage.log" | tail -n 60
}

bench=(--out "$out" --commit "$commit")
decode_shapes=1x4096x14336,16x4096x14336,64x4096x14336
expanded=()
for stage in "${stages[@]}"; do
  if [ "$stage" = check ]; then
    expanded+=(tests-gpu bench-attn-quick bench-dispatch-quick)
  else
    expanded+=("$stage")
  fi
done
for stage in "${expanded[@]}"; do
  case $stage in
    tests-gpu)
      run "$stage" 330 bash -c "cd $tests_copy && python3 -m pytest -q -p no:cacheprovider \
        tests/gpu" ;;
    bench-attn-quick)
      run "$stage" 75 python3 benchmarks/attention.py "${bench[@]}" --quick \
        --impls pallas_mosaic ;;
    bench-dispatch-quick)
      run "$stage" 75 python3 benchmarks/nf4_matmul.py "${bench[@]}" --dispatch --kinds nf4 \
        --shapes "1x4096x14336,16x4096x14336,2048x4096x14336" --tag dispatch-quick ;;
    bench-attn-all)
      run "$stage" 300 python3 benchmarks/attention.py "${bench[@]}" ;;
    bench-dispatch)
      run "$stage" 360 python3 benchmarks/nf4_matmul.py "${bench[@]}" --dispatch --tag dispatch ;;
    decode-nf4|decode-int8)
      run "$stage" 240 python3 benchmarks/nf4_matmul.py "${bench[@]}" --kinds "${stage#decode-}" \
        --shapes "$decode_shapes" --mosaic --dequant-shapes '' --tag "$stage" ;;
    profile-nf4)
      MOSAIC_GPU_DUMP_PTXAS=1 run "$stage" 240 python3 benchmarks/nf4_matmul.py "${bench[@]}" \
        --kinds nf4 --shapes 1x4096x14336,16x4096x14336 --directions fwd --mosaic --quick \
        --dequant-shapes '' --tag profile --profile "$out/traces-nf4" ;;
    profile-attn)
      run "$stage" 240 python3 benchmarks/attention.py "${bench[@]}" --cases s4096,s16384 \
        --profile "$out/traces-attn" ;;
    ptx-nf4)
      mkdir -p "$out/ptx"
      MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$out/ptx" run "$stage" 120 \
        env -C "$tests_copy" python3 -c "
import jax, jax.numpy as jnp, numpy as np
from fastlora_jax.kernels.nf4_matmul_mgpu import nf4_matmul_mosaic
from fastlora_jax.quant import quantize_nf4
w = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(np.ones((1024, 4096), np.float32), dtype='bfloat16'))
x = jnp.ones((1, 4096), jnp.bfloat16)
jax.block_until_ready(jax.jit(lambda x: nf4_matmul_mosaic(x, w))(x))
" ;;
    trace)
      run "$stage" 240 python3 benchmarks/e2e_jax.py --run trace --quant nf4 --remat none \
        --loss-chunk 4096 --micro-batch 2 --accumulation 4 --seq 2048 --steps 3 --warmup 2 \
        "${bench[@]}" ;;
    speed)
      run "$stage" 480 python3 benchmarks/train_e2e.py "${bench[@]}" \
        --parts ours_fast,ours_fast_dense,plain_xla --steps 10 --warmup 2 --part-timeout-s 200 ;;
    generate)
      if [ -d .whl ]; then  # HF's 4-bit baseline needs bitsandbytes, if carried
        python3 -m pip install -q --no-index --find-links .whl bitsandbytes \
          > "$out/generate-pip.log" 2>&1 || echo "   (no bitsandbytes from .whl: HF side fails)"
      fi
      run "$stage" 420 python3 benchmarks/generate.py "${bench[@]}" --preset llama3-8b \
        --batches 1,8,64 --prompt_len 128 --new_tokens 64 --repeats 2 ;;
    rl-deps)
      groups=()
      for g in .whl/c .whl/d .whl/a/bitsandbytes-*.whl; do [ -e "$g" ] && groups+=("$g"); done
      if [ ${#groups[@]} -eq 0 ]; then
        echo "== $stage: nothing carried (.whl/c, .whl/d, .whl/a/bitsandbytes-*.whl)"
      else
        run "$stage" 180 python3 benchmarks/install_wheels.py --target .devenv/rl \
          --imports trl datasets pyarrow bitsandbytes -- "${groups[@]}"
      fi ;;
    grpo)
      run "$stage" 300 env PYTHONPATH="$PWD/.devenv/rl${PYTHONPATH:+:$PYTHONPATH}" \
        python3 benchmarks/grpo.py "${bench[@]}" --preset llama3-8b --budget_s 285 ;;
    *)
      echo "unknown stage $stage"; exit 2 ;;
  esac
done
