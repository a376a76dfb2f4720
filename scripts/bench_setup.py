"""The models and the training steps scripts/bench_gpu.py times (and bench_distributed.py, bench_unsloth.py,
probe_speed.py reuse): random-weight models from public configs (``SHAPES``), lorakit's and PEFT's setups
for one configuration, one timed run (:func:`run_one`). What is measured and how: bench_gpu.py's docstring."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

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
