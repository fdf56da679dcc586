"""LLaVA against transformers (torch, float32) on a tiny random checkpoint saved with its processor:
logits with two real images of different sizes (the processor resizes them), our PEFT adapter
(vision and language modules, random non-zero B) loaded by `PeftModel.from_pretrained` on
`LlavaForConditionalGeneration`, and the merged export loaded by transformers."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from fastlora_jax import FastVisionModel
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.testing.vision import (HF_GENERATE, build_llava,
                                        check_peft_and_merged_exports, hf_logits, images)

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_llava(tmp_path_factory.mktemp("llava") / "ckpt")


def chat_inputs(processor, pictures: list) -> dict[str, np.ndarray]:
    content = [{"type": "image"}, {"type": "text", "text": "Which colours are these?"}]
    content += [{"type": "image"}] * (len(pictures) - 1)
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    out = processor(text=[text], images=pictures, return_tensors="np")
    return {k: np.asarray(out[k]) for k in ("input_ids", "attention_mask", "pixel_values")}


def test_llava_siglip_logits_match_transformers(tmp_path: pathlib.Path) -> None:
    """A SigLIP tower (no CLS token: the default strategy still drops the first patch)."""
    folder = build_llava(tmp_path / "ckpt", siglip=True)
    model, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
    inputs = chat_inputs(processor, images(((50, 20),), seed=4))
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 15  # 4 x 4 - 1
    np.testing.assert_allclose(np.asarray(model(**inputs)), hf_logits(folder, inputs),
                               atol=1e-4, rtol=1e-4)


def test_llava_logits_match_transformers(llava_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    inputs = chat_inputs(processor, images())
    assert inputs["pixel_values"].shape[0] == 2
    ours = np.asarray(model(**inputs))
    ref = hf_logits(llava_dir, inputs)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_llava_peft_adapter_and_merged_export(llava_dir: pathlib.Path,
                                              tmp_path: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    inputs = chat_inputs(processor, images(((32, 32), (50, 20)), seed=1))
    # 2 language layers x 7 projections, 3 tower layers x 6 projections
    check_peft_and_merged_exports(model, processor, llava_dir, tmp_path, inputs,
                                  cls="LlavaForConditionalGeneration", modules=(14, 18))


def test_llava_greedy_generation_matches_transformers(llava_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    inputs = chat_inputs(processor, images(((36, 28),), seed=2))
    eos = processor.tokenizer.eos_token_id
    ours = model.generate(inputs, max_new_tokens=10, eos_token_id=eos)
    ref = run_reference(HF_GENERATE, inputs, folder=str(llava_dir), new=10, eos=eos,
                        cls="LlavaForConditionalGeneration")["tokens"]
    want = [t for t in ref[0].tolist()]
    if eos in want:
        want = want[:want.index(eos) + 1]
    assert ours.tokens[0] == want


PEFT_WRITES = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaForConditionalGeneration
torch.manual_seed(1)
base = LlavaForConditionalGeneration.from_pretrained(ARGS["base"], dtype=torch.float32).eval()
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ARGS["targets"],
                                        init_lora_weights=False)).eval()
model.save_pretrained(ARGS["adapter"])
with torch.no_grad():
    OUTPUTS["logits"] = model(**{k: torch.from_numpy(v) for k, v in INPUTS.items()}).logits.numpy()
"""


def test_llava_loads_an_adapter_peft_wrote(llava_dir: pathlib.Path,
                                           tmp_path: pathlib.Path) -> None:
    """PEFT's own adapter (random A and B on both parts, a regex target) on our model."""
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    inputs = chat_inputs(processor, images(((44, 30),), seed=6))
    targets = (r".*(vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.fc1)"
               r"|language_model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj))")
    ref = run_reference(PEFT_WRITES, inputs, base=str(llava_dir), adapter=str(tmp_path / "a"),
                        targets=targets)
    model.load_adapter(tmp_path / "a")
    assert {n for _, n in model.lora_spec.vision.targets} == {"q_proj", "v_proj", "fc1"}
    assert {n for _, n in model.lora_spec.language.targets} == {"o_proj", "down_proj"}
    np.testing.assert_allclose(np.asarray(model(**inputs)), ref["logits"], atol=1e-4, rtol=1e-4)


def test_llava_batched_generation_matches_transformers(llava_dir: pathlib.Path) -> None:
    """Two left-padded rows of different lengths (one and two images): each row's greedy
    continuation, and the forward's logits on the real tokens, equal transformers' for the
    same batch."""
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    processor.tokenizer.padding_side = "left"
    texts = []
    for n, words in ((1, "Colour?"), (2, "Which of these two pictures is darker, and why?")):
        content = [{"type": "image"}] * n + [{"type": "text", "text": words}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True))
    out = processor(text=texts, images=images(((30, 40), (25, 25), (40, 22)), seed=7),
                    return_tensors="np", padding=True)
    inputs = {k: np.asarray(out[k]) for k in ("input_ids", "attention_mask", "pixel_values")}
    assert not inputs["attention_mask"][0].all()  # the short row is padded on the left
    eos = processor.tokenizer.eos_token_id
    ours = model.generate(inputs, max_new_tokens=8, eos_token_id=eos)
    ref = run_reference(HF_GENERATE, inputs, folder=str(llava_dir), new=8, eos=eos,
                        cls="LlavaForConditionalGeneration")["tokens"]
    for row, tokens in enumerate(ours.tokens):
        want = ref[row].tolist()
        assert tokens == (want[:want.index(eos) + 1] if eos in want else want)
    # the padded batch's forward: the real tokens' logits equal transformers'
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(model(**inputs))[real],
                               hf_logits(llava_dir, inputs)[real], atol=1e-4, rtol=1e-4)
