"""Tiny random vision-language checkpoints: models saved by transformers in the reference
environment with processors saved beside them here, tiny ones written by our own exporter
(no torch), and the images and synthetic image tasks the tests and benchmarks feed them.

The processor is built from SmolLM2's tokenizer (one `<image>` token added) and a CLIP / SigLIP
image processor; its chat template renders `{"type": "image"}` parts as the image token, which
the processor then expands to one placeholder per image feature.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from fastlora_jax.testing.refenv import REPO, run_reference

TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            image_size=28, patch_size=7, projection_dim=16)

# The end of a reference-environment build script: norms and biases moved off their init values
# (so a wrong one shows in the logits), the model saved.
PERTURB_AND_SAVE = """
with torch.no_grad():
    for n, p in model.named_parameters():
        if "norm" in n or n.endswith("bias"):
            p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(ARGS["folder"])
"""

# The model is built and saved by transformers (the reference environment has no image library);
# the processor is built and saved here, into the same folder.
BUILD_LLAVA = """
import torch, transformers
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
torch.manual_seed(ARGS["seed"])
text = LlamaConfig(**ARGS["tokens"], **ARGS["text"])
vision = getattr(transformers, ARGS["vision_cls"])(**ARGS["vision"])
config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ARGS["image_id"],
                     vision_feature_layer=-2, vision_feature_select_strategy="default",
                     image_seq_length=(vision.image_size // vision.patch_size) ** 2)
model = LlavaForConditionalGeneration(config).eval()
""" + PERTURB_AND_SAVE


def _token_args(tok) -> dict[str, int | None]:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_llava(folder: pathlib.Path, seed: int = 0, *, text: dict | None = None,
                vision: dict | None = None, siglip: bool = False) -> pathlib.Path:
    """A tiny LlavaForConditionalGeneration (CLIP tower, or SigLIP with `siglip`; Llama text
    model) with its processor; `text` / `vision` override the sizes (LlamaConfig /
    CLIPVisionConfig / SiglipVisionConfig keyword arguments)."""
    vision = dict(SIGLIP if siglip else CLIP, **(vision or {}))
    processor, image_id = tiny_processor(image_size=vision["image_size"],
                                         patch_size=vision["patch_size"], class_token=not siglip)
    run_reference(BUILD_LLAVA, folder=str(folder), seed=seed, image_id=image_id,
                  tokens=_token_args(processor.tokenizer), text=dict(TEXT, **(text or {})),
                  vision=vision,
                  vision_cls="SiglipVisionConfig" if siglip else "CLIPVisionConfig")
    processor.save_pretrained(str(folder))
    return folder


# LLaVA-NeXT: CLIP's 28-pixel tiles, grids of 1 x 2, 2 x 1 and 2 x 2 tiles (height, width)
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56]]

BUILD_LLAVA_NEXT = """
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration)
torch.manual_seed(ARGS["seed"])
config = LlavaNextConfig(vision_config=CLIPVisionConfig(**ARGS["vision"]),
                         text_config=LlamaConfig(**ARGS["tokens"], **ARGS["text"]),
                         image_token_id=ARGS["image_id"], vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_grid_pinpoints=ARGS["pinpoints"])
model = LlavaNextForConditionalGeneration(config).eval()
""" + PERTURB_AND_SAVE


def build_llava_next(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny LlavaNextForConditionalGeneration (CLIP tower, Llama text model, the
    NEXT_PINPOINTS grids) with its processor."""
    processor, image_id = tiny_next_processor()
    run_reference(BUILD_LLAVA_NEXT, folder=str(folder), seed=seed, image_id=image_id,
                  tokens=_token_args(processor.tokenizer), text=TEXT, vision=CLIP,
                  pinpoints=NEXT_PINPOINTS)
    processor.save_pretrained(str(folder))
    return folder


GEMMA3_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=512, rms_norm_eps=1e-6, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=16, rope_theta=1000.0, rope_local_base_freq=100.0)
SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, vision_use_head=False)

BUILD_GEMMA3 = """
import torch
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                          SiglipVisionConfig)
torch.manual_seed(ARGS["seed"])
ids = ARGS["ids"]
text = Gemma3TextConfig(**ARGS["tokens"], **ARGS["text"])
vision = SiglipVisionConfig(**ARGS["vision"])
config = Gemma3Config(text_config=text, vision_config=vision,
                      mm_tokens_per_image=ARGS["mm_tokens"], image_token_index=ids["image_token"],
                      boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"])
model = Gemma3ForConditionalGeneration(config).eval()
with torch.no_grad():
    for n, p in model.named_parameters():
        if "norm" in n or n.endswith("bias"):
            p.add_(0.1 * torch.randn_like(p))
        if "mm_input_projection" in n:
            p.normal_(0, 0.2)
model.save_pretrained(ARGS["folder"])
"""

GEMMA3_TEMPLATE = CHAT_TEMPLATE.replace("<image>", "<start_of_image>")


def build_gemma3(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower, 3 text layers with a sliding window
    shorter than an image's block) with its processor."""
    processor, ids = tiny_gemma3_processor(image_size=SIGLIP["image_size"], mm_tokens=4)
    run_reference(BUILD_GEMMA3, folder=str(folder), seed=seed, ids=ids,
                  tokens=_token_args(processor.tokenizer), text=GEMMA3_TEXT, vision=SIGLIP,
                  mm_tokens=4)
    processor.save_pretrained(str(folder))
    return folder


def images(sizes: tuple[tuple[int, int], ...] = ((40, 30), (17, 23)), seed: int = 0) -> list:
    """PIL images of the given (width, height): random blocks of colour (real RGB images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        coarse = rng.integers(0, 256, size=(max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
        big = np.kron(coarse, np.ones((4, 4, 1), np.uint8))[:h, :w]
        pad = np.zeros((h, w, 3), np.uint8)
        pad[:big.shape[0], :big.shape[1]] = big
        out.append(Image.fromarray(pad))
    return out


# transformers' logits on inputs our side built with the processor (the same arrays both ways).
HF_LOGITS = """
import torch, transformers
cls = getattr(transformers, ARGS["cls"])
model = cls.from_pretrained(ARGS["folder"], dtype=torch.float32).eval()
inputs = {k: torch.from_numpy(v) for k, v in INPUTS.items()}
with torch.no_grad():
    OUTPUTS["logits"] = model(**inputs).logits.numpy()
"""


def hf_logits(folder: pathlib.Path, arrays: dict[str, np.ndarray],
              cls: str = "LlavaForConditionalGeneration") -> np.ndarray:
    return run_reference(HF_LOGITS, arrays, folder=str(folder), cls=cls)["logits"]


HF_PEFT_AND_MERGED = """
import torch, transformers
from peft import PeftModel
cls = getattr(transformers, ARGS["cls"])
inputs = {k: torch.from_numpy(v) for k, v in INPUTS.items()}
base = cls.from_pretrained(ARGS["base"], dtype=torch.float32).eval()
peft_model = PeftModel.from_pretrained(base, ARGS["adapter"]).eval()
names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
OUTPUTS["vision_modules"] = np.array(sum(ARGS["vision_part"] in n for n in names))
OUTPUTS["language_modules"] = np.array(sum("language_model" in n for n in names))
with torch.no_grad():
    OUTPUTS["peft"] = peft_model(**inputs).logits.numpy()
merged = cls.from_pretrained(ARGS["merged"], dtype=torch.float32).eval()
with torch.no_grad():
    OUTPUTS["merged"] = merged(**inputs).logits.numpy()
"""


# transformers' greedy continuation (the new tokens) of the same inputs.
HF_GENERATE = """
import torch, transformers
model = getattr(transformers, ARGS["cls"]).from_pretrained(ARGS["folder"],
                                                           dtype=torch.float32).eval()
inputs = {k: torch.from_numpy(v) for k, v in INPUTS.items()}
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=ARGS["new"], do_sample=False,
                         eos_token_id=ARGS["eos"], pad_token_id=ARGS["eos"])
OUTPUTS["tokens"] = out[:, inputs["input_ids"].shape[1]:].numpy()
"""


def check_peft_and_merged_exports(model, processor, base: pathlib.Path, out: pathlib.Path,
                                  inputs: dict[str, np.ndarray], *, cls: str,
                                  modules: tuple[int, int], hf_inputs: dict | None = None,
                                  vision_part: str = "vision_tower",
                                  rtol: float = 1e-4) -> None:
    """Our PEFT adapter and merged export of a `VisionLM` loaded from `base`, against their real
    consumers: LoRA (r=4, alpha 8) on the default vision and language targets with random
    non-zero B, which must move the logits on `inputs`; the adapter saved under `out / "adapter"`
    and loaded by `PeftModel.from_pretrained` on transformers' `cls`, and the float32 merged
    export (`out / "merged"`, with `processor`) loaded by `cls.from_pretrained`, must give our
    logits (atol 1e-4, `rtol`) on `hf_inputs` (default `inputs`). `modules`: how many
    (language, vision) modules PEFT adapts (vision: module names holding `vision_part`)."""
    import jax.numpy as jnp

    from fastlora_jax import FastVisionModel

    base_logits = np.asarray(model(**inputs))
    FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    assert model.lora_spec.language is not None and model.lora_spec.vision is not None
    randomize_b(model)
    ours = np.asarray(model(**inputs))
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters matter
    model.save_pretrained(out / "adapter")
    model.save_pretrained_merged(out / "merged", processor, dtype=jnp.float32)
    ref = run_reference(HF_PEFT_AND_MERGED, inputs if hf_inputs is None else hf_inputs,
                        base=str(base), adapter=str(out / "adapter"), merged=str(out / "merged"),
                        cls=cls, vision_part=vision_part)
    assert (int(ref["language_modules"]), int(ref["vision_modules"])) == modules
    np.testing.assert_allclose(ours, ref["peft"], atol=1e-4, rtol=rtol)
    np.testing.assert_allclose(ours, ref["merged"], atol=1e-4, rtol=rtol)


def randomize_b(model, seed: int = 5) -> None:
    """Non-zero B everywhere on a `VisionLM`, so that every adapter changes the logits."""
    import jax

    keys = iter(jax.random.split(jax.random.key(seed), 256))

    def fill(path, leaf):
        if path[-1].key == "lora_B":
            return 0.5 * jax.random.normal(next(keys), leaf.shape, leaf.dtype)
        return leaf

    model.set_adapter(model.lora_spec, jax.tree_util.tree_map_with_path(fill, model.lora))


def tiny_processor(tokenizer_dir: pathlib.Path = TOKENIZER, *, image_size: int = 28,
                   patch_size: int = 7, class_token: bool = True) -> tuple[object, int]:
    """(a LlavaProcessor built in this environment, the `<image>` token id); `class_token`:
    the tower has CLIP's CLS token (which the default strategy then drops)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1 if class_token else 0,
                               chat_template=CHAT_TEMPLATE)
    return processor, tok.convert_tokens_to_ids("<image>")


def tiny_next_processor(tokenizer_dir: pathlib.Path = TOKENIZER) -> tuple[object, int]:
    """(a LlavaNextProcessor for CLIP's 28-pixel tiles and NEXT_PINPOINTS, the `<image>` id)."""
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<image>"], special_tokens=True)
    size = CLIP["image_size"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=NEXT_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok,
                                   patch_size=CLIP["patch_size"],
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return processor, tok.convert_tokens_to_ids("<image>")


def tiny_gemma3_processor(tokenizer_dir: pathlib.Path = TOKENIZER, *, image_size: int = 32,
                          mm_tokens: int = 4) -> tuple[object, dict[str, int]]:
    """(a Gemma3Processor built in this environment, its special token ids)."""
    from transformers import AutoTokenizer, Gemma3ImageProcessor, Gemma3Processor

    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
               "image_token": "<image_soft_token>"}
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=special)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in special.items()}
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tok, image_seq_length=mm_tokens, chat_template=GEMMA3_TEMPLATE)
    return processor, ids


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = CHAT_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
# patch 4 x merge 2: a 32 x 24 picture is 8 x 6 patches, 12 language tokens
QWEN_IMAGE_PROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64,
                            max_pixels=64 * 64)
QWEN_TEXT = dict(TEXT, rope_theta=10000.0, rms_norm_eps=1e-6,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                   out_hidden_size=TEXT["hidden_size"], patch_size=4, temporal_patch_size=2,
                   spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1])


def tiny_qwen2_5_vl_processor(tokenizer_dir: pathlib.Path = TOKENIZER
                              ) -> tuple[object, dict[str, int]]:
    """(a Qwen2.5-VL processor built in this environment, its vision token ids): SmolLM2's
    tokenizer with Qwen's vision tokens, transformers' Qwen2VLImageProcessor."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from fastlora_jax.vision.qwen2_5_vl import _images_only_processor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(QWEN_VISION_TOKENS, special_tokens=True)
    processor = _images_only_processor()(
        image_processor=Qwen2VLImageProcessor(**QWEN_IMAGE_PROCESSOR), tokenizer=tok,
        chat_template=QWEN_TEMPLATE)
    return processor, {t: tok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}


def _tiny_qwen2_5_vl() -> tuple[Any, Any, Any]:
    """(record, config, processor) of the tiny Qwen2.5-VL."""
    from fastlora_jax.vision.qwen2_5_vl import QWEN2_5_VL, parse_config

    processor, ids = tiny_qwen2_5_vl_processor()
    tok = processor.tokenizer
    config = parse_config(dict(
        QWEN_TEXT, model_type="qwen2_5_vl", num_hidden_layers=2, vocab_size=len(tok),
        eos_token_id=tok.eos_token_id, vision_config=QWEN_VISION,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    return QWEN2_5_VL, config, processor


def tiny_vlm_numpy(folder: pathlib.Path, model_type: str = "llava",
                   seed: int = 0) -> pathlib.Path:
    """A tiny random LLaVA, LLaVA-NeXT, Gemma 3 or Qwen2.5-VL checkpoint written by our own exporter (no
    torch): for data, training and CLI tests that need a model, not transformers' numbers."""
    import jax
    import jax.numpy as jnp

    from fastlora_jax.models import decoder
    from fastlora_jax.models.decoder import set_path
    from fastlora_jax.models.registry import config_from_hf
    from fastlora_jax.vision.checkpoint import save_vlm_merged
    from fastlora_jax.vision.gemma3_mm import GEMMA3_VLM, Gemma3VisionConfig
    from fastlora_jax.vision.llava import LLAVA, LlavaConfig
    from fastlora_jax.vision.llava_next import LLAVA_NEXT, LlavaNextConfig
    from fastlora_jax.vision.vit import VisionConfig

    if model_type == "qwen2_5_vl":
        arch, config, processor = _tiny_qwen2_5_vl()
    elif model_type in ("llava", "llava_next"):
        processor, image_id = (tiny_processor() if model_type == "llava"
                               else tiny_next_processor())
        tok = processor.tokenizer
        text = config_from_hf(dict(TEXT, model_type="llama", num_hidden_layers=2,
                                   vocab_size=len(tok), eos_token_id=tok.eos_token_id))
        vision = VisionConfig.from_hf(dict(CLIP, model_type="clip_vision_model",
                                           num_hidden_layers=2), "tiny")
        if model_type == "llava":
            arch, config = LLAVA, LlavaConfig(model_type="llava", text=text, vision=vision,
                                              image_token_id=image_id)
        else:
            arch, config = LLAVA_NEXT, LlavaNextConfig(
                model_type="llava_next", text=text, vision=vision, image_token_id=image_id,
                grid_pinpoints=tuple(tuple(p) for p in NEXT_PINPOINTS))
    else:
        processor, ids = tiny_gemma3_processor()
        tok = processor.tokenizer
        text = config_from_hf(dict(GEMMA3_TEXT, model_type="gemma3_text", vocab_size=len(tok),
                                   eos_token_id=tok.eos_token_id))
        vision = VisionConfig.from_hf(dict(SIGLIP, model_type="siglip_vision_model"), "tiny")
        arch, config = GEMMA3_VLM, Gemma3VisionConfig(
            model_type="gemma3", text=text, vision=vision, image_token_id=ids["image_token"],
            mm_tokens_per_image=4, boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"])
    text = config.text
    key = jax.random.key(seed)
    # weights of about 1 / sqrt(width) (not init_params' 0.02): logits that LoRA can move
    language = jax.tree.map(lambda a: a * 5.0 if a.ndim >= 2 else a,
                            decoder.init_params(text, key))
    params = {"language": language, "vision": {}}
    for i, spec in enumerate(arch.vision_specs(config)):
        if spec.path[-1] == "bias" or "mm_soft_emb_norm" in spec.path:
            value = jnp.zeros(spec.shape)
        elif spec.path == ("image_newline",):
            value = 0.5 * jax.random.normal(jax.random.fold_in(key, 1000 + i), spec.shape)
        elif "norm" in "".join(spec.path) or spec.path[-2] == "ln_q":
            value = jnp.ones(spec.shape)
        else:
            value = 0.05 * jax.random.normal(jax.random.fold_in(key, 1000 + i), spec.shape)
        set_path(params["vision"], spec.path, value)
    save_vlm_merged(folder, arch, config, params, None, None, dtype=jnp.float32,
                    processor=processor)
    return folder


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def shapes_dataset(folder: pathlib.Path, n: int = 24, seed: int = 0,
                   size: tuple[int, int] | None = None) -> pathlib.Path:
    """A synthetic task: an image of a coloured square or disc on white -> name its colour.
    Writes PNGs and `images.jsonl` (rows in TRL's conversational vision format). Images are
    `size` (width, height), or of random sizes."""
    import json

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    names = sorted(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        if size is not None:
            w, h = size
        image = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / f"shape{i}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "What colour is the shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": colour}]}],
            "images": [f"shape{i}.png"]})
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path



def mixed_shapes_dataset(folder: pathlib.Path, n: int = 12, seed: int = 0,
                         sizes: tuple[tuple[int, int], ...] = ((32, 24), (24, 40))
                         ) -> pathlib.Path:
    """`shapes_dataset`'s task with 0, 1 or 2 images per row (row i holds i % 3): no image ->
    "none", one -> its colour, two -> both ("red and blue"). The images cycle through `sizes`
    (width, height), so a dynamic-resolution model sees different patch counts per row."""
    import json

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(COLOURS)
    rows, made = [], 0
    for i in range(n):
        files, colours = [], []
        for _ in range(i % 3):
            colour = names[int(rng.integers(len(names)))]
            w, h = sizes[made % len(sizes)]
            image = Image.new("RGB", (w, h), (255, 255, 255))
            box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
            draw = ImageDraw.Draw(image)
            (draw.ellipse if made % 2 else draw.rectangle)(box, fill=COLOURS[colour])
            image.save(folder / f"mixed{made}.png")
            files.append(f"mixed{made}.png")
            colours.append(colour)
            made += 1
        answer = " and ".join(colours) or "none"
        content = [{"type": "image"} for _ in files] + [
            {"type": "text", "text": "What colours are the shapes?"}]
        rows.append({"messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": files})
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
