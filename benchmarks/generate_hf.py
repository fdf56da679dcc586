"""The HF side of benchmarks/generate.py's presets: transformers `generate` on a Llama config with
random weights made on the device (bf16, every decoder projection a bitsandbytes NF4 Linear4bit:
`e2e_hf.base_model`), greedy, EOS ignored.

Run by benchmarks/generate.py in its own process (torch and JAX do not share the GPU's memory
well); prints one JSON object as its last line: {prefill_<b>, decode_<b>} seconds (medians), the
versions, and the prompt / new-token counts. Prefill = one forward over the prompt with a cache;
decode = generate(max_new_tokens=min_new_tokens=new) minus that.

  python3 benchmarks/generate_hf.py --config JSON --batches 1,8,64 --prompt_len 128 \\
      --new_tokens 64 --repeats 2 [--device cpu] [--quant bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import e2e_hf  # a sibling: benchmarks/ is on the path when this runs


def timed(fn) -> float:
    e2e_hf.sync()
    t = time.perf_counter()
    fn()
    e2e_hf.sync()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON of an HF Llama config")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    e2e_hf.DEVICE = args.device
    config = json.loads(args.config)
    import transformers

    t0 = time.perf_counter()
    model = e2e_hf.base_model(config, args.quant).eval()
    model.generation_config.eos_token_id = None
    result = {"setup_s": time.perf_counter() - t0,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    if args.quant == "nf4":
        import bitsandbytes

        result["versions"]["bitsandbytes"] = bitsandbytes.__version__
    n = args.new_tokens
    gen = torch.Generator(device=args.device).manual_seed(0)
    for b in (int(s) for s in args.batches.split(",")):
        ids = torch.randint(0, config["vocab_size"], (b, args.prompt_len), device=args.device,
                            generator=gen)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        out = {}
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)       # warm-up
            pre = [timed(lambda: model(input_ids=ids, use_cache=True))
                   for _ in range(args.repeats)]
            tot = [timed(lambda: out.update(ids=model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, **kw))) for _ in range(args.repeats)]
        assert out["ids"].shape == (b, args.prompt_len + n), out["ids"].shape
        result[f"prefill_{b}"] = statistics.median(pre)
        result[f"decode_{b}"] = statistics.median(tot) - result[f"prefill_{b}"]
        print(f"HF batch {b}: prefill {result[f'prefill_{b}']:.3f}s decode "
              f"{result[f'decode_{b}']:.3f}s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
