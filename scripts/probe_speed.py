"""GPU probes behind docs/benchmarks.md's follow-up table: compile granularity, CUDA graphs, the
padding mask and host syncs of lorakit's training step, and bf16 vs row-wise FP8 GEMM rates.

python scripts/probe_speed.py [--gemm] [--shapes SHAPE ...] [--variants METHOD:VARIANT[+nomask][+nosync] ...]

VARIANT: eager | layers (train.compile) | layers-ro (each layer compiled with CUDA graphs) | backbone |
backbone-ro (one compile of the whole backbone) | peft (PEFT's LoRA/DoRA in bench_gpu's plain loop).
+nomask drops the attention mask; +nosync stubs out ``Tensor.item`` (an upper bound: the step without
its host syncs; losses then read 0). Prints one STEP line per run; profiles go to $OUT (or /tmp).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import bench_setup as bg


def bench(fn, n=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def quant_rows(x):
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / 448.0
    return (x / scale).to(torch.float8_e4m3fn), scale


def gemm_probe():
    dev = torch.device("cuda")
    shapes = {"qwen": [(896, 896), (896, 128), (896, 4864), (4864, 896), (896, 151936)],
              "llama": [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (2048, 128256)]}
    M = 8192
    for name, ss in shapes.items():
        for K, N in ss:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K**0.5
            t_bf = bench(lambda: x @ w.t())
            w8, ws = quant_rows(w)
            x8, xs = quant_rows(x)
            try:
                f = lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)
                t_8 = bench(f)
                y = f()
                ref = x.float() @ w.float().t()
                err = float((y.float() - ref).norm() / ref.norm())
                errbf = float(((x @ w.t()).float() - ref).norm() / ref.norm())
            except Exception as e:
                t_8, err, errbf = float("nan"), str(e)[:80], 0
            qc = torch.compile(quant_rows)
            t_q = bench(lambda: qc(x))
            fl = 2 * M * K * N
            print(f"GEMM {name} M={M} K={K} N={N}: bf16 {t_bf*1e3:.3f} ms ({fl/t_bf/1e12:.0f} TF/s) | fp8 rowwise "
                  f"{t_8*1e3:.3f} ms ({fl/t_8/1e12:.0f} TF/s) | quant x (compiled) {t_q*1e3:.3f} ms | rel err fp8 {err} bf16 {errbf:.2e}",
                  flush=True)


def step_probe(shape, spec, steps=10):
    """spec: METHOD:VARIANT[+nomask][+nosync]; VARIANT eager | layers | layers-ro | backbone | backbone-ro | peft"""
    dev = torch.device("cuda")
    vocab = bg.SHAPES[shape]["vocab_size"]
    batch = bg.random_batch(vocab, 8, 1024)
    method, _, variant = spec.partition(":")
    flags = set(variant.split("+")[1:])
    variant = variant.split("+")[0]
    if "nomask" in flags:
        del batch["attention_mask"]
    train = {}
    if variant == "layers":
        train = {"compile": True}
    if variant.startswith("backbone") or variant == "layers-ro":
        train = {"kernels": "none"}
    if variant == "peft":
        model, step, levers = bg.peft_setup(shape, "peft-" + method, dev, batch)
    else:
        model, step, levers = bg.lorakit_setup(shape, method, dev, batch, train=train)
    ro = variant.endswith("-ro")
    if variant.startswith("backbone"):
        model.model.compile(mode="reduce-overhead" if ro else None, dynamic=False)
    if variant == "layers-ro":
        for layer in model.model.layers:
            layer.compile(mode="reduce-overhead", dynamic=False)
    inner = step
    if "nosync" in flags:
        trainer_step = step

        def inner(b):  # the same work without the host syncs (loss / grad-norm .item())
            orig = torch.Tensor.item
            torch.Tensor.item = lambda self: 0.0
            try:
                return trainer_step(b)
            finally:
                torch.Tensor.item = orig

    def one():
        if ro:
            torch.compiler.cudagraph_mark_step_begin()
        return inner(batch)

    t0 = time.perf_counter()
    for _ in range(4):
        one()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t = bench(one, n=steps, warm=0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            one()
        torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.device_time for e in kern) / 2 / 1e3
    print(f"STEP {shape} {spec}: {t*1e3:.1f} ms/step, {8192/t:,.0f} tok/s, GPU kernels {gpu:.1f} ms/step "
          f"({len(kern)//2} kernels), peak {peak:.2f} GiB, warmup {warm:.1f} s, loss {one():.4f}", flush=True)
    top = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, f"prof-{shape}-{spec.replace(':', '-').replace('+', '-')}.txt"), "w") as f:
        f.write(top)
    del model, step
    bg.free()
    torch._dynamo.reset()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["qwen2.5-0.5b", "llama-3.2-1b"])
    ap.add_argument("--variants", nargs="*", default=["lora:eager", "lora:layers"])
    ap.add_argument("--gemm", action="store_true")
    a = ap.parse_args()
    if a.gemm:
        gemm_probe()
    for s in a.shapes:
        for v in a.variants:
            try:
                step_probe(s, v)
            except Exception:
                traceback.print_exc()
                bg.free()
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
