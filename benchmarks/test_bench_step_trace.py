"""The whole-step trace summary (benchmarks/step_trace.py): HLO categories, kernel-name
fallbacks, self times, and the summary of a real (CPU) jax.profiler trace."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import step_trace  # a sibling: pytest puts benchmarks/ on the path for these tests

GPU_HLO = """HloModule jit_train_step, is_scheduled=true

%fused_dequant (param_0: u8[1024], param_1: f32[32]) -> bf16[64,32] {
  %param_0 = u8[1024]{0} parameter(0)
  %constant.1 = u8[] constant(4)
  %broadcast.1 = u8[1024]{0} broadcast(%constant.1), dimensions={}
  %shift-right-logical.1 = u8[1024]{0} shift-right-logical(%param_0, %broadcast.1)
  %param_1 = f32[32]{0} parameter(1)
  ROOT %convert.1 = bf16[64,32]{1,0} convert(%shift-right-logical.1)
}

%fused_transpose (param_0.2: bf16[64,32]) -> bf16[32,64] {
  %param_0.2 = bf16[64,32]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[32,64]{1,0} transpose(%param_0.2), dimensions={1,0}
}

%fused_dus (param_0.3: bf16[4,64], param_1.3: bf16[1,64], param_2.3: s32[]) -> bf16[4,64] {
  %param_0.3 = bf16[4,64]{1,0} parameter(0)
  %param_1.3 = bf16[1,64]{1,0} parameter(1)
  %param_2.3 = s32[] parameter(2)
  %constant.3 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[4,64]{1,0} dynamic-update-slice(%param_0.3, %param_1.3, %param_2.3, %constant.3)
}

%fused_gemm (p0: bf16[8,32], p1: bf16[32,64]) -> bf16[8,64] {
  %p0 = bf16[8,32]{1,0} parameter(0)
  %p1 = bf16[32,64]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (a: f32[8], b: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = f32[8]{0} parameter(1)
  ROOT %add.1 = f32[8]{0} add(%a, %b)
}

ENTRY %main.1 (Arg_0.1: u8[1024], Arg_1.1: f32[32], x: bf16[8,32]) -> f32[8] {
  %Arg_0.1 = u8[1024]{0} parameter(0)
  %Arg_1.1 = f32[32]{0} parameter(1)
  %x = bf16[8,32]{1,0} parameter(2)
  %loop_convert_fusion.2 = bf16[64,32]{1,0} fusion(%Arg_0.1, %Arg_1.1), kind=kLoop, calls=%fused_dequant
  %transpose_fusion = bf16[32,64]{1,0} fusion(%loop_convert_fusion.2), kind=kInput, calls=%fused_transpose
  %cublas-gemm.1 = (bf16[8,64]{1,0}, s8[1024]{0}) custom-call(%x, %transpose_fusion), custom_call_target="__cublas$lt$matmul", backend_config={}
  %gemm_fusion_dot.3 = bf16[8,64]{1,0} fusion(%x, %transpose_fusion), kind=kCustom, calls=%fused_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.7 = (bf16[1,8,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.8 = bf16[64,32]{1,0} custom-call(%Arg_0.1), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"nf4_dequantize"}
  %custom-call.9 = bf16[8,32]{1,0} custom-call(%x), custom_call_target="mosaic_gpu", backend_config={"name":"flash_attention_fwd"}
  %dus_fusion = bf16[4,64]{1,0} fusion(%a, %b, %c), kind=kLoop, calls=%fused_dus
  %add_fusion = f32[8]{0} fusion(%a, %b), kind=kLoop, calls=%fused_add
  %all-reduce-start.1 = f32[8]{0} all-reduce-start(%add_fusion), replica_groups={}
  %copy.5 = f32[8]{0} copy(%add_fusion)
  %while.2 = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %all-reduce-done.1 = f32[8]{0} all-reduce-done(%all-reduce-start.1)
}
"""


def test_classify_hlo_gpu_style_module():
    cats = step_trace.classify_hlo(GPU_HLO)
    assert cats["loop_convert_fusion.2"] == "dequant"
    assert cats["transpose_fusion"] == "copy/transpose"
    assert cats["copy.5"] == "copy/transpose"
    assert cats["cublas-gemm.1"] == "gemm"
    assert cats["gemm_fusion_dot.3"] == "gemm"
    assert cats["custom-call.7"] == "attention"
    assert cats["custom-call.8"] == "pallas"
    assert cats["custom-call.9"] == "attention"
    assert cats["dus_fusion"] == "slices"
    assert cats["add_fusion"] == "other fusion"
    assert cats["all-reduce-start.1"] == cats["all-reduce-done.1"] == "collective"
    assert cats["while.2"] == "control"


@pytest.mark.parametrize("name,category", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("MemcpyDtoH", "host transfer"), ("MemcpyD2D", "copy/transpose"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
    ("nf4_matmul_dx", "pallas"), ("loop_multiply_fusion_3", "other fusion"),
    ("input_transpose_fusion", "copy/transpose"), ("something_else", "other")])
def test_classify_kernel_names(name, category):
    assert step_trace.classify_name(name) == category


def test_self_times_take_nested_ops_out():
    events = [dict(line="a", start_ns=0.0, dur_ns=10.0), dict(line="a", start_ns=2.0, dur_ns=3.0),
              dict(line="a", start_ns=6.0, dur_ns=2.0), dict(line="a", start_ns=12.0, dur_ns=1.0),
              dict(line="b", start_ns=1.0, dur_ns=5.0)]
    step_trace.self_times(events)
    assert [e["self_ns"] for e in events] == [5.0, 3.0, 2.0, 1.0, 5.0]


def test_summary_of_a_real_cpu_trace(tmp_path: pathlib.Path):
    """A dequantize (uint8 codes), a dot and a transpose under jax.profiler.trace: the summary
    finds each in its category, and categories plus idle make up the step."""
    def step(codes, scale, x):
        w = ((codes >> 4).astype(jnp.float32) - 8.0) * scale[:, None]        # [256, 512]
        y = x @ w                                                              # [256, 512]
        return jnp.tanh(y).T.copy() + 1.0

    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.integers(0, 256, (256, 512), dtype=np.uint8)),
            jnp.asarray(rng.random(256, dtype=np.float32)),
            jnp.asarray(rng.standard_normal((256, 256), dtype=np.float32)))
    compiled = jax.jit(step).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    steps = 3
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(steps):
            jax.block_until_ready(compiled(*args))
    summary = step_trace.summarize(tmp_path, compiled.as_text(), steps, module="jit_step")
    cats = {r["category"]: r for r in summary["categories"]}
    assert cats["gemm"]["s_per_step"] > 0 and cats["dequant"]["s_per_step"] > 0
    assert summary["events_matched_to_hlo"] == summary["events"] >= 3 * steps
    total = sum(r["pct_of_step"] for r in summary["categories"])
    overlap = 100 * summary["overlap_s_per_step"] / summary["step_s"]
    assert total == pytest.approx(100.0 + overlap, abs=0.5)
    assert summary["step_s"] > 0 and summary["busy_s_per_step"] <= summary["step_s"] * 1.001
    assert {r["category"] for r in summary["top_ops"]} <= set(step_trace.CATEGORIES)
    assert "gemm" in step_trace.format_summary(summary)


def test_trace_run_of_the_tiny_train_step(tmp_path: pathlib.Path):
    """e2e_jax --run trace end to end on the tiny model: the JSON it writes holds the step's
    categories (the NF4 projections' dequantization among them)."""
    import argparse
    import json

    import common
    import e2e_jax
    from fastlora_jax.models.registry import config_from_hf

    args = argparse.Namespace(quant="nf4", remat="none", loss_chunk=32, micro_batch=1,
                              accumulation=2, seq=32, steps=2, warmup=2, linear_impl="default",
                              out=tmp_path, commit="test")
    result = e2e_jax.run_trace(config_from_hf(common.TINY_LLAMA), args)
    doc = json.loads(pathlib.Path(result["result_file"]).read_text())
    cats = {r["category"]: r["s_per_step"] for r in doc["summary"]["categories"]}
    assert cats["gemm"] > 0 and cats["dequant"] > 0 and "idle" in cats
    assert doc["summary"]["steps"] == 2 and len(result["losses"]) == 4
    assert (tmp_path / "step_trace" / "module.hlo.txt").exists()
