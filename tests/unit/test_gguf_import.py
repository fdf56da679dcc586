"""GGUF import on small synthetic files written with the `gguf` package's own writer."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel, ModelConfig
from fastlora_jax.converters.gguf_config import read_gguf_config
from fastlora_jax.converters.gguf_load import load_gguf_params
from fastlora_jax.converters.gguf_read import GGUFFile, find_gguf
from fastlora_jax.errors import CheckpointError, ConfigError, FastLoRAError
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.decoder import get_path, param_specs, set_path
from fastlora_jax.models.registry import config_from_hf
from tests.checkpoints import TINY_LLAMA
from tests.gguf_files import TOKENS, gguf_tensors, random_params, write_gguf
from tests.unit.test_families import REAL, _tiny

FAMILIES = {"llama": TINY_LLAMA, **{k: REAL[k] for k in ("mistral", "gemma", "gemma2", "gemma3",
                                                         "phi3", "phi3.5", "qwen2", "qwen3")}}


def _math(c: ModelConfig) -> ModelConfig:
    """The fields that change the forward pass (extras: token ids and bookkeeping, dropped)."""
    return dataclasses.replace(c, extras=())


def _tiny_config(name: str) -> ModelConfig:
    cfg = config_from_hf(FAMILIES[name])
    cfg = _tiny(cfg) if name != "llama" else cfg
    if name == "phi3.5":  # LongRoPE factors sized for the tiny head
        rope = dataclasses.replace(cfg.rope, short_factor=(1.0, 1.25, 1.5, 2.0),
                                   long_factor=(2.0, 3.0, 4.0, 5.0))
        cfg = dataclasses.replace(cfg, rope=rope)
    if cfg.query_pre_attn_scalar is not None:  # llama.cpp scales by head_dim ** -0.5
        cfg = dataclasses.replace(cfg, query_pre_attn_scalar=cfg.head_dim)
    if name == "mistral":  # written as arch llama, which has no sliding window
        cfg = dataclasses.replace(cfg, sliding_window=None)
    return cfg


def _load(path, dtype="float32", **kw):
    g = GGUFFile(path)
    config = read_gguf_config(g)
    return config, load_gguf_params(g, config, dtype=dtype, **kw)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_round_trips_through_a_gguf(tmp_path, name):
    """F32 files give back the exact parameters (Gemma's norms within one float32 step of 1:
    the file holds 1 + w) and config; the model type is the one llama.cpp's arch stands for
    (Mistral is written as llama)."""
    cfg = _tiny_config(name)
    params = random_params(cfg)
    config, loaded = _load(write_gguf(tmp_path / "m.gguf", cfg, params))
    expected = dataclasses.replace(cfg, model_type="llama") if name == "mistral" else cfg
    assert _math(config) == _math(expected)
    for spec in param_specs(cfg):
        gemma_norm = cfg.norm_offset and spec.path[-2].endswith("norm")
        np.testing.assert_allclose(np.asarray(get_path(loaded, spec.path)),
                                   get_path(params, spec.path), rtol=0,
                                   atol=2 ** -23 if gemma_norm else 0, err_msg=str(spec.path))


def _assert_f16_rounding(cfg: ModelConfig, params, model: CausalLM, ids: jnp.ndarray) -> None:
    """`model` holds `params` rounded to f16 (relative error <= 2^-11), except 1-D tensors
    (norms, biases), which llama.cpp keeps in F32 (Gemma's `1 + w` within one float32 step),
    and computes the logits of the f16-rounded model."""
    rounded = {}
    for spec in param_specs(cfg):
        value = get_path(params, spec.path)
        want = value if len(spec.layer_shape) == 1 else value.astype(np.float16).astype(
            np.float32)
        set_path(rounded, spec.path, want)
        loaded = np.asarray(get_path(model.params(), spec.path))
        np.testing.assert_allclose(loaded, want, rtol=0, atol=2 ** -23, err_msg=str(spec.path))
        assert (np.abs(loaded - value) <= 2 ** -11 * np.abs(value) + 2 ** -23).all()
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(CausalLM(cfg, rounded)(ids)),
                               rtol=0, atol=1e-5)


def test_f16_file_through_from_pretrained_matches_the_source_model(tmp_path):
    """The user path: from_pretrained on a folder holding one f16 .gguf (written by the gguf
    package): the f16-rounded model, its tokenizer, special tokens and chat template."""
    cfg = _tiny_config("gemma3")
    cfg = dataclasses.replace(cfg, vocab_size=len(TOKENS))
    params = random_params(cfg, seed=3)
    write_gguf(tmp_path / "model-f16.gguf", cfg, params, qtype="F16")
    model, tokenizer = FastLanguageModel.from_pretrained(tmp_path, dtype="float32")
    _assert_f16_rounding(cfg, params, model, jnp.asarray([[0, 5, 9, 3, 17, 33, 2]]))
    assert tokenizer("ab a").input_ids == [TOKENS.index("ab"), TOKENS.index("Ġ"),
                                           TOKENS.index("a")]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         tokenize=False) == "hi</s>"


def _same_math(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal forward math: GGUF stores rms_norm_eps as float32, which is all the norm uses."""
    eps = float(np.float32(a.rms_norm_eps))
    return _math(dataclasses.replace(a, rms_norm_eps=eps)) == _math(
        dataclasses.replace(b, rms_norm_eps=float(np.float32(b.rms_norm_eps))))


@pytest.mark.slow  # ~10 s per family here: SmolLM2's 49152-token vocabulary out and back in
@pytest.mark.parametrize("name", ["llama", "gemma3", "phi3"])  # q/k order, 1 + w norms, fused
def test_our_f16_export_reimports_as_the_source_model(tmp_path, smollm2_dir, name):
    """save_pretrained_gguf(f16) -> from_pretrained gives the f16-rounded source model and its
    config, tokenizer and chat template back (SmolLM2's tokenizer on a tiny model per family)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    cfg = dataclasses.replace(_tiny_config(name), vocab_size=len(tokenizer))
    params = random_params(cfg, seed=5)
    source = CausalLM(cfg, params)
    path = source.save_pretrained_gguf(str(tmp_path / "out"), tokenizer, quantization_method="f16",
                                       show_progress=False)
    model, tok = FastLanguageModel.from_pretrained(path, dtype="float32")
    assert _same_math(model.config, cfg)
    _assert_f16_rounding(cfg, params, model,
                         jnp.asarray([tokenizer("Hello world, this is a test")["input_ids"]]))
    for text in ("Hello world", "  two  spaces\n", "日本語 🤗", "<|im_start|>user\nhi<|im_end|>"):
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template


GGUF_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_quantized_tensors_dequantize_as_the_gguf_package_does(tmp_path, qtype):
    """Each block type the gguf package writes loads as its own dequantization of the blocks
    (in row chunks for the embedding: chunk_bytes forces several), and near the source."""
    import gguf

    cfg = config_from_hf(dict(TINY_LLAMA, hidden_size=64, intermediate_size=96,
                                          vocab_size=40))
    params = random_params(cfg)
    _, loaded = _load(write_gguf(tmp_path / "m.gguf", cfg, params, qtype=qtype),
                      chunk_bytes=64 * 4 * 7)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, array in gguf_tensors(cfg, params).items():
        if array.ndim < 2 or name.split(".")[-2] in ("attn_q", "attn_k"):
            continue  # 1-D tensors stay F32; q/k rows are permuted back (checked in F32 above)
        want = gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)
        path = {"token_embd.weight": ("embed_tokens", "weight"),
                "output.weight": ("lm_head", "weight")}.get(name)
        if path is None:
            continue
        np.testing.assert_array_equal(np.asarray(get_path(loaded, path)), want)
    q = np.asarray(loaded["layers"]["self_attn"]["q_proj"]["weight"])
    tolerance = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}.get(qtype, 0.2)
    assert np.abs(q - params["layers"]["self_attn"]["q_proj"]["weight"]).max() <= tolerance


# byte offsets of the fp16 d (and dmin) in each K-quant block (ggml-common.h)
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                   "Q6_K": (208,)}


@pytest.mark.parametrize("qtype", sorted(K_SCALE_OFFSETS))
def test_k_quant_blocks_load_row_by_row(tmp_path, qtype):
    """K-quant blocks (256 weights) read in row chunks equal the whole tensor's dequantization
    by the gguf package (their values against an independent decoder: the Gemma 3 parity test)."""
    import gguf

    cfg = config_from_hf(dict(TINY_LLAMA, hidden_size=256, intermediate_size=256,
                                          vocab_size=24, num_attention_heads=2,
                                          num_key_value_heads=1, num_hidden_layers=1))
    params = random_params(cfg)
    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (cfg.vocab_size, size), dtype=np.uint8)
    scale = np.full((cfg.vocab_size,), 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    for offset in K_SCALE_OFFSETS[qtype]:  # finite fp16 super-block scales, random codes
        blocks[:, offset:offset + 2] = scale
    tensors = gguf_tensors(cfg, params)
    del tensors["token_embd.weight"]
    path = write_gguf(tmp_path / "m.gguf", cfg, params, tensors=tensors,
                      raw={"token_embd.weight": (blocks, qtype)})
    _, loaded = _load(path, chunk_bytes=256 * 4 * 5)
    want = gguf.quants.dequantize(blocks, kind)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(np.asarray(loaded["embed_tokens"]["weight"]), want)


@pytest.mark.parametrize("variant", ["llama3.1", "llama3.2"])
def test_llama3_rope_is_recovered_from_rope_freqs(tmp_path, variant):
    factor = 8.0 if variant == "llama3.1" else 32.0
    hf = dict(TINY_LLAMA, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
              rope_theta=500000.0, max_position_embeddings=131072,
              rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg = config_from_hf(hf)
    config, _ = _load(write_gguf(tmp_path / "m.gguf", cfg, random_params(cfg)))
    assert config.rope == cfg.rope


def test_folder_and_file_resolution(tmp_path):
    cfg = _tiny_config("llama")
    file = write_gguf(tmp_path / "a.gguf", cfg, random_params(cfg), tokenizer=False)
    assert find_gguf(file) == file and find_gguf(tmp_path) == file
    assert find_gguf(tmp_path, "a.gguf") == file
    (tmp_path / "b.gguf").write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match="several GGUF files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None  # a folder with config.json is an HF checkpoint
    with pytest.raises(CheckpointError, match="gguf_file='c.gguf' is not a file"):
        find_gguf(tmp_path, "c.gguf")


# ----------------------------------------------------------------------------------------------
# Bad input: one FastLoRAError naming the file, nothing loaded

def _good(tmp_path, **kw):
    cfg = _tiny_config("llama")
    return write_gguf(tmp_path / "m.gguf", cfg, random_params(cfg), **kw), cfg


def _error(path) -> str:
    with pytest.raises(FastLoRAError) as info:
        FastLanguageModel.from_pretrained(path, dtype="float32")
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_non_gguf_empty_and_truncated_files(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is a text file")
    assert "is not a GGUF file" in _error(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "is not a GGUF file" in _error(empty)
    good, _ = _good(tmp_path)
    data = good.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 8):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        assert "truncated or corrupt" in _error(truncated), cut


def test_unknown_and_unsupported_tensor_types(tmp_path):
    import gguf

    good, _ = _good(tmp_path)
    reader = gguf.GGUFReader(good)
    info = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    type_offset = info.field.offset + sum(int(p.nbytes) for p in info.field.parts[:-2])
    data = bytearray(good.read_bytes())
    assert int.from_bytes(data[type_offset:type_offset + 4], "little") == 0  # F32
    data[type_offset:type_offset + 4] = (99).to_bytes(4, "little")
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(bytes(data))
    assert "unknown GGML type" in _error(unknown)
    cfg = _tiny_config("llama")
    params = random_params(cfg)
    tensors = gguf_tensors(cfg, params)
    del tensors["blk.0.attn_v.weight"]
    iq = (tmp_path / "iq")
    iq.mkdir()
    path = write_gguf(iq / "m.gguf", cfg, params, tensors=tensors,
                      raw={"blk.0.attn_v.weight": (np.zeros((16, 36 * 4), np.uint8), "IQ4_NL")})
    message = _error(path)
    assert "'blk.0.attn_v.weight' is stored as IQ4_NL" in message and "Q4_K" in message


def test_unsupported_arch_and_unknown_keys(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    path, _ = _good(tmp_path / "a", arch="mamba")
    message = _error(path)
    assert "architecture 'mamba' is not supported" in message and "'qwen3'" in message
    path, _ = _good(tmp_path / "b", extra_kv={"llama.expert_count": 8})
    assert "'llama.expert_count' (= 8) is not understood" in _error(path)
    path, _ = _good(tmp_path / "c", extra_kv={"llama.rope.scaling.type": "yarn"})
    assert "'yarn'" in _error(path)


def test_missing_extra_and_misshapen_tensors(tmp_path):
    cfg = _tiny_config("llama")
    params = random_params(cfg)
    for case in ("missing", "extra", "shape"):
        tensors = gguf_tensors(cfg, params)
        if case == "missing":
            del tensors["blk.1.ffn_up.weight"]
        elif case == "extra":
            tensors["blk.0.ffn_gate_exps.weight"] = np.zeros((2, 4), np.float32)
        else:
            tensors["blk.0.ffn_up.weight"] = tensors["blk.0.ffn_up.weight"][:, :8]
        (tmp_path / case).mkdir()
        message = _error(write_gguf(tmp_path / case / "m.gguf", cfg, params, tensors=tensors))
        assert {"missing": "lacks tensors the model needs: ['blk.1.ffn_up.weight']",
                "extra": "['blk.0.ffn_gate_exps.weight'] are not parameters",
                "shape": "'blk.0.ffn_up.weight' has shape [40, 8], expected [40, 32]"}[case] \
            in message, message


def test_file_without_tokenizer_metadata_is_refused_by_name(tmp_path):
    path, _ = _good(tmp_path, tokenizer=False)
    assert "has no tokenizer" in _error(path)


def test_errors_are_the_documented_classes(tmp_path):
    path, _ = _good(tmp_path, arch="mamba")
    with pytest.raises(ConfigError):
        read_gguf_config(GGUFFile(path))


@pytest.mark.parametrize("kind", ["load_in_4bit", "load_in_8bit"])
def test_quantize_on_load_from_gguf_equals_from_safetensors(tmp_path, kind):
    """load_in_4bit / 8bit quantize GGUF weights exactly as they quantize the same weights from
    safetensors (both loaders quantize through quant.quantize)."""
    from fastlora_jax.converters.merged import hf_state_dict
    from tests.checkpoints import write_checkpoint

    cfg = config_from_hf(dict(TINY_LLAMA, hidden_size=64, intermediate_size=128,
                                          vocab_size=len(TOKENS)))
    params = random_params(cfg, seed=9)
    write_gguf(tmp_path / "m.gguf", cfg, params)
    write_checkpoint(tmp_path / "hf", dict(TINY_LLAMA, hidden_size=64, intermediate_size=128,
                                           vocab_size=len(TOKENS)),
                     hf_state_dict(cfg, params, np.float32))
    from_gguf, _ = FastLanguageModel.from_pretrained(tmp_path / "m.gguf", dtype="float32",
                                                     **{kind: True})
    from_hf, _ = FastLanguageModel.from_pretrained(tmp_path / "hf", dtype="float32",
                                                   **{kind: True})
    ids = jnp.asarray([[1, 7, 3, 9, 2]])
    np.testing.assert_array_equal(np.asarray(from_gguf(ids)), np.asarray(from_hf(ids)))
    assert type(from_gguf.params()["layers"]["mlp"]["up_proj"]["weight"]).__name__ == "QTensor"


def test_sliding_window_pattern_as_a_period(tmp_path):
    """llama.cpp also writes the Gemma window pattern as a period n (layer i global when
    i % n == n - 1) instead of one flag per layer."""
    cfg = dataclasses.replace(_tiny_config("gemma3"), num_layers=6,
                              layer_types=("sliding_attention",) * 2 + ("full_attention",)
                              + ("sliding_attention",) * 2 + ("full_attention",))
    path = write_gguf(tmp_path / "m.gguf", cfg, random_params(cfg), tokenizer=False,
                      extra_kv={"gemma3.attention.sliding_window_pattern": 3})
    assert read_gguf_config(GGUFFile(path)).layer_types == cfg.layer_types


def test_a_lora_adapter_gguf_is_not_a_model(tmp_path):
    path, _ = _good(tmp_path, extra_kv={"general.type": "adapter"})
    assert "is a GGUF LoRA adapter" in _error(path)
