"""Unsloth on the shapes of scripts/bench_gpu.py: tokens/s and peak memory, LoRA and QLoRA, its own settings.

Run in its own process (``import unsloth`` patches transformers, peft and trl globally), with Unsloth and
its needs on ``PYTHONPATH`` (docs/benchmarks.md: how the wheels travel). The random-weight model of each
shape (bench_gpu.SHAPES, bf16) is saved to a folder with a word-level stand-in tokenizer (no hub), then
loaded with ``FastLanguageModel.from_pretrained(folder, load_in_4bit=...)`` and wrapped with
``FastLanguageModel.get_peft_model`` at r 16 / alpha 32 / dropout 0 on the seven projections, as
bench_gpu.py's lorakit and PEFT rows. Unsloth's recommended settings (its README and notebooks):
``use_gradient_checkpointing="unsloth"`` (offloaded checkpointing) and the 8-bit AdamW of bitsandbytes;
``--no-gc`` runs without checkpointing, ``--adamw`` with torch's fused AdamW. Batch 8 × 1024 random
tokens (labels = inputs), lr 1e-4, no weight decay, clipping 1.0, 3 warm-up steps then ``--steps`` timed.

Usage: python scripts/bench_unsloth.py --shapes qwen2.5-0.5b llama-3.2-1b --methods lora qlora [--no-gc]
       [--batch 8] [--steps 8] [--max-batch] --out unsloth.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GIB = 2**30
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_folder(shape: str, root: str) -> str:
    """The random-weight bf16 model of ``shape`` and a stand-in tokenizer, saved once under ``root``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import bench_setup as bench_gpu

    folder = os.path.join(root, shape)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    model = bench_gpu.build_model(shape, torch.device("cuda"))
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(997)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=4096)
    fast.save_pretrained(folder)
    return folder


def run(shape: str, method: str, args) -> dict:
    import torch
    from unsloth import FastLanguageModel

    import bench_setup as bench_gpu

    folder = save_folder(shape, args.root)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, _tok = FastLanguageModel.from_pretrained(folder, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                    load_in_4bit=method == "qlora", local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, target_modules=SEVEN, bias="none",
        use_gradient_checkpointing=False if args.no_gc else "unsloth", random_state=3407)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.adamw:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.0)  # Unsloth's notebooks: optim="adamw_8bit"
    setup_s = time.perf_counter() - t0

    def step(b):
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def batch_of(n):
        b = bench_gpu.random_batch(bench_gpu.vocab_of(shape), n, args.seq)
        return {k: v.cuda() for k, v in b.items()}

    batch = batch_of(args.batch)
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step(batch) for _ in range(args.steps)]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    settings = ("no checkpointing" if args.no_gc else "unsloth checkpointing") + (", fused AdamW" if args.adamw else ", AdamW 8-bit")
    row = {"shape": shape, "method": f"unsloth-{method} [{settings}]", "tokens_per_s": args.steps * args.batch * args.seq / elapsed,
           "peak_gib": torch.cuda.max_memory_allocated() / GIB, "loss": float(losses[-1]), "setup_s": setup_s,
           "tflops": 0.0, "batch": args.batch}
    row["tflops"] = row["tokens_per_s"] * bench_gpu.flops_per_token(model, args.seq) / 1e12 if hasattr(model, "config") else 0.0
    if args.max_batch:
        lo, hi, b = 0, None, args.batch
        while hi is None and b <= 512:
            ok = fits(step, batch_of, b, params)
            lo, hi, b = (b, None, b * 2) if ok else (lo, b, b)
        hi = hi or 1024
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(step, batch_of, mid, params) else (lo, mid)
        row["max_batch_tokens"] = lo * args.seq
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def fits(step, batch_of, b, params) -> bool:
    import torch

    ok = True
    try:
        step(batch_of(b))
        torch.cuda.synchronize()
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if "out of memory" not in str(err).lower():
            raise
        ok = False
    for p in params:
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    print(f"    batch {b}: {'fits' if ok else 'OOM'}", flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"])
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--adamw", action="store_true")
    ap.add_argument("--max-batch", action="store_true")
    ap.add_argument("--root", default="/tmp/unsloth-models")
    ap.add_argument("--out", default="bench_unsloth.json")
    args = ap.parse_args()
    rows = []
    try:
        import unsloth

        version = unsloth.__version__
    except Exception as err:  # what stopped it, in one line, for the notes
        traceback.print_exc()
        json.dump({"error": f"import unsloth: {type(err).__name__}: {err}"}, open(args.out, "w"), indent=1)
        raise SystemExit(1)
    for shape in args.shapes:
        for method in args.methods:
            try:
                row = run(shape, method, args)
            except Exception as err:
                traceback.print_exc()
                row = {"shape": shape, "method": f"unsloth-{method}", "error": f"{type(err).__name__}: {err}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            json.dump({"unsloth": version, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
