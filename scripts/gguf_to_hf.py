"""Shared step of the build scripts: a GGUF file -> a float32 Hugging Face checkpoint folder.

Runs in the reference environment. transformers dequantizes the GGUF into float32 weights; it
refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt from its config (without
`quantization_config`) and given the loaded state dict. The folder is written under a temporary
name and renamed when complete, with the tokenizer and its chat template.
"""

import pathlib
import shutil
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def save_hf_from_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Load `gguf` with transformers and write the HF checkpoint to `out` atomically."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        sys.exit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}")
