"""The vision-language training step (LLaVA, Gemma 3, Qwen2.5-VL: tower, projector, image
blocks, windowed vision attention, M-RoPE) with the default implementations against the
reference attention, on random weights built from the architectures' parameter specs. On a GPU the default runs cuDNN / XLA attention (the image
blocks' dense mask) and the default matmuls in bfloat16; on the CPU the same comparison runs in
one small float32 case (Gemma 3), so CI checks the test itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.config import ModelConfig
from fastlora_jax.lora.layer import init_lora
from fastlora_jax.lora.spec import LoraConfig
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import set_path
from fastlora_jax.models.registry import config_from_hf
from fastlora_jax.ops import Impl
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, accumulated_grads
from fastlora_jax.vision.gemma3_mm import GEMMA3_VLM, Gemma3VisionConfig
from fastlora_jax.vision.llava import LLAVA, LlavaConfig
from fastlora_jax.vision.lora import flags_regex, resolve_vision_lora
from fastlora_jax.vision.qwen2_5_vl import QWEN2_5_VL, parse_config as qwen_config
from fastlora_jax.vision.vit import TowerKind, VisionConfig

ON_GPU = jax.default_backend() == "gpu"
DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32
WIDTH = 256 if ON_GPU else 64
IMAGE_ID = 5


def model(kind: str) -> tuple:
    """(arch, config) of a small random LLaVA, Gemma 3 or Qwen2.5-VL."""
    text_raw = dict(vocab_size=512, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=WIDTH // 4)
    if kind == "qwen2_5_vl":  # vision heads of 80 dims, as the released checkpoints have
        half = text_raw.pop("head_dim") // 2  # rotary frequencies, split 2:3:3 as released
        return QWEN2_5_VL, qwen_config(dict(
            text_raw, model_type="qwen2_5_vl", image_token_id=IMAGE_ID, video_token_id=8,
            vision_start_token_id=6, vision_end_token_id=7,
            rope_scaling={"type": "mrope",
                          "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
            vision_config=dict(depth=2, hidden_size=320, intermediate_size=256, num_heads=4,
                               out_hidden_size=WIDTH, patch_size=14, window_size=56,
                               fullatt_block_indexes=[1])))
    if kind == "llava":
        text = config_from_hf(dict(text_raw, model_type="llama"))
        vision = VisionConfig(kind=TowerKind.CLIP, hidden_size=64, intermediate_size=128,
                              num_layers=2, num_heads=4, image_size=28, patch_size=7)
        return LLAVA, LlavaConfig(model_type="llava", text=text, vision=vision,
                                  image_token_id=IMAGE_ID)
    text = config_from_hf(dict(text_raw, model_type="gemma3_text", sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"]))
    vision = VisionConfig(kind=TowerKind.SIGLIP, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=4, image_size=32, patch_size=8)
    return GEMMA3_VLM, Gemma3VisionConfig(model_type="gemma3", text=text, vision=vision,
                                          image_token_id=IMAGE_ID, mm_tokens_per_image=4,
                                          boi_token_id=6, eoi_token_id=7)


def params(arch, config) -> dict:
    key = jax.random.key(0)
    # the decoder's own init scale: larger weights make this tiny model chaotic in bfloat16 (two
    # correct attention implementations then differ by a third of a gradient's max; at this
    # scale by under 3 %, while a wrong image block or window changes gradients by 30-100 %)
    frozen = {"language": jax.tree.map(lambda a: a.astype(DTYPE),
                                       decoder.init_params(config.text, key)),
              "vision": {}}
    for i, spec in enumerate(arch.vision_specs(config)):
        value = 0.05 * jax.random.normal(jax.random.fold_in(key, i), spec.shape)
        if "norm" in "".join(spec.path) or "ln_q" in spec.path:
            value = value + (0.0 if "mm_soft_emb_norm" in spec.path else 1.0)
        set_path(frozen["vision"], spec.path, value.astype(DTYPE))
    return frozen


def qwen_batch(config, rows: int, seq: int) -> dict:
    """Each row: one 8 x 12-patch picture (24 tokens; windows cut at the edge), its per-row
    window layout and M-RoPE positions from the record's host_inputs."""
    rng = np.random.default_rng(1)
    grid = np.array([[[1, 8, 12]]] * rows)
    ids = rng.integers(10, config.text.vocab_size, (rows, seq)).astype(np.int32)
    ids[:, 3:3 + 24] = IMAGE_ID
    targets = np.concatenate([ids[:, 1:], np.full((rows, 1), IGNORE, np.int32)], axis=1)
    targets[ids == IMAGE_ID] = IGNORE
    extra = QWEN2_5_VL.host_inputs(config, {"input_ids": ids, "image_grid_thw": grid})
    pixels = rng.normal(size=(1, rows, 96, config.vision.patch_dim)).astype(np.float32)
    return {"input_ids": jnp.asarray(ids[None]), "targets": jnp.asarray(targets[None]),
            "pixel_values": jnp.asarray(pixels),
            **{k: jnp.asarray(v[None]) for k, v in extra.items()}}


def batch(config, rows: int, seq: int, tokens_per_image: int) -> dict:
    rng = np.random.default_rng(1)
    ids = rng.integers(10, config.text.vocab_size, (rows, seq)).astype(np.int32)
    ids[:, 3:3 + tokens_per_image] = IMAGE_ID
    targets = np.concatenate([ids[:, 1:], np.full((rows, 1), IGNORE, np.int32)], axis=1)
    targets[ids == IMAGE_ID] = IGNORE
    size = config.vision.image_size
    pixels = rng.normal(size=(1, rows, 1, 3, size, size)).astype(np.float32)
    return {"input_ids": jnp.asarray(ids[None]), "targets": jnp.asarray(targets[None]),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, rows, seq)),
            "pixel_values": jnp.asarray(pixels)}


@pytest.mark.parametrize("kind", ["llava", "gemma3", "qwen2_5_vl"] if ON_GPU else ["gemma3"])
def test_vision_step_default_matches_reference(kind: str) -> None:
    arch, config = model(kind)
    frozen = params(arch, config)
    regex = flags_regex(arch, config, vision=True, language=True, attention=True, mlp=True)
    spec = resolve_vision_lora(arch, config, LoraConfig.create(
        r=8, lora_alpha=16, target_modules=regex, init_lora_weights=False))
    lora = {"language": init_lora(spec.language, config.text, frozen["language"]),
            "vision": {"tower": init_lora(spec.vision, config.vision, frozen["vision"]["tower"])}}
    tokens = 16 if kind == "llava" else 4
    seq = 256 if ON_GPU else 32
    mb = qwen_batch(config, 2, seq) if kind == "qwen2_5_vl" else batch(config, 2, seq, tokens)
    results = {}
    for impl in (None, Impl.REFERENCE):
        cfg = StepConfig(model=config.text, lora=spec, remat=True, attention_impl=impl,
                         vision=(arch, config))
        results[impl] = jax.jit(lambda lo: accumulated_grads(cfg, lo, frozen, mb, None))(lora)
    (loss, _, grads), (ref_loss, _, ref_grads) = results[None], results[Impl.REFERENCE]
    tol = 2e-2 if ON_GPU else 1e-5
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol)
    for part in ("language", "vision"):
        got = jax.tree.leaves(grads[part])
        want = jax.tree.leaves(ref_grads[part])
        assert any(float(jnp.abs(w).max()) > 0 for w in want)
        for g, w in zip(got, want):
            scale = float(jnp.abs(w).max()) + 1e-6
            assert float(jnp.abs(g - w).max()) / scale < (5e-2 if ON_GPU else 1e-4)
