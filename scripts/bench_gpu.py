"""lorakit vs PEFT, one process, back to back: tokens/s, peak memory, MFU; largest batch in 80 GiB.

GPU (default when CUDA is there): random-weight models from the public Qwen2.5-0.5B and Llama-3.2-1B
configs (below, no hub), bf16, SDPA attention, batch 8 × 1024 random tokens, r = 16 / alpha 32 /
dropout 0 on all seven projections (VeRA: r = 256 on q_proj, v_proj), AdamW lr 1e-4, no weight
decay, gradient clipping 1.0. lorakit runs its own training step (``Trainer.optimizer_step``: the
trainer's loss under bf16 autocast, the method's parameter groups and hooks, fused AdamW; paged AdamW
for QLoRA); PEFT 0.x runs a plain PyTorch loop (bf16 model, no autocast, torch AdamW, PEFT defaults:
fp32 adapter weights). QLoRA: both over the same NF4 (double-quant, bf16 compute) base, quantized here
with bitsandbytes; PEFT's model is not passed through ``prepare_model_for_kbit_training`` (it would
cast the whole model to fp32).
CPU (``--device cpu``): the real SmolLM2-135M-Instruct (``lorakit.models.load_model``), batch 2 × 128;
lorakit at its default ``train.precision`` (auto: fp32 on CPU; ``--lever-runs smollm2:lora:precision=bf16``
for the opt-in bf16 path), PEFT in fp32 (its default; ``peft-lora [autocast bf16]`` loads the base in bf16).

FLOPs per token (MFU column): 4·N_frozen (forward 2·N plus input gradients 2·N; frozen weights get no
weight gradient; N counts every frozen matmul weight incl. the LM head) + attention 3·(2·T·d_q·L)
(causal QKᵀ and PV forward, backward counted as 2× forward); adapter matmuls are not counted.
MFU = FLOPs/s over the bf16 GEMM rate measured on the device in the same run (8192³).

Usage: python scripts/bench_gpu.py [--device cuda|cpu] [--shapes ...] [--methods ...] [--variants default eager compile]
       [--steps N] [--no-levers] [--no-max-batch] [--no-track] [--out results.json]
       python scripts/bench_gpu.py --plot results.json out.png | --merge a.json b.json --out c.json
       python scripts/bench_gpu.py --profile qwen2.5-0.5b:lora ... (torch.profiler: wall vs GPU kernel time)
Models and setups: scripts/bench_setup.py; largest batch, tracking, profiles, real lengths: scripts/bench_extras.py.
Results and the levers measured: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_extras import (dora_selfcheck, gemm_tflops, max_batch, memory_history, parse_spec,  # noqa: E402
                          profile_steps, real_lengths, track_losses)
from bench_setup import (LORAKIT, PAIR, PAIR_AUTOCAST, SHAPES, free, lorakit_setup, peft_setup,  # noqa: E402
                         run_one, vocab_of)

# ---- table and plot ------------------------------------------------------------------------------
def table(rows, peak_tflops=None) -> str:
    by = {(r["shape"], r["method"]): r for r in rows if "tokens_per_s" in r}
    head = ("| shape | method | tokens/s | peak GiB | MFU % | × PEFT speed | PEFT mem ratio | × PEFT+autocast "
            "| × own LoRA |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['shape']} | {r['method']} | failed: {r.get('error', '?')[:60]} | | | | | | |")
            continue
        base, _, variant = r["method"].partition(" [")
        ref = by.get((r["shape"], PAIR.get(r["method"]) or PAIR.get(base, "")))
        ac = by.get((r["shape"], PAIR_AUTOCAST.get(base, "")))
        own = by.get((r["shape"], "lora [" + variant)) if variant in ("eager]", "compile]", "cudagraphs]") else by.get((r["shape"], "lora"))
        mfu = f"{100 * r['tflops'] / peak_tflops:.1f}" if peak_tflops else f"{r['tflops'] * 1e3:.0f} GF/s"
        x = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else ""
        mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}" if ref and ref["peak_gib"] > 0 else ""
        xa = f"{r['tokens_per_s'] / ac['tokens_per_s']:.2f}" if ac and not r["method"].startswith("peft") else ""
        lo = f"{r['tokens_per_s'] / own['tokens_per_s']:.2f}" if own and not r["method"].startswith(("peft", "unsloth")) else ""
        lines.append(f"| {r['shape']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {mfu} | {x} "
                     f"| {mem} | {xa} | {lo} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Grouped bars per method and shape: PEFT, PEFT with bf16 autocast, lorakit with train.compile false,
    lorakit by default (the bars a run has; methods without a lorakit row are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r["shape"], r["method"]): r for r in results["rows"] if "tokens_per_s" in r}
    shapes = list(dict.fromkeys(s for s, _ in rows))
    bars = (("PEFT", lambda m: PAIR.get(m), "tab:gray"), ("PEFT, bf16 autocast", lambda m: PAIR_AUTOCAST.get(m), "silver"),
            ("lorakit, eager", lambda m: m + " [eager]", "tab:blue"), ("lorakit (default)", lambda m: m, "navy"))
    methods = [m for m in LORAKIT if any((s, m) in rows for s in shapes)]
    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 3.8 * len(shapes)), squeeze=False)
    width = 0.8 / len(bars)
    for i, shape in enumerate(shapes):
        for j, (key, title) in enumerate((("tokens_per_s", "tokens/s"), ("peak_gib", "peak GPU memory (GiB)"))):
            ax = axes[i][j]
            for k, (label, name, color) in enumerate(bars):
                xs, ys = [], []
                for x, m in enumerate(methods):
                    r = rows.get((shape, name(m) or ""))
                    if r:
                        xs.append(x + (k - (len(bars) - 1) / 2) * width)
                        ys.append(r[key])
                if xs:
                    ax.bar(xs, ys, width=width, color=color, label=label)
            ax.set_xticks(range(len(methods)), methods)
            ax.set_title(f"{shape}: {title}")
            ax.legend(fontsize=8)
    note = results.get("note") or f"batch {results['batch']}x{results['seq']}"
    fig.suptitle(f"{results['device']}, {note}, bf16, r=16 on all seven projections")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- main -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_fused_adapters():
    """Measure the addmm / DoraScale lever: the layers take their plain path."""
    import lorakit.methods.dora as dora
    import lorakit.methods.lora as lora

    saved = lora.can_fuse, dora.can_fuse
    lora.can_fuse = dora.can_fuse = lambda *a: False
    try:
        yield
    finally:
        lora.can_fuse, dora.can_fuse = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*")
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--no-levers", action="store_true")
    ap.add_argument("--no-max-batch", action="store_true")
    ap.add_argument("--no-track", action="store_true")
    ap.add_argument("--variants", nargs="*", default=["default"], choices=["default", "eager", "compile", "cudagraphs"],
                    help="lorakit runs: the recipe default (train.compile: auto), train.compile: false / true")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; optional parts are skipped past it")
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--profile", nargs="*", metavar="SHAPE:METHOD", help="profile these and exit")
    ap.add_argument("--lever-runs", nargs="*", metavar="SHAPE:METHOD:KEY=VALUE,...",
                    help="extra lorakit runs with train (and method.) overrides, e.g. "
                         "qwen2.5-0.5b:lora:compile=true or qwen2.5-0.5b:lora_fa:method.lora_dropout=0.05")
    ap.add_argument("--real", nargs="*", metavar="SHAPE:SOURCE[:STEPS]",
                    help="real-length data (scripts/real_lengths.json: chatterbot, bbc-news-text): lorakit packed "
                         "vs PEFT padded, real tokens/s and losses on the same examples")
    ap.add_argument("--max-batch", nargs="*", metavar="SHAPE:METHOD[:KEY=VALUE,...]",
                    help="largest batch of --seq tokens per row under --cap-gib (lorakit methods or peft-*)")
    ap.add_argument("--cap-gib", type=float, default=80.0)
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the rows of several runs into --out")
    args = ap.parse_args()
    if args.plot:
        return plot(json.load(open(args.plot[0])), args.plot[1])
    if args.merge:
        merged = json.load(open(args.merge[0]))
        for extra in args.merge[1:]:
            merged["rows"] += json.load(open(extra))["rows"]
        json.dump(merged, open(args.out, "w"), indent=1)
        return print(table(merged["rows"], merged.get("gemm_tflops")))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if cuda else 2)
    args.seq = args.seq or (1024 if cuda else 128)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.steps = args.steps or (8 if cuda else 3)
    start = time.perf_counter()
    import peft
    import transformers

    from lorakit.fast.kernels import liger_kernels_available

    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "peft": peft.__version__,
               "liger": liger_kernels_available(), "batch": args.batch, "seq": args.seq,
               "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(), "rows": []}
    if cuda:
        results["gemm_tflops"] = gemm_tflops(device)
        print(f"bf16 GEMM 8192^3: {results['gemm_tflops']:.0f} TFLOP/s", flush=True)
        results["dora_selfcheck"] = dora_selfcheck(device)
        print(f"DoraScale self-check: {results['dora_selfcheck']}", flush=True)
    rows = results["rows"]
    if any(x is not None for x in (args.profile, args.lever_runs, args.real, args.max_batch)):
        out_dir = os.path.dirname(os.path.abspath(args.out))
        for spec in args.profile or []:
            shape, name = spec.split(":")
            vocab = vocab_of(shape)
            fn = peft_setup if name.startswith("peft") else lorakit_setup
            try:
                profile_steps(args, shape, name, lambda b: fn(shape, name, device, b), device, vocab, out_dir)
            except Exception:
                traceback.print_exc()
                free()
        for spec in args.lever_runs or []:
            shape, name, setup, fields, opts = parse_spec(spec, device)
            t0 = time.perf_counter()
            try:
                if opts.get("snapshot"):
                    row = memory_history(args, shape, f"{name} {fields}", setup, device, vocab_of(shape), out_dir)
                else:
                    row = run_one(args, shape, f"{name} {fields}" if fields else name, setup, device, vocab_of(shape))
            except Exception as err:
                traceback.print_exc()
                row = {"shape": shape, "method": f"{name} {fields}", "error": f"{type(err).__name__}: {err}"}
                free()
            row["total_s"] = time.perf_counter() - t0
            with contextlib.suppress(Exception):
                from torch._dynamo.utils import counters

                row["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break")}
                counters.clear()
            rows.append(row)
            print(json.dumps(row), flush=True)
            json.dump(results, open(args.out, "w"), indent=1)
        for spec in args.real or []:
            shape, source, steps = (spec.split(":") + ["8"])[:3]
            try:
                results.setdefault("real", []).extend(real_lengths(args, shape, source, int(steps), device))
            except Exception as err:
                traceback.print_exc()
                results.setdefault("real", []).append({"shape": shape, "source": source, "error": f"{type(err).__name__}: {err}"})
                free()
            json.dump(results, open(args.out, "w"), indent=1)
        for spec in args.max_batch or []:
            shape, name, setup, fields, _ = parse_spec(spec, device)
            label = f"{name} {fields}" if fields else name
            try:
                found = max_batch(args, shape, setup, device, vocab_of(shape), cap_gib=args.cap_gib)
            except Exception as err:
                traceback.print_exc()
                found = f"{type(err).__name__}: {err}"
                free()
            results.setdefault("max_batch", []).append({"shape": shape, "method": label, "tokens": found,
                                                        "cap_gib": args.cap_gib})
            print(f"max batch in {args.cap_gib} GiB, {shape} {label}: {found} tokens", flush=True)
            json.dump(results, open(args.out, "w"), indent=1)
        json.dump(results, open(args.out, "w"), indent=1)
        print(table(rows, results.get("gemm_tflops")))
        for r in results.get("real", []):
            print("REAL", json.dumps({k: v for k, v in r.items() if k != "losses"}))
        return

    def record(shape, label, setup, ctx=contextlib.nullcontext):
        vocab = vocab_of(shape)
        try:
            with ctx():
                row = run_one(args, shape, label, setup, device, vocab)
        except Exception as err:  # keep going: one failure must not lose the run
            traceback.print_exc()
            row = {"shape": shape, "method": label, "error": f"{type(err).__name__}: {err}"}
            free()
        rows.append(row)
        print(json.dumps(row), flush=True)
        json.dump(results, open(args.out, "w"), indent=1)

    shapes = args.shapes or (["qwen2.5-0.5b", "llama-3.2-1b"] if cuda else ["smollm2"])
    order = ["lora", "peft-lora", "peft-lora+autocast", "dora", "peft-dora", "qlora", "peft-qlora",
             "peft-qlora+autocast", "vera", "peft-vera",
             "lora_fa", "dylora", "delta_lora", "lora_drop"]
    methods = [m for m in order if m in (args.methods or order)]
    for shape in shapes:
        for variant in args.variants:  # default: the recipe default; eager / compile: train.compile false / true
            train = {"eager": {"compile": False}, "compile": {"compile": True}, "cudagraphs": {"compile": "cudagraphs"}}.get(variant)
            suffix = f" [{variant}]" if train else ""
            for name in methods:
                if name.startswith("peft"):
                    if variant == args.variants[0]:
                        record(shape, name, lambda b, s=shape, n=name: peft_setup(s, n, device, b))
                    continue
                record(shape, name + suffix, lambda b, s=shape, n=name, t=train: lorakit_setup(s, n, device, b, train=t))
    shape = shapes[0]
    vocab = vocab_of(shape)
    levers = [
        ("lora [cross_entropy=full]", dict(train={"cross_entropy": "full"})),
        ("lora [cross_entropy=chunked]", dict(train={"cross_entropy": "chunked"})),
        ("lora [kernels=none]", dict(train={"kernels": "none"})),
        ("lora [no addmm]", dict(ctx=no_fused_adapters)),
        ("dora [no DoraScale/addmm]", dict(ctx=no_fused_adapters, name="dora")),
        ("lora [gradient_checkpointing]", dict(grad_ckpt=True)),
        ("lora [dropout 0.05]", dict(method={"lora_dropout": 0.05})),
        ("peft-lora [dropout 0.05]", dict(peft={"dropout": 0.05})),
        ("peft-lora [autocast bf16]", dict(peft={"autocast": True})),
        ("qlora [optimizer=adamw]", dict(name="qlora", train={"optimizer": "adamw"})),
    ]
    for label, opt in ([] if args.no_levers else levers):
        if time.perf_counter() - start > args.budget:
            print(f"budget reached: skipping {label}")
            continue
        if "peft" in opt:
            setup = lambda b, o=opt: peft_setup(shape, "peft-lora", device, b, **o["peft"])
        else:
            setup = lambda b, o=opt: lorakit_setup(shape, o.get("name", "lora"), device, b, train=o.get("train"),
                                                   method=o.get("method"), grad_ckpt=o.get("grad_ckpt", False))
        record(shape, label, setup, opt.get("ctx", contextlib.nullcontext))
    if not args.no_track and time.perf_counter() - start < args.budget:
        fast, ref = track_losses(args, shape, device, vocab)
        rel = max(abs(a - b) / abs(b) for a, b in zip(fast, ref))
        results["track"] = {"shape": shape, "fast": fast, "reference": ref, "max_rel_diff": rel}
        print(f"loss tracking over {len(fast)} steps: max relative difference {rel:.2e} "
              f"(first {ref[0]:.4f}, last fast {fast[-1]:.4f} / ref {ref[-1]:.4f})", flush=True)
    big = shapes[-1]
    if cuda and not args.no_max_batch:
        results["max_batch_tokens"] = {"shape": big}
        vocab = SHAPES[big]["vocab_size"]
        for label, setup in (("lora", lambda b: lorakit_setup(big, "lora", device, b, train={"compile": False})),
                             ("peft-lora", lambda b: peft_setup(big, "peft-lora", device, b))):
            if time.perf_counter() - start > args.budget:
                print(f"budget reached: skipping max batch of {label}")
                continue
            try:
                results["max_batch_tokens"][label] = max_batch(args, big, setup, device, vocab)
            except Exception as err:
                traceback.print_exc()
                results["max_batch_tokens"][label] = f"{type(err).__name__}: {err}"
            print(f"max batch in 80 GiB, {label}: {results['max_batch_tokens'][label]} tokens", flush=True)
    results["wall_s"] = time.perf_counter() - start
    json.dump(results, open(args.out, "w"), indent=1)
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"peft {results['peft']}, liger {results['liger']}, batch {args.batch}x{args.seq}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(table(rows, results.get("gemm_tflops")))


if __name__ == "__main__":
    main()
