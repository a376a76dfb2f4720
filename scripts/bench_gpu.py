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
Results and the levers measured: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

GIB = 2**30
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # public config.json values (Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B)
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
                         max_window_layers=24, hidden_act="silu", attention_dropout=0.0),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu"),
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
SHAPES["tiny-qwen"] = {**SHAPES["qwen2.5-0.5b"], **TINY}  # smoke tests of this script
SHAPES["tiny-llama"] = {**SHAPES["llama-3.2-1b"], **TINY, "head_dim": 16}
LORAKIT = ["lora", "dora", "qlora", "vera", "lora_fa", "dylora", "delta_lora", "lora_drop"]
PEFT = ["peft-lora", "peft-dora", "peft-qlora", "peft-vera", "peft-lora+autocast", "peft-qlora+autocast"]
PAIR = {"lora": "peft-lora", "dora": "peft-dora", "qlora": "peft-qlora", "vera": "peft-vera",
        "lora [dropout 0.05]": "peft-lora [dropout 0.05]"}
PAIR_AUTOCAST = {"lora": "peft-lora+autocast", "qlora": "peft-qlora+autocast"}  # PEFT's best: bf16 autocast


# ---- models -------------------------------------------------------------------------------------
def vocab_of(shape: str) -> int:
    return 49152 if shape == "smollm2" else SHAPES[shape]["vocab_size"]  # smollm2: the real model (CPU)


def build_model(shape: str, device: torch.device, quantized: bool = False, precision: str = "auto"):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if shape == "smollm2":
        from lorakit.config import ModelConfig
        from lorakit.models import load_model

        cfg = ModelConfig(name_or_path="smollm2-135m-instruct", quantization="nf4" if quantized else None)
        return load_model(cfg, precision=precision)  # train.precision decides model.dtype auto
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return quantize_nf4(model, device) if quantized else model


def quantize_nf4(model: nn.Module, device: torch.device) -> nn.Module:
    """Every linear layer but the LM head → bitsandbytes Linear4bit (NF4, double quant, bf16 compute)."""
    import bitsandbytes as bnb

    from lorakit.methods.inject import head_names, replace_module

    heads = head_names(model)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name not in heads:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(device)  # quantized where the weight is
            # module=q: the layer keeps the quant_state too (as transformers' loader does), so FSDP2, which
            # shards the packed weight as a plain tensor, leaves bitsandbytes a way to find it
            mod.weight = None  # free the bf16 copy now (the 8B shape)
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
            replace_module(model, name, q)
    with contextlib.suppress(AttributeError):
        model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers
    return model


def flops_per_token(model: nn.Module, seq: int) -> float:
    """4·N_frozen + 3·(2·T·d_q·L) (see the module docstring)."""
    from lorakit.methods.base import AdapterLayer, layer_shape

    adapter = ("lora_A", "lora_B", "vera_")  # adapter matmuls (lorakit and PEFT names) are not counted
    n = sum(math.prod(layer_shape(m)) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, AdapterLayer) and not any(a in name for a in adapter))
    cfg = model.config
    d_q = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return 4 * n + 3 * 2 * seq * d_q * cfg.num_hidden_layers


# ---- one configuration --------------------------------------------------------------------------
class FakeData:
    def __init__(self, batch):
        self.train, self.eval, self.collate = [0] * batch["input_ids"].shape[0], [], lambda rows: batch


def lorakit_setup(shape, name, device, batch, train=None, method=None, grad_ckpt=False, fp32_norms=False,
                  ckpt_every=1):
    """``fp32_norms``: the pre-issue-17 QLoRA base (frozen norms upcast to fp32, as PEFT's
    prepare_model_for_kbit_training), for the memory comparison; ``ckpt_every``: with ``grad_ckpt``,
    checkpoint only every k-th decoder layer."""
    from rich.console import Console

    from lorakit.config import recipe_from_dict
    from lorakit.methods import build_method
    from lorakit.quant import prepare_kbit_model
    from lorakit.train.loop import Trainer

    m = {"name": name, "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": SEVEN}
    if name == "vera":
        m.update(r=256, target_modules=["q_proj", "v_proj"])
        del m["lora_alpha"]  # VeRA has no alpha (rejected since VeRA validates it)
    if name == "delta_lora":
        m["delta_start_step"] = 0  # the W update is on from the first step on
    m.update(method or {})
    quant = name == "qlora"
    recipe = recipe_from_dict({
        "model": {"quantization": "nf4" if quant else None, "gradient_checkpointing": grad_ckpt},
        "method": m,
        "train": {"learning_rate": 1e-4, "batch_size": batch["input_ids"].shape[0], "max_steps": 10**6,
                  "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0, **(train or {})},
        "output_dir": "/tmp/bench-gpu-run"})
    model = build_model(shape, device, quant, recipe.train.precision)
    adapter = build_method(recipe.method)
    if quant:
        prepare_kbit_model(model)
        if fp32_norms:
            for mod in model.modules():
                if "norm" in type(mod).__name__.lower():
                    for p in mod.parameters(recurse=False):
                        p.data = p.data.float()
    adapter.attach(model, "causal_lm")
    if name == "lora_drop":  # a made-up selection: keep the modules of even layers, share the rest
        from lorakit.methods.lora_drop_select import shape_groups

        kept = [n for n in adapter.layers if int(n.split("layers.")[1].split(".")[0]) % 2 == 0]
        adapter.apply_selection({"kept": kept, "shared_groups": shape_groups(adapter.layers, kept)})
    model.to(device) if not quant else None
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        from lorakit.fast.kernels import decoder_layers

        for i, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = i % ckpt_every == 0
    model.train()  # as Trainer.train does (load_model gives eval mode: no dropout, DyLoRA at rank r)
    trainer = Trainer(model, None, adapter, FakeData(batch), recipe, device, Console(quiet=True))
    optimizer, scheduler = trainer.make_optimizer()
    levers = trainer.speed_summary()
    return model, lambda b: trainer.optimizer_step([b], optimizer, scheduler).loss, levers


def peft_setup(shape, name, device, batch, dropout=0.0, autocast=False):
    from peft import LoraConfig, VeraConfig, get_peft_model

    kind = name.removeprefix("peft-")
    if kind.endswith("+autocast"):  # PEFT's best setting: bf16 autocast (the HF Trainer's bf16=True)
        kind, autocast = kind.removesuffix("+autocast"), True
    model = build_model(shape, device, kind == "qlora", "bf16" if autocast else "fp32")  # PEFT's default: fp32
    if kind == "vera":
        cfg = VeraConfig(r=256, target_modules=["q_proj", "v_proj"], vera_dropout=dropout, d_initial=0.1)
    else:
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=SEVEN,
                         use_dora=kind == "dora", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.to(device) if kind != "qlora" else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(b):
        micro = b if isinstance(b, list) else [b]  # a list: micro-batches of one step (HF Trainer's accumulation)
        items = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        loss = 0.0
        for m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                part = model(**m, use_cache=False, **({"num_items_in_batch": items} if len(micro) > 1 else {})).loss
            part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss  # read after the timed steps, as lorakit's (no sync per step for either)

    return model, step, []


class RssPeak:
    """Peak resident set (CPU) sampled every 2 ms above the level at start."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self.done:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()


def free():
    torch._dynamo.reset()  # compiled code of earlier configurations must not count against the recompile limit
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_batch(vocab, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_one(args, shape, label, setup, device, vocab):
    batch = random_batch(vocab, args.batch, args.seq)
    free()
    cuda = device.type == "cuda"
    rss = RssPeak() if not cuda else contextlib.nullcontext()
    t_setup = time.perf_counter()
    with rss:
        model, step, levers = setup(batch)
        setup_s = time.perf_counter() - t_setup
        fpt = flops_per_token(model, args.seq)
        for _ in range(args.warmup):
            step(batch)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step(batch) for _ in range(args.steps)]
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        losses = [float(l) for l in losses]
        syncs = count_syncs(lambda: step(batch)) if cuda else None
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else (rss.peak - rss.base) / GIB
    tps = args.steps * args.batch * args.seq / elapsed
    row = {"shape": shape, "method": label, "tokens_per_s": tps, "peak_gib": peak, "tflops": tps * fpt / 1e12,
           "flops_per_token": fpt, "loss": losses[-1], "setup_s": setup_s, "levers": levers,
           "syncs_per_step": syncs}
    del model, step
    free()
    return row


def count_syncs(fn) -> dict:
    """Host-device synchronizations torch reports (``set_sync_debug_mode``) while ``fn`` runs, by the
    innermost lorakit / transformers / peft / liger frame that caused them."""
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(k in f.filename for k in ("lorakit", "transformers", "peft", "liger", "torch/nn", "torch/optim"))]
        f = frames[-1] if frames else None
        key = f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" if f else "?"
        sites[key] = sites.get(key, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sites


# ---- extras: max batch, loss tracking, GEMM peak ---------------------------------------------------
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
