"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration (torch, float32) on a tiny
random checkpoint with its own processor (a word-level tokenizer with Qwen's special tokens, the
PIL image processor, a chat template with image parts), on real pictures of two sizes (square and
non-square), one or two images per conversation:

- M-RoPE position ids (get_rope_index, with and without padding) and the rotary cos / sin;
- logits of the whole model.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.models.rope import cos_sin
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.vision.qwen2_5_vl import parse_config, rope_positions
from tests.parity.test_qwen2_5_vl_vision import PROCESSOR, picture

pytestmark = pytest.mark.reference

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = ["user", "assistant", "what", "colour", "is", "this", "and", "that", "red", "green",
         "blue", "a", "shape", "?", "."]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %} {{ c['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
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
import json, pathlib, torch, transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from PIL import Image
folder = pathlib.Path(ARGS["folder"])
words = ARGS["specials"] + ARGS["words"]
core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>",
                              pad_token="<|endoftext|>", eos_token="<|im_end|>")
tok.add_special_tokens({"additional_special_tokens": ARGS["specials"][1:]})
ids = {t: tok.convert_tokens_to_ids(t) for t in ARGS["specials"]}
processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**ARGS["processor"]),
                                tokenizer=tok, chat_template=ARGS["chat_template"])
processor.save_pretrained(folder)
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
processor = AutoProcessor.from_pretrained(folder)
pictures = [Image.fromarray(INPUTS[f"image{i}"]) for i in range(len(ARGS["sizes"]))]
texts = [processor.apply_chat_template(c, tokenize=False) for c in ARGS["conversations"]]
images = [[pictures[i] for i in idx] for idx in ARGS["images_of"]]
for k, (text, imgs) in enumerate(zip(texts, images)):
    batch = processor(text=[text], images=imgs, return_tensors="pt")
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        OUTPUTS[f"{k}/{key}"] = batch[key].numpy()
    with torch.no_grad():
        out = model(**batch)
    OUTPUTS[f"{k}/logits"] = out.logits.numpy()
    OUTPUTS[f"{k}/text"] = np.array(text)
processor.tokenizer.padding_side = "left"
batch = processor(text=texts, images=[p for imgs in images for p in imgs], return_tensors="pt",
                  padding=True)
pos, deltas = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
OUTPUTS["batch/input_ids"] = batch["input_ids"].numpy()
OUTPUTS["batch/attention_mask"] = batch["attention_mask"].numpy()
OUTPUTS["batch/image_grid_thw"] = batch["image_grid_thw"].numpy()
OUTPUTS["batch/positions"] = pos.numpy()
OUTPUTS["batch/deltas"] = deltas.numpy()
x = torch.zeros(1, dtype=torch.float32)
cos, sin = model.model.language_model.rotary_emb(x, pos)
OUTPUTS["batch/cos"] = cos.numpy()
OUTPUTS["batch/sin"] = sin.numpy()
OUTPUTS["config"] = np.array((folder / "config.json").read_text())
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    images = {f"image{i}": picture(h, w, i) for i, (h, w) in enumerate(SIZES)}
    ref = run_reference(BUILD, images, folder=str(folder), specials=SPECIALS, words=WORDS,
                        chat_template=CHAT_TEMPLATE, processor=PROCESSOR, text=TEXT,
                        vision=VISION, sizes=SIZES, conversations=CONVERSATIONS,
                        images_of=IMAGES_OF)
    return folder, images, ref


def test_config_reads_the_saved_checkpoint(reference):
    folder, _, ref = reference
    config = parse_config(json.loads(str(ref["config"])))
    assert config.text.rope.mrope_section == (2, 3, 3)
    assert config.text.head_dim == 16 and config.text.qkv_bias and not config.text.o_bias
    assert config.vision.fullatt_block_indexes == (1,)
    assert config.image_token_id == SPECIALS.index("<|image_pad|>")


def test_mrope_positions_and_tables_match_transformers(reference):
    _, _, ref = reference
    config = parse_config(json.loads(str(ref["config"])))
    positions, deltas = rope_positions(config, ref["batch/input_ids"],
                                       ref["batch/image_grid_thw"], ref["batch/attention_mask"])
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
