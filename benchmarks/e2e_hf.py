"""The baseline users pick today: HF transformers + PEFT (+ bitsandbytes NF4), one training run.

Run by `benchmarks/train_e2e.py` in its own process (a clean CUDA context and peak-memory count);
prints one JSON object as its last line. Llama-3-8B shapes with random weights created on the
GPU (bf16; with --quant nf4 every decoder projection becomes a bitsandbytes Linear4bit, NF4 with
double quantization and bf16 compute, as `BitsAndBytesConfig(load_in_4bit=True, ...)` builds it),
LoRA on all seven projections through PEFT, SDPA attention, non-reentrant gradient checkpointing,
torch AdamW on the LoRA parameters with gradient clipping at 1.0; the loss is transformers' own
(labels = input ids). Norms and embeddings stay bf16 (no `prepare_model_for_kbit_training`
upcast, which would only slow this side down).

  python3 benchmarks/e2e_hf.py --quant nf4 --micro-batch 2 --accumulation 4 --seq 2048 --steps 20
  python3 benchmarks/e2e_hf.py --quant nf4 --max-context 32768,65536,98304   # first OOM stops it
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import common  # a sibling (standard library only): benchmarks/ is on the path when this runs
DEVICE = "cuda"  # --device cpu runs the same code on a tiny --config (the CPU smoke test)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def base_model(config: dict, quant: str) -> torch.nn.Module:
    """LlamaForCausalLM with random bf16 weights on DEVICE; with quant "nf4" every decoder
    projection a bitsandbytes Linear4bit (NF4, double quantization, bf16 compute). Also the
    baseline of benchmarks/generate.py's presets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    if quant == "nf4":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, mod in list(parent.named_children()):
                    if not isinstance(mod, torch.nn.Linear):
                        continue
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4"
                                                 ).to(DEVICE)
                    setattr(parent, name, q)
                    del mod
        model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT reads it
        reset_peak()
    return model


def build(config: dict, quant: str, rank: int, alpha: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = base_model(config, quant)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                             target_modules=list(common.LORA_TARGETS),
                                             task_type="CAUSAL_LM"))
    model.train()
    return model


def train(model: torch.nn.Module, *, micro_batch: int, accumulation: int, seq: int, steps: int,
          warmup: int, vocab: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, vocab, (accumulation, micro_batch, seq), device=DEVICE, generator=gen)
    sync()
    reset_peak()
    times, losses = [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        total = torch.zeros((), device=DEVICE)
        for a in range(accumulation):
            loss = model(input_ids=ids[a], labels=ids[a]).loss / accumulation
            loss.backward()
            total += loss.detach()  # no host sync between micro-batches
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
        times.append(time.perf_counter() - start)
    step = statistics.median(times[warmup:])
    return {"step_s": step, "tokens_per_s": micro_batch * accumulation * seq / step,
            "peak_bytes": peak_bytes(), "first_step_s": times[0],
            "losses": losses, "lora_params": sum(p.numel() for p in params)}


def max_context(model: torch.nn.Module, lengths: list[int], vocab: int, budget_s: float) -> dict:
    """Train one step (batch 1) at each length in order; stop at the first OOM or the budget."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    fits, fails, tried = 0, None, []
    start = time.perf_counter()
    for seq in lengths:
        if time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        try:
            ids = torch.randint(0, vocab, (1, seq), device=DEVICE)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            fits = seq
            tried.append({"seq": seq, "ok": True, "s": time.perf_counter() - t0,
                          "peak_bytes": peak_bytes()})
        except torch.OutOfMemoryError:
            fails = seq
            tried.append({"seq": seq, "ok": False, "s": time.perf_counter() - t0})
            break
        finally:
            opt.zero_grad(set_to_none=True)
            ids = None
            reset_peak()
    return {"max_fits": fits, "first_oom": fails, "tried": tried}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-context", default="",
                        help="comma-separated lengths to try instead of the timed run")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--config", default="", help="JSON of an HF Llama config (default 8B)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    config = json.loads(args.config) if args.config else common.LLAMA3_8B
    t0 = time.perf_counter()
    model = build(config, args.quant, args.rank, args.alpha)
    result = {"name": f"hf_peft_{args.quant}", "setup_s": time.perf_counter() - t0,
              "lora_layer_types": sorted({f"{type(m).__module__}.{type(m).__name__}"
                                          for n, m in model.named_modules()
                                          if n.endswith(("q_proj", "down_proj"))})}
    import peft
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}
    if args.quant == "nf4":
        import bitsandbytes

        result["versions"]["bitsandbytes"] = bitsandbytes.__version__
    if args.max_context:
        lengths = [int(s) for s in args.max_context.split(",")]
        result.update(max_context(model, lengths, config["vocab_size"], args.budget_s))
    else:
        result.update(train(model, micro_batch=args.micro_batch, accumulation=args.accumulation,
                            seq=args.seq, steps=args.steps, warmup=args.warmup,
                            vocab=config["vocab_size"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
