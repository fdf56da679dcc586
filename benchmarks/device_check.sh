#!/usr/bin/env bash
# One GPU session's checks and timings, in order of value, each under its own time limit, so one
# call of the device tool measures everything a change touched.
#
# Usage (repository root, on the GPU machine):
#   bash benchmarks/device_check.sh OUT_DIR COMMIT [STAGE ...]
# STAGE (default: all, in this order; correctness first, since the NF4 one is a GPU default):
#   tests-nf4     tests/gpu/test_nf4_matmul.py (NF4 and int8, Triton and Mosaic GPU kernels)
#   tests-mgpu    the same, the Mosaic GPU (Hopper) kernels only
#   ptx-nf4       PTX of the Mosaic NF4 decode kernel, under OUT/ptx (M = 1; absmax on the weights
#                 / on the accumulator; the image has no nvdisasm, so no SASS)
#   decode-nf4    GPU time of the NF4 decode tunings (M = 1, 16), no profile
#   decode-int8   the same for int8
#   decode-dx     GPU time of the decode backward (dx, M = 1, 16), NF4 and int8 dx kernels
#   profile-nf4   in-kernel profile + GPU time of the NF4 and int8 decode kernels (M = 1, 16)
#   profile-attn  in-kernel profile of the attention kernels (causal 4K and 16K, default and fused)
#   profile-attn16  the same at 16K only (the 16K case alone did not fit profile-attn's limit)
#   tests-attn    tests/gpu/test_flash_attention.py without the fused backward's tests (the whole
#                 file took over 480 s on the H200, more than one stage should hold)
#   tests-fused   the fused backward's GPU tests (opt-in variants)
#   bench-attn    benchmarks/attention.py, causal cases, default vs the opt-in schedules
#   bench-dispatch  benchmarks/nf4_matmul.py --dispatch: what the model runs (ops.linear's GPU
#                 default), forward and forward + dx, on every shape of issue #6, NF4 and int8
#   bench-dispatch-dx  the same, forward + dx only
#   bench-attn-all  benchmarks/attention.py, every case of issue #5, the default backend only
# Logs: OUT_DIR/<stage>.log; JSON results and traces under OUT_DIR. COMMIT is recorded in the
# JSON (the device's own checkout reports a stale HEAD).
set -u
out=${1:?OUT_DIR}
commit=${2:?COMMIT}
shift 2
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests-nf4 profile-nf4 profile-attn tests-attn bench-attn)
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

for stage in "${stages[@]}"; do
  case $stage in
    profile-attn)
      run "$stage" 240 python3 benchmarks/attention.py --out "$out" --commit "$commit" \
        --cases s4096,s16384 --backends mosaic_gpu,mosaic_gpu+fused+pair \
        --profile "$out/traces-attn" ;;
    profile-attn16)
      run "$stage" 240 python3 benchmarks/attention.py --out "$out" --commit "$commit" \
        --cases s16384 --backends mosaic_gpu,mosaic_gpu+fused+pair \
        --profile "$out/traces-attn16" ;;
    profile-nf4)
      MOSAIC_GPU_DUMP_PTXAS=1 run "$stage" 240 python3 benchmarks/nf4_matmul.py --out "$out" \
        --commit "$commit" --kinds nf4,int8 --shapes 1x4096x14336,16x4096x14336 --directions fwd \
        --mgpu --quick --no-fused --dequant-shapes '' --tag decode \
        --profile "$out/traces-nf4" ;;
    tests-attn)
      run "$stage" 360 bash -c "cd $tests_copy && python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_flash_attention.py -k 'not fused'" ;;
    tests-fused)
      run "$stage" 300 bash -c "cd $tests_copy && python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_flash_attention.py -k fused" ;;
    tests-nf4)
      run "$stage" 150 bash -c "cd $tests_copy && python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_nf4_matmul.py" ;;
    tests-mgpu)
      run "$stage" 150 bash -c "cd $tests_copy && python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_nf4_matmul.py -k mgpu" ;;
    ptx-nf4)
      mkdir -p "$out/ptx"
      MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$out/ptx" run "$stage" 120 \
        env -C "$tests_copy" python3 -c "
import jax, jax.numpy as jnp, numpy as np
from fastlora_jax.kernels.nf4_matmul import nf4_matmul
from fastlora_jax.kernels.weight_stream_mgpu import MgpuTuning
from fastlora_jax.quant import quantize_nf4
w = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(np.ones((1024, 4096), np.float32), dtype='bfloat16'))
x = jnp.ones((1, 4096), jnp.bfloat16)
for a in (False, True):
    jax.block_until_ready(jax.jit(lambda x: nf4_matmul(x, w, tuning=MgpuTuning(tile_m=8, blocks_per_step=4, acc_scale=a)))(x))
" ;;
    decode-nf4|decode-int8)
      run "$stage" 180 python3 benchmarks/nf4_matmul.py --out "$out" --commit "$commit" \
        --kinds "${stage#decode-}" --shapes 1x4096x14336,16x4096x14336 --directions fwd \
        --mgpu --quick --no-fused --dequant-shapes '' --tag "$stage" ;;
    decode-dx)
      run "$stage" 180 python3 benchmarks/nf4_matmul.py --out "$out" --commit "$commit" \
        --kinds nf4,int8 --shapes 1x4096x14336,16x4096x14336 --directions bwd \
        --mgpu --quick --no-fused --dequant-shapes '' --tag "$stage" ;;
    bench-dispatch)
      run "$stage" 360 python3 benchmarks/nf4_matmul.py --out "$out" --commit "$commit" \
        --dispatch --dequant-shapes '' --tag dispatch ;;
    bench-dispatch-dx)
      run "$stage" 200 python3 benchmarks/nf4_matmul.py --out "$out" --commit "$commit" \
        --dispatch --dequant-shapes '' --directions bwd --tag dispatch-dx ;;
    bench-attn-all)
      run "$stage" 300 python3 benchmarks/attention.py --out "$out" --commit "$commit" \
        --backends mosaic_gpu ;;
    bench-attn)
      run "$stage" 240 python3 benchmarks/attention.py --out "$out" --commit "$commit" \
        --cases causal --backends mosaic_gpu,mosaic_gpu+st ;;
    *)
      echo "unknown stage $stage"; exit 2 ;;
  esac
done
