"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration (torch, float32) on a tiny
random checkpoint with its own processor (a word-level tokenizer with Qwen's special tokens, the
PIL image processor, a chat template with image parts), on real pictures of two sizes (square and
non-square), one or two images per conversation:

- M-RoPE position ids (get_rope_index, with and without padding) and the rotary cos / sin;
- logits of the whole model, one conversation at a time and as a left-padded batch.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastVisionModel
from fastlora_jax.models.rope import cos_sin
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.testing.vision import (HF_GENERATE, QWEN_TEMPLATE,
                                         check_peft_and_merged_exports)
from fastlora_jax.vision.qwen2_5_vl import ARCHITECTURE, parse_config, rope_positions
from tests.parity.test_qwen2_5_vl_vision import PROCESSOR, picture

pytestmark = pytest.mark.reference

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = ["user", "assistant", "what", "colour", "is", "this", "and", "that", "red", "green",
         "blue", "a", "shape", "?", "."]
TEXT = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
            max_position_embeddings=512, rope_theta=10000.0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
              patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
              fullatt_block_indexes=[1])
SIZES = ((48, 48), (40, 72))
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"},
                                  {"type": "text", "text": "what colour is this ?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "red ."}]}],
    [{"role": "user", "content": [{"type": "text", "text": "this"}, {"type": "image"},
                                  {"type": "text", "text": "and that"}, {"type": "image"},
                                  {"type": "text", "text": "?"}]}],
]
IMAGES_OF = [[1], [1, 0]]  # picture indexes of each conversation's image parts

BUILD = """
import pathlib, torch, transformers
folder = pathlib.Path(ARGS["folder"])
ids = ARGS["ids"]
torch.manual_seed(0)
cfg = transformers.Qwen2_5_VLConfig(
    text_config=dict(ARGS["text"], initializer_range=0.2), vision_config=ARGS["vision"],
    image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
cfg.vision_config.initializer_range = 0.2
model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name or "ln_q" in name or name.endswith("bias"):
            p.add_(0.3 * torch.randn_like(p))
model.save_pretrained(folder, safe_serialization=True)
for case in ARGS["cases"]:
    batch = {k.split("/")[1]: torch.from_numpy(v) for k, v in INPUTS.items()
             if k.startswith(case + "/")}
    with torch.no_grad():
        OUTPUTS[case + "/logits"] = model(**batch).logits.numpy()
batch = {k.split("/")[1]: torch.from_numpy(v) for k, v in INPUTS.items()
         if k.startswith("batch/")}
pos, deltas = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
OUTPUTS["batch/positions"] = pos.numpy()
OUTPUTS["batch/deltas"] = deltas.numpy()
cos, sin = model.model.language_model.rotary_emb(torch.zeros(1), pos)
OUTPUTS["batch/cos"] = cos.numpy()
OUTPUTS["batch/sin"] = sin.numpy()
"""


def build_processor(folder: pathlib.Path) -> dict[str, int]:
    """Save the tiny processor (word-level tokenizer with Qwen's special tokens, transformers'
    Qwen2VLImageProcessor, the chat template) into `folder`; its special token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

    from fastlora_jax.vision.qwen2_5_vl import _images_only_processor

    words = SPECIALS + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                      unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    processor = _images_only_processor()(image_processor=Qwen2VLImageProcessor(**PROCESSOR),
                                         tokenizer=tok, chat_template=QWEN_TEMPLATE)
    processor.save_pretrained(folder)
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}


def _pictures(images, indexes):
    from PIL import Image

    return [Image.fromarray(images[i]) for i in indexes]


INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
              "mm_token_type_ids")


def processed(processor, images, conversations, indexes, **kwargs) -> dict[str, np.ndarray]:
    texts = [processor.apply_chat_template(c, tokenize=False) for c in conversations]
    batch = processor(text=texts, images=_pictures(images, indexes), return_tensors="np",
                      **kwargs)
    return {k: np.asarray(batch[k]) for k in INPUT_KEYS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from fastlora_jax.vision.qwen2_5_vl import load_processor

    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    ids = build_processor(folder)
    processor = load_processor(folder)
    images = [picture(h, w, i) for i, (h, w) in enumerate(SIZES)]
    arrays = {}
    for k, indexes in enumerate(IMAGES_OF):
        for key, value in processed(processor, images, CONVERSATIONS[k:k + 1],
                                    indexes).items():
            arrays[f"{k}/{key}"] = value
    processor.tokenizer.padding_side = "left"
    for key, value in processed(processor, images, CONVERSATIONS, sum(IMAGES_OF, []),
                                padding=True).items():
        arrays[f"batch/{key}"] = value
    assert not arrays["batch/attention_mask"].all()
    ref = run_reference(BUILD, arrays, folder=str(folder), ids=ids, text=TEXT, vision=VISION,
                        cases=[str(k) for k in range(len(IMAGES_OF))] + ["batch"])
    return folder, arrays, ref


def test_config_reads_the_saved_checkpoint(reference):
    folder, _, _ = reference
    config = parse_config(json.loads((folder / "config.json").read_text()))
    assert config.text.rope.mrope_section == (2, 3, 3)
    assert config.text.head_dim == 16 and config.text.qkv_bias and not config.text.o_bias
    assert config.vision.fullatt_block_indexes == (1,)
    assert config.image_token_id == SPECIALS.index("<|image_pad|>")


def test_mrope_positions_and_tables_match_transformers(reference):
    folder, arrays, ref = reference
    config = parse_config(json.loads((folder / "config.json").read_text()))
    positions, deltas = rope_positions(config, arrays["batch/input_ids"],
                                       arrays["batch/image_grid_thw"],
                                       arrays["batch/attention_mask"])
    np.testing.assert_array_equal(positions, ref["batch/positions"])
    np.testing.assert_array_equal(deltas, ref["batch/deltas"][:, 0])
    # padding on the left of the shorter row, two images in the longer: not plain 0..T-1
    assert (positions[0] != np.arange(positions.shape[-1])).any()
    cos, sin = cos_sin(config.text, jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(cos), ref["batch/cos"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref["batch/sin"], atol=1e-6, rtol=0)
    # a text-only row: M-RoPE positions are 0..T-1 on every axis, the tables the 1D rope's
    plain = np.arange(7, dtype=np.int32)[None]
    positions, deltas = rope_positions(config, plain + 20, None)
    assert (positions == plain).all() and deltas.tolist() == [0]
    for a, b in zip(cos_sin(config.text, jnp.asarray(positions)),
                    cos_sin(config.text, jnp.asarray(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_logits_match_transformers(reference):
    folder, arrays, ref = reference
    model, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    assert model.config.model_type == "qwen2_5_vl"
    for case in [str(k) for k in range(len(IMAGES_OF))] + ["batch"]:
        inputs = {k: arrays[f"{case}/{k}"] for k in INPUT_KEYS}
        ours = np.asarray(model(**inputs))
        want = ref[case + "/logits"]
        assert ours.shape == want.shape
        mask = inputs["attention_mask"].astype(bool)  # padding's logits are not compared
        np.testing.assert_allclose(ours[mask], want[mask], atol=1e-4, rtol=0)
        assert np.abs(want).max() > 0.5


def test_peft_adapter_and_merged_export_load_in_transformers(reference, tmp_path):
    folder, arrays, _ = reference
    model, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    inputs = {k: arrays[f"1/{k}"] for k in INPUT_KEYS}
    # 2 language layers x 7 projections, 2 vision blocks x 5 projections
    check_peft_and_merged_exports(model, processor, folder, tmp_path, inputs, cls=ARCHITECTURE,
                                  modules=(14, 10), vision_part=".visual.", rtol=0)


def test_greedy_generation_with_images_matches_transformers(reference):
    """Two left-padded rows (one image; two images of different shapes): the prefill's M-RoPE
    positions and each row's rope delta in the decode steps."""
    folder, arrays, _ = reference
    model, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    inputs = {k: arrays[f"batch/{k}"] for k in INPUT_KEYS}
    eos = processor.tokenizer.eos_token_id
    ours = model.generate(inputs, max_new_tokens=8, eos_token_id=eos)
    ref = run_reference(HF_GENERATE, inputs, folder=str(folder), cls=ARCHITECTURE, new=8,
                        eos=eos)["tokens"]
    for row, want in zip(ours.tokens, ref.tolist()):
        if eos in want:
            want = want[:want.index(eos) + 1]
        assert row == want
