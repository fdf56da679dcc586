"""Every non-Llama family against transformers and peft (torch, float32) on tiny random models.

One reference subprocess builds every tiny model (each quirk and GQA covered) and computes its
logits; a second loads what we exported (PEFT adapters with random non-zero B, on the float and on
the NF4 base, and merged checkpoints) with peft / transformers and computes theirs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.converters.merged import save_merged
from fastlora_jax.lora.layer import dense
from fastlora_jax.models.registry import FAMILIES
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, initializer_range=0.2)
LONGROPE_HALF = 8 // 2  # rotary dims / 2 with head_dim 16 and partial_rotary_factor 0.5

# name -> (HF config class, model class, config kwargs). The first case of each family also gets
# the adapter / NF4 / merged-export checks.
CASES = {
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       dict(BASE, sliding_window=5)),
    "mistral_full_head_dim": ("MistralConfig", "MistralForCausalLM",
                              dict(BASE, hidden_size=48, head_dim=16, sliding_window=None,
                                   tie_word_embeddings=True)),
    "gemma_gqa_head_dim": ("GemmaConfig", "GemmaForCausalLM",
                           dict(BASE, head_dim=32, hidden_act="gelu_pytorch_tanh")),
    "gemma_mqa_legacy_gelu": ("GemmaConfig", "GemmaForCausalLM",
                              dict(BASE, num_key_value_heads=1, head_dim=16, hidden_act="gelu",
                                   attention_bias=True)),
    "gemma2_alternating": ("Gemma2Config", "Gemma2ForCausalLM",
                           dict(BASE, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                                sliding_window=5)),
    "gemma2_small_caps": ("Gemma2Config", "Gemma2ForCausalLM",
                          dict(BASE, head_dim=24, sliding_window=7, attn_logit_softcapping=1.5,
                               final_logit_softcapping=2.5, tie_word_embeddings=False)),
    "gemma3_local_rope": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                          dict(BASE, num_hidden_layers=5, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=5, layer_types=["sliding_attention",
                                                              "full_attention"] * 2
                               + ["sliding_attention"],  # scanned as (0-3, period 2), (4)
                               rope_theta=1000.0, rope_local_base_freq=50.0,
                               rope_scaling=dict(rope_type="linear", factor=2.0))),
    "gemma3_mqa_caps": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # attention cap: unused by HF
                        dict(BASE, num_key_value_heads=1, head_dim=16, sliding_window=6,
                             attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "phi3_window": ("Phi3Config", "Phi3ForCausalLM",
                    dict(BASE, sliding_window=7, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)),
    "phi3_longrope_partial": ("Phi3Config", "Phi3ForCausalLM",
                              dict(BASE, max_position_embeddings=64,
                                   original_max_position_embeddings=16, partial_rotary_factor=0.5,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   rope_scaling=dict(
                                       type="longrope",
                                       short_factor=[1.0, 1.5, 2.0, 3.0][:LONGROPE_HALF],
                                       long_factor=[2.0, 4.0, 8.0, 16.0][:LONGROPE_HALF]))),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE)),
    "qwen2_sliding_top_layers": ("Qwen2Config", "Qwen2ForCausalLM",
                                 dict(BASE, num_hidden_layers=4, use_sliding_window=True,
                                      sliding_window=5, max_window_layers=2,
                                      tie_word_embeddings=True)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, head_dim=24)),
    "qwen3_bias_tied": ("Qwen3Config", "Qwen3ForCausalLM",
                        dict(BASE, head_dim=16, num_key_value_heads=1, attention_bias=True,
                             tie_word_embeddings=True)),
}
SEQ, SHORT = 24, 12  # 24 > phi3's original context 16 (long factors), 12 < it (short factors)
SHORT_CASES = ("phi3_longrope_partial",)  # also compared on the SHORT prefix

BUILD = """
import torch, pathlib, transformers
for name, (cfg_cls, model_cls, kwargs) in ARGS["cases"].items():
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))   # non-trivial norms and biases
    folder = pathlib.Path(ARGS["root"]) / name
    model.save_pretrained(folder, safe_serialization=True)
    ids = torch.tensor(INPUTS["ids"]) % kwargs["vocab_size"]
    with torch.no_grad():
        OUTPUTS[name] = model(input_ids=ids).logits.float().numpy()
        if name in ARGS["short_cases"]:
            OUTPUTS[name + "/short"] = model(input_ids=ids[:, :ARGS["short"]]).logits.numpy()
"""

PEFT_LOGITS = """
import json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
for name, (base, adapter, vocab) in ARGS["pairs"].items():
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        OUTPUTS[name] = model(input_ids=torch.tensor(INPUTS["ids"]) % vocab).logits.float().numpy()
OUTPUTS["peft_defaults"] = np.array(json.dumps({t: DEFAULTS.get(t) for t in ARGS["types"]}))
from peft import LoraConfig, get_peft_model
for name, (base, targets, out, vocab) in ARGS["peft_made"].items():   # adapters made by peft
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, target_modules=targets,
                                             init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    model.save_pretrained(out)
    with torch.no_grad():
        OUTPUTS[name] = model(input_ids=torch.tensor(INPUTS["ids"]) % vocab).logits.float().numpy()
"""
PEFT_MADE = {"phi3_window": ["qkv_proj", "gate_up_proj"],  # fused modules, PEFT's names
             "qwen2_bias": None}                            # PEFT's default for qwen2


def _first_cases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, (cfg_cls, _, _) in CASES.items():
        out.setdefault(cfg_cls, name)
    return out


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(5).integers(0, 10_000, size=(2, SEQ)).astype(np.int64)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, ids):
    root = tmp_path_factory.mktemp("hf_families")
    logits = run_reference(BUILD, {"ids": ids}, cases=CASES, root=str(root), short=SHORT,
                           short_cases=SHORT_CASES)
    return root, logits


def _ours(model, ids):
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_family_logits_match_transformers(hf_models, ids, case):
    root, logits = hf_models
    vocab = CASES[case][2]["vocab_size"]
    model, _ = FastLanguageModel.from_pretrained(root / case, dtype="float32")
    assert model.config.model_type == json.loads((root / case / "config.json").read_text())[
        "model_type"]
    inputs = [("", ids % vocab)] + ([("/short", ids[:, :SHORT] % vocab)]
                                    if case in SHORT_CASES else [])
    for suffix, x in inputs:
        ours = _ours(model, x)
        assert ours.shape == logits[case + suffix].shape
        np.testing.assert_allclose(ours, logits[case + suffix], atol=1e-4, rtol=0)
        assert np.abs(logits[case + suffix]).max() > 0.5  # not a comparison of near-zeros


def _dequantized(model):
    return jax.tree.map(lambda w: dense(w), model.params(), is_leaf=lambda x: hasattr(x, "codes"))


@pytest.fixture(scope="module")
def exported(hf_models, ids, tmp_path_factory):
    """Per family (its first case): our adapter on the float base (default targets, random B),
    our adapter on the NF4 base, and the merged float32 export, with our logits."""
    root, _ = hf_models
    out = tmp_path_factory.mktemp("family_exports")
    results, pairs = {}, {}
    for case in _first_cases().values():
        vocab = CASES[case][2]["vocab_size"]
        x = ids % vocab
        model, _ = FastLanguageModel.from_pretrained(root / case, dtype="float32")
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
        model.save_pretrained(out / case)
        results[case] = _ours(model, x)
        pairs[case] = (str(root / case), str(out / case), vocab)
        model.save_pretrained_merged(out / f"{case}-merged", dtype="float32")
        pairs[f"{case}-merged"] = (str(out / f"{case}-merged"), None, vocab)
        q, _ = FastLanguageModel.from_pretrained(root / case, dtype="float32", load_in_4bit=True)
        assert any(hasattr(leaf, "codes") for leaf in jax.tree.leaves(
            q.params(), is_leaf=lambda v: hasattr(v, "codes")))
        q = FastLanguageModel.get_peft_model(q, r=4, lora_alpha=8, init_lora_weights=False)
        q.save_pretrained(out / f"{case}-nf4")
        save_merged(out / f"{case}-nf4-base", q.config, _dequantized(q), dtype="float32")
        results[f"{case}-nf4"] = _ours(q, x)
        pairs[f"{case}-nf4"] = (str(out / f"{case}-nf4-base"), str(out / f"{case}-nf4"), vocab)
    peft_made = {f"{case}-peft-made": (str(root / case), targets, str(out / f"{case}-peft-made"),
                                       CASES[case][2]["vocab_size"])
                 for case, targets in PEFT_MADE.items()}
    ref = run_reference(PEFT_LOGITS, {"ids": ids}, pairs=pairs, types=sorted(FAMILIES),
                        peft_made=peft_made)
    return out, results, ref


@pytest.mark.parametrize("case", list(_first_cases().values()))
def test_our_adapter_loads_in_peft_with_same_logits(exported, case):
    _, results, ref = exported
    np.testing.assert_allclose(results[case], ref[case], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(_first_cases().values()))
def test_our_adapter_on_nf4_base_loads_in_peft_with_same_logits(exported, case):
    _, results, ref = exported
    np.testing.assert_allclose(results[f"{case}-nf4"], ref[f"{case}-nf4"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(_first_cases().values()))
def test_merged_export_loads_in_transformers_with_same_logits(exported, case):
    """transformers on our merged checkpoint (its config.json written by our config_to_hf)
    computes what our adapted model computes."""
    _, results, ref = exported
    np.testing.assert_allclose(ref[f"{case}-merged"], results[case], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(_first_cases().values()))
def test_adapter_targets_every_projection_with_hf_names(exported, case):
    out, _, _ = exported
    cfg = json.loads((out / case / "adapter_config.json").read_text())
    family = FAMILIES[json.loads((out / f"{case}-merged" / "config.json").read_text())[
        "model_type"]]
    assert sorted(cfg["target_modules"]) == sorted(family.default_target_modules)


@pytest.mark.parametrize("case", sorted(PEFT_MADE))
def test_adapter_made_by_peft_loads_into_our_model(exported, hf_models, ids, case):
    """A peft-made adapter on fused Phi-3 modules, and one whose target_modules is null (read
    with PEFT's default for the family), give peft's logits in our model."""
    out, _, ref = exported
    root, _ = hf_models
    folder = out / f"{case}-peft-made"
    if PEFT_MADE[case] is None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        cfg["target_modules"] = None
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = FastLanguageModel.from_pretrained(root / case, dtype="float32")
    model.load_adapter(folder)
    ours = _ours(model, ids % CASES[case][2]["vocab_size"])
    np.testing.assert_allclose(ours, ref[f"{case}-peft-made"], atol=1e-4, rtol=0)


def test_peft_default_targets_match_peft(exported):
    """Our per-family PEFT default (target_modules null) is PEFT's own table; phi3 has none."""
    _, _, ref = exported
    peft = json.loads(str(ref["peft_defaults"]))
    for model_type, family in FAMILIES.items():
        want = peft[model_type]
        assert family.peft_default_target_modules == (None if want is None else tuple(want))
    assert peft["phi3"] is None
