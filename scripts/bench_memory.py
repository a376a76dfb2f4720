"""Memory of one training step (forward + backward), LoRA vs LoRA-FA, on a random-weight Llama.

The default shape is SmolLM2-135M's (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536,
vocabulary 49152, tied embeddings), built with ``LlamaForCausalLM(config)`` (random weights, no
download); adapters on all linear layers (``all-linear``), r = 16, batch 4 × 256 tokens, fp32 on CPU.

Measured per (method, lora_dropout), each in a fresh process:
  - saved MiB: the bytes autograd keeps for the backward pass — every tensor the forward saves
    (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage, parameters and buffers
    left out. This is the activation memory LoRA-FA is about.
  - step peak MiB: the step's peak above the memory held before it (weights, adapters): on CUDA from
    ``torch.cuda.max_memory_allocated``; on CPU from the resident set (``ru_maxrss`` minus the resident
    set before the step; allocator caching makes it coarser than the saved bytes).
Usage: ``python scripts/bench_memory.py [--device cuda] [--layers 30] [--dropout 0 0.05]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

MIB = 2**20


def measure(args: argparse.Namespace, method: str, dropout: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.config import recipe_from_dict
    from lorakit.methods import build_method

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    cfg = recipe_from_dict({"method": {"name": method, "r": args.r, "lora_alpha": 2 * args.r,
                                       "lora_dropout": dropout, "target_modules": "all-linear"}}).method
    adapter = build_method(cfg)
    adapter.attach(model, "causal_lm")
    model.to(device).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as statm:
            before = int(statm.read().split()[1]) * resource.getpagesize()
        high_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / MIB
    else:  # the step's resident-set peak above the set before it (needs the step to set a new high)
        high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = (high - before) / MIB if high > high_before else float("nan")
    return {"method": method, "dropout": dropout, "saved_mib": sum(saved.values()) / MIB, "peak_mib": peak,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "DROPOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one[0], float(args.one[1]))))
        return
    common = [f"--device={args.device}", f"--dtype={args.dtype}", f"--layers={args.layers}", f"--r={args.r}",
              f"--batch={args.batch}", f"--seq={args.seq}"]
    rows = []
    for dropout in args.dropout:
        for method in ("lora", "lora_fa"):
            out = subprocess.run([sys.executable, __file__, *common, "--one", method, str(dropout)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    peak_name = "step peak MiB (CUDA allocated)" if args.device.startswith("cuda") else "step peak MiB (CPU RSS)"
    print(f"Llama {args.layers} layers (SmolLM2-135M shape), all-linear, r={args.r}, batch {args.batch}x{args.seq}, "
          f"{args.dtype} on {args.device}")
    print(f"| method | lora_dropout | trainable | saved-activation MiB | {peak_name} | LoRA/method: saved | peak |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ref = next(r for r in rows if r["method"] == "lora" and r["dropout"] == row["dropout"])
        print(f"| {row['method']} | {row['dropout']} | {row['trainable']:,} | {row['saved_mib']:,.1f} | "
              f"{row['peak_mib']:,.1f} | {ref['saved_mib'] / row['saved_mib']:.2f}x | {ref['peak_mib'] / row['peak_mib']:.2f}x |")


if __name__ == "__main__":
    main()
