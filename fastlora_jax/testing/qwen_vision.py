"""A tiny random Qwen2.5-VL checkpoint written by our own exporter (no torch), with a processor
built from SmolLM2's tokenizer (Qwen's vision tokens added) and transformers'
Qwen2VLImageProcessor: for data, training and CLI tests that need a model, not transformers'
numbers (tests/parity/test_qwen2_5_vl*.py compare with transformers)."""

from __future__ import annotations

import pathlib

from fastlora_jax.testing.vision import TOKENIZER

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# patch 4 x merge 2: a 32 x 32 picture is 8 x 8 patches, 16 language tokens
IMAGE_PROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64,
                       max_pixels=64 * 64)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
              patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
              fullatt_block_indexes=[1])


def tiny_qwen2_5_vl_numpy(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint and its processor into `folder`."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from fastlora_jax.models import decoder
    from fastlora_jax.models.decoder import set_path
    from fastlora_jax.vision.checkpoint import save_vlm_merged
    from fastlora_jax.vision.qwen2_5_vl import QWEN2_5_VL, _images_only_processor, parse_config

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    processor = _images_only_processor()(
        image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR), tokenizer=tok,
        chat_template=CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = parse_config(dict(
        TEXT, model_type="qwen2_5_vl", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
        vision_config=VISION, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"]))
    key = jax.random.key(seed)
    language = decoder.init_params(config.text, key)
    # an output matrix giving logits of standard deviation 2 (normal(0, 0.02) gives near-uniform
    # ones, which a few LoRA steps on the layers barely move)
    language["lm_head"]["weight"] = language["lm_head"]["weight"] * (
        100.0 / config.text.hidden_size ** 0.5)
    params = {"language": language, "vision": {}}
    for i, spec in enumerate(QWEN2_5_VL.vision_specs(config)):
        if spec.path[-1] == "bias":
            value = jnp.zeros(spec.shape)
        elif spec.path[-2] in ("norm1", "norm2", "ln_q"):
            value = jnp.ones(spec.shape)
        else:
            value = 0.05 * jax.random.normal(jax.random.fold_in(key, 1000 + i), spec.shape)
        set_path(params["vision"], spec.path, value)
    save_vlm_merged(folder, QWEN2_5_VL, config, params, None, None, dtype=jnp.float32,
                    processor=processor)
    return folder
