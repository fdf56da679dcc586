"""Qwen2.5-VL's config reading (both transformers dialects, strictness), its tensor-name mapping,
the window layout of the vision tower and the M-RoPE positions' input checks (host-side numpy;
parity with transformers is in tests/parity/test_qwen2_5_vl*.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fastlora_jax.errors import CheckpointError, ConfigError, DataError
from fastlora_jax.vision.qwen2_5_vit import vision_layout
from fastlora_jax.vision.qwen2_5_vl import (parse_config, rope_positions, tensor_name,
                                            tensor_part, to_hf_config)

VISION = {"depth": 2, "hidden_size": 32, "hidden_act": "silu", "intermediate_size": 48,
          "num_heads": 2, "in_chans": 3, "out_hidden_size": 32, "patch_size": 4,
          "spatial_merge_size": 2, "spatial_patch_size": 4, "window_size": 16,
          "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2}
# The Hub's (transformers 4.49) flat layout: text keys at the top level.
FLAT = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 2, "vision_start_token_id": 3, "vision_end_token_id": 4,
        "vision_token_id": 7, "image_token_id": 5, "video_token_id": 6, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
        "max_position_embeddings": 128, "max_window_layers": 2, "model_type": "qwen2_5_vl",
        "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 128,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vision_config": VISION,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "vocab_size": 40}


def test_flat_and_nested_configs_read_alike_and_round_trip():
    flat = parse_config(FLAT)
    assert flat.text.tie_embeddings and flat.text.rope.mrope_section == (2, 3, 3)
    assert flat.text.qkv_bias and not flat.text.o_bias and flat.text.head_dim == 16
    assert flat.vision.window_units == 2 and flat.image_token_id == 5
    nested = to_hf_config(flat)
    assert nested["text_config"]["model_type"] == "qwen2_5_vl_text"
    again = parse_config(nested)
    assert again.text.rope == flat.text.rope and again.vision == flat.vision
    assert (again.image_token_id, again.video_token_id) == (5, 6)


@pytest.mark.parametrize("change, message", [
    (dict(vision_config=dict(VISION, hidden_act="gelu")), "hidden_act"),
    (dict(vision_config=dict(VISION, in_chans=1)), "in_chans"),
    (dict(vision_config=dict(VISION, window_size=4)), "window_size"),
    (dict(vision_config=dict(VISION, fullatt_block_indexes=[5])), "fullatt_block_indexes"),
    (dict(vision_config=dict(VISION, out_hidden_size=16)), "out_hidden_size"),
    (dict(vision_config=dict(VISION, mystery=1)), "mystery"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}), "mrope_section"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "mrope_section": [2, 3, 3]}),
     "mrope_section"),
    (dict(rope_scaling=None), "mrope_section"),  # transformers' default [16, 24, 24] misfits
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "mrope_section"),
    (dict(head_dim=8), "head_dim"),
    (dict(model_type="qwen2_vl"), "model_type"),
    (dict(mystery=1), "mystery"),
])
def test_bad_configs_are_refused_with_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(dict(FLAT, **change))


def test_tensor_names_of_both_layouts():
    assert tensor_part("model.visual.blocks.3.attn.qkv.weight") == (
        "vision", "tower.layers.3.attn.qkv.weight")
    assert tensor_part("visual.merger.mlp.0.bias") == ("vision", "projector.mlp.0.bias")
    assert tensor_part("visual.patch_embed.proj.weight") == (
        "vision", "tower.patch_embed.proj.weight")
    assert tensor_part("model.language_model.layers.1.mlp.up_proj.weight") == (
        "language", "model.layers.1.mlp.up_proj.weight")
    assert tensor_part("model.embed_tokens.weight") == ("language", "model.embed_tokens.weight")
    assert tensor_part("lm_head.weight") == ("language", "lm_head.weight")
    assert tensor_name(("tower", "layers", "attn", "qkv", "weight"), 3) == (
        "model.visual.blocks.3.attn.qkv.weight")
    assert tensor_name(("projector", "mlp", "2", "weight"), None) == (
        "model.visual.merger.mlp.2.weight")
    with pytest.raises(CheckpointError, match="vision_tower"):
        tensor_part("vision_tower.encoder.weight")


def test_window_layout_cuts_windows_at_the_edges():
    config = parse_config(FLAT).vision  # windows of 2 x 2 merge blocks of 2 x 2 patches
    layout = vision_layout(config, [(1, 6, 4)])  # 3 x 2 merge blocks: windows of 8 and 4 patches
    assert np.bincount(layout.window_ids).tolist() == [16, 8]
    assert (layout.frame_ids == 0).all()
    assert sorted(layout.patch_order.tolist()) == list(range(24))
    # the merged tokens come back in processor order
    units = layout.patch_order.reshape(-1, 4)[:, 0] // 4
    assert (units[layout.token_order] == np.arange(6)).all()
    with pytest.raises(DataError, match="spatial_merge_size"):
        vision_layout(config, [(1, 5, 4)])


def test_rope_positions_refuse_mismatched_images():
    config = parse_config(FLAT)
    ids = np.array([[1, 3, 5, 5, 5, 5, 4, 9]])  # one image of 4 merged tokens
    positions, _ = rope_positions(config, ids, [(1, 4, 4)])
    assert positions[:, 0, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
    assert positions[:, 0, 6].tolist() == [4, 4, 4]
    with pytest.raises(DataError, match="run of 4 image tokens"):
        rope_positions(config, ids, [(1, 4, 8)])
    with pytest.raises(DataError, match="2 images"):
        rope_positions(config, ids, [(1, 4, 4), (1, 4, 4)])
    with pytest.raises(DataError, match="more runs"):
        rope_positions(config, ids, None)
    with pytest.raises(DataError, match="video"):
        rope_positions(config, np.array([[1, 6, 2]]), None)
