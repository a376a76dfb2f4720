"""The extras of scripts/bench_gpu.py: largest batch, loss tracking against an fp32 reference, torch.profiler
runs, the DoRA self-check, the GEMM peak, lever specs, CUDA memory snapshots, real-length data."""

from __future__ import annotations

import json
import os
import time

import torch

from bench_setup import GIB, free, lorakit_setup, peft_setup, random_batch, vocab_of

def max_batch(args, shape, setup, device, vocab, cap_gib=80.0, limit=512):
    """Largest batch (sequences of ``args.seq``) whose training step fits under ``cap_gib``. lorakit runs with
    ``train.compile: false`` here (each probed batch size would compile anew; the compiled default peaks at
    the same memory within 0.03 GiB in docs/benchmarks.md)."""
    free()
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), index)
    model, step, _ = setup(random_batch(vocab, 1, args.seq))

    def fits(b):
        ok = True
        try:
            step(random_batch(vocab, b, args.seq))
            torch.cuda.synchronize()
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not any(k in str(err).lower() for k in ("out of memory", "alloc_failed")):
                raise
            ok = False
        for p in model.parameters():  # a step cut short leaves partial gradients
            p.grad = None
        free()
        print(f"    batch {b}: {'fits' if ok else 'OOM'}", flush=True)
        return ok

    lo, hi = 0, None
    b = 8
    while hi is None and b <= limit:
        lo, hi, b = (b, None, b * 2) if fits(b) else (lo, b, b)
    hi = hi or limit * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    del model, step
    free()
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    return lo * args.seq


def track_losses(args, shape, device, vocab, steps=50, lr=1e-3):
    """lorakit's fast path vs a PEFT fp32-adapter reference from the same initial A/B, 50 steps over 4
    repeated batches (lr 1e-3, constant): returns both loss lists."""
    batches = [random_batch(vocab, args.batch, args.seq, seed=s) for s in range(4)]
    model, step, _ = lorakit_setup(shape, "lora", device, batches[0], train={"learning_rate": lr})
    init = {n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
            p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fast = [float(step(batches[i % 4])) for i in range(steps)]
    del model, step
    free()
    ref_model, _, _ = peft_setup(shape, "peft-lora", device, batches[0])
    named = dict(ref_model.named_parameters())
    with torch.no_grad():
        for n, t in init.items():
            named["base_model.model." + n].copy_(t)
    params = [p for p in ref_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ref = []
    for i in range(steps):
        b = {k: v.to(device) for k, v in batches[i % 4].items()}
        loss = ref_model(**b, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.append(loss.item())
    del ref_model, opt
    free()
    return fast, ref


def profile_steps(args, shape, label, setup, device, vocab, out_dir):
    """Wall time vs summed GPU kernel time of 2 steps (torch.profiler); top ops to ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile

    batch = random_batch(vocab, args.batch, args.seq)
    model, step, _ = setup(batch)
    t0 = time.perf_counter()
    for _ in range(3):
        step(batch)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            step(batch)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 2
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.device_time for e in kernels) / 2 / 1e6
    avg = prof.key_averages()
    name = f"{shape}-{label}".replace(" ", "_").replace("[", "").replace("]", "").replace("=", "-")
    with open(os.path.join(out_dir, f"prof-{name}.txt"), "w") as f:
        f.write(avg.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    print(f"PROFILE {shape} {label}: {wall * 1e3:.1f} ms/step wall, {gpu * 1e3:.1f} ms/step GPU kernels "
          f"({len(kernels) // 2} kernels/step), warmup {warm:.1f} s", flush=True)
    del model, step
    free()


def dora_selfcheck(device) -> dict:
    """DoraScale (Triton on CUDA) against fp64: relative errors of y, ∂t and ∂scale."""
    from lorakit.methods import triton_ops
    from lorakit.methods.ops import dora_scale

    g = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(4099, 1000, device=device, generator=g).bfloat16().requires_grad_()
    scale = (torch.rand(1000, device=device, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(1000, device=device, generator=g).bfloat16()
    y = dora_scale(t, scale, bias)
    grad = torch.randn(y.shape, device=device, generator=g).bfloat16()
    y.backward(grad)
    t64, s64, b64, g64 = t.detach().double(), scale.detach().double(), bias.double(), grad.double()
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    return {"triton": triton_ops.available(t), "y": rel(y.detach(), s64 * (t64 - b64) + b64),
            "grad_t": rel(t.grad, g64 * s64), "grad_scale": rel(scale.grad, (g64 * (t64 - b64)).sum(0))}


def gemm_tflops(device):
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def parse_spec(spec: str, device):
    """``SHAPE:METHOD[:KEY=VALUE,...]`` → (shape, method, setup(batch), fields, bench options). Keys:
    ``method.X`` (method config), ``model.gradient_checkpointing``, ``bench.fp32_norms`` /
    ``bench.ckpt_every`` / ``bench.snapshot`` (this script), anything else ``train.X``. METHOD may be
    ``peft-*`` (PEFT's setup, no keys)."""
    shape, name, *rest = spec.split(":")
    fields = {}
    for part in filter(None, (rest[0] if rest else "").split(",")):
        k, v = part.split("=", 1)
        try:
            fields[k] = json.loads(v)
        except ValueError:
            fields[k] = v
    if name.startswith("peft"):
        return shape, name, lambda b: peft_setup(shape, name, device, b), fields, {}
    method = {k.removeprefix("method."): v for k, v in fields.items() if k.startswith("method.")}
    opts = {k.removeprefix("bench."): v for k, v in fields.items() if k.startswith("bench.")}
    train = {k: v for k, v in fields.items() if not k.startswith(("method.", "bench.", "model."))}
    kw = dict(grad_ckpt=bool(fields.get("model.gradient_checkpointing")), fp32_norms=bool(opts.get("fp32_norms")),
              ckpt_every=int(opts.get("ckpt_every", 1)))
    return shape, name, (lambda b: lorakit_setup(shape, name, device, b, train=train, method=method or None, **kw)), \
        fields, opts


def memory_history(args, shape, label, setup, device, vocab, out_dir, top=14) -> dict:
    """One configuration under ``torch.cuda.memory._record_memory_history``: the peak over setup + warm-up
    and over one steady step, and the live allocations at the whole run's peak grouped by where they were
    made (the innermost frames in lorakit / transformers / bitsandbytes / peft / compiled code)."""
    free()
    torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
    try:
        batch = random_batch(vocab, args.batch, args.seq)
        model, step, levers = setup(batch)
        setup_gib = torch.cuda.memory_allocated() / GIB
        for _ in range(args.warmup):
            step(batch)
        torch.cuda.synchronize()
        warm_gib = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        steady_gib = torch.cuda.max_memory_allocated() / GIB
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in snap["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    cur = peak = 0
    at = -1
    for i, e in enumerate(events):
        cur += e["size"] if e["action"] == "alloc" else -e["size"]
        if cur > peak:
            peak, at = cur, i
    live = {}
    for e in events[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)
    keys = ("lorakit", "transformers", "bitsandbytes", "peft", "liger", "torchinductor", "/tmp/", "torch/optim",
            "torch/autograd", "torch/_functorch", "torch/_inductor/cudagraph")

    def where(e):
        frames = [f for f in e.get("frames", []) if any(k in f["filename"] for k in keys)]
        return " <- ".join(f"{f['filename'].split('site-packages/')[-1].split('/tmp/')[-1]}:{f['line']} {f['name']}"
                           for f in frames[:3]) or "?"

    groups: dict[str, list] = {}
    for e in live.values():
        g = groups.setdefault(where(e), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    row = {"shape": shape, "method": label, "setup_gib": setup_gib, "peak_warmup_gib": warm_gib,
           "peak_step_gib": steady_gib, "replayed_peak_gib": peak / GIB, "events": len(events),
           "step_s": step_s, "levers": levers,
           "at_peak": [{"gib": v[0] / GIB, "n": v[1], "where": k} for k, v in ranked]}
    print(f"MEMORY {shape} {label}: setup {setup_gib:.2f}, peak warm-up {warm_gib:.2f}, peak step "
          f"{steady_gib:.2f}, replayed {peak / GIB:.2f} GiB ({len(events)} events)", flush=True)
    for r in row["at_peak"]:
        print(f"    {r['gib']:7.3f} GiB {r['n']:6d}x  {r['where']}", flush=True)
    del model, step
    free()
    return row


def real_lengths(args, shape, source, steps, device, peft_micro=16) -> list[dict]:
    """Variable-length data: example lengths of a real data set (``scripts/real_lengths.json``, tokenized
    by lorakit with SmolLM2's tokenizer; token ids drawn at random for the shape's vocabulary). lorakit
    packs examples (``lorakit.data.collate.pack``: positions restart per example, no attention across
    them) into ``args.batch`` rows of ``args.seq`` per step; PEFT gets the same examples per step in
    micro-batches of ``peft_micro`` padded to the longest (the HF Trainer with gradient accumulation).
    Both from the same initial adapter; real (non-padding) tokens/s and every step's loss."""
    import datasets

    from lorakit.data.collate import Collator, pack

    lengths = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_lengths.json")))["lengths"][source]
    vocab = vocab_of(shape)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=g).tolist()
    examples = []
    for i in order:
        n = min(lengths[i], args.seq)
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": list(ids), "example": len(examples)})
    rows = pack(datasets.Dataset.from_list([{k: e[k] for k in ("input_ids", "labels")} for e in examples]), args.seq)
    # which examples went into which packed row: pack is greedy in order, so count them off
    bounds, k = [], 0
    for r in rows:
        n = sum(1 for p in r["position_ids"] if p == 0)
        bounds.append((k, k + n))
        k += n
    total = args.warmup + steps
    if len(rows) < total * args.batch:
        raise ValueError(f"{source}: {len(rows)} packed rows, need {total * args.batch}")
    collate = Collator(0, pad_to_multiple_of=64, max_width=args.seq)  # lorakit's CUDA-graph padding
    plain = Collator(0)  # PEFT: pad to the longest in the micro-batch
    packed, padded, real = [], [], []
    for s in range(total):
        chunk = list(range(s * args.batch, (s + 1) * args.batch))
        packed.append(collate([rows[i] for i in chunk]))
        ex = [examples[j] for i in chunk for j in range(*bounds[i])]
        padded.append([plain([{k: e[k] for k in ("input_ids", "labels")} for e in ex[m : m + peft_micro]])
                       for m in range(0, len(ex), peft_micro)])
        real.append(sum(len(e["input_ids"]) for e in ex))
    out = []
    init = None
    for name in ("lora", "peft-lora", "peft-lora+autocast"):
        free()
        if name == "lora":
            model, step, levers = lorakit_setup(shape, "lora", device, packed[0])
            init = {n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
                    p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            batches = packed
        else:
            model, step, levers = peft_setup(shape, name, device, padded[0][0])
            named = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in init.items():
                    named["base_model.model." + n].copy_(t)
            batches = padded
        losses = [step(b) for b in batches[: args.warmup]]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses += [step(b) for b in batches[args.warmup :]]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        width = [sum(m["input_ids"].numel() for m in (b if isinstance(b, list) else [b])) for b in batches[args.warmup :]]
        row = {"shape": shape, "source": source, "method": name, "real_tokens_per_s": sum(real[args.warmup :]) / elapsed,
               "padded_fraction": 1 - sum(real[args.warmup :]) / sum(width),
               "examples_per_step": sum(len(range(*bounds[i])) for i in range(args.batch * total)) / total,
               "peak_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None,
               "losses": [float(x) for x in losses], "levers": levers}
        print(f"REAL {shape} {source} {name}: {row['real_tokens_per_s']:,.0f} real tokens/s, "
              f"{100 * row['padded_fraction']:.1f}% padding, {row['examples_per_step']:.1f} examples/step, "
              f"losses {row['losses'][0]:.4f} … {row['losses'][-1]:.4f}", flush=True)
        out.append(row)
        del model, step
    ref = out[1]["losses"]
    for row in out:
        row["max_rel_loss_diff_vs_peft"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], ref))
    free()
    return out
