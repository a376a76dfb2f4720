"""Training jobs for tests/train/test_distributed.py: one builder for one process and for each rank of a
2-process gloo group (started with ``torch.multiprocessing``), so both take the same code path."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from lorakit.config import recipe_from_dict
from lorakit.methods import build_method
from lorakit.storage.checkpoint import adapter_state_dict, load_adapter_weights, read_checkpoint_meta
from lorakit.train.distributed import resolve_mode
from lorakit.world import World
from lorakit.train.loop import Trainer
from tests.conftest import tiny_bert, tiny_llama
from tests.helpers import toy_data

PER_DEVICE = 2  # rows per rank; one process runs 2 × PER_DEVICE
STEPS = 5  # 21 rows, 4 per global micro-batch, 2 micro-batches per step: the 6th micro-batch has 1 row
# (rank 1 runs a blank batch) and step 4 crosses into the second epoch
CASES = {  # name: (method fields, model kind)
    "lora": ({"name": "lora"}, "llama"),
    "lora_plus": ({"name": "lora_plus", "loraplus_lr_ratio": 4}, "llama"),
    "dylora": ({"name": "dylora"}, "llama"),
    "lora_drop": ({"name": "lora_drop", "sample_fraction": 0.5, "threshold": 0.6}, "llama"),
    "lora_fa": ({"name": "lora_fa", "gradient_projection": True}, "llama"),
    "delta_lora": ({"name": "delta_lora", "delta_start_step": 1}, "llama"),
    "dora": ({"name": "dora"}, "llama"),
    "vera": ({"name": "vera", "r": 8}, "llama"),
    "qlora": ({"name": "qlora"}, "qllama"),
    "lora_bert": ({"name": "lora"}, "bert"),  # classification: sharded accuracy / macro-F1
}
FSDP_CASES = ["lora", "lora_plus", "dora", "vera", "lora_fa", "delta_lora", "qlora",  # qlora: NF4 base sharded
              "dylora"]  # dylora: falls back to DDP


def make(root: Path, case: str, world: World, save_every: int | None = None, method_state=None,
         qfolder: Path | None = None, name: str | None = None, weights: Path | None = None,
         dropout: float = 0.0) -> Trainer:
    """The Trainer of ``case`` in ``root/name`` (default ``root/case``) at PER_DEVICE rows per rank;
    ``weights``: adapter weights loaded before the Trainer (which shards the model under FSDP);
    ``dropout``: the adapter's ``lora_dropout`` (the base model's dropout stays off)."""
    method, kind = CASES[case]
    task = "seq_cls" if kind == "bert" else "causal_lm"
    recipe = recipe_from_dict({
        "model": {"task": task, **({"quantization": "nf4"} if kind == "qllama" else {})},
        "method": {"r": 4, "lora_dropout": dropout, **method},
        "train": {"learning_rate": 1e-2, "batch_size": PER_DEVICE * 2 // world.size, "gradient_accumulation_steps": 2,
                  "max_steps": STEPS, "save_every": save_every, "warmup_ratio": 0.2, "lr_scheduler": "cosine",
                  "weight_decay": 0.01, "precision": "fp32"},
        "output_dir": str(root / (name or case)),
    })
    if kind == "qllama":
        from lorakit.config import ModelConfig
        from lorakit.models import load_model
        from lorakit.quant import prepare_kbit_model

        model = prepare_kbit_model(load_model(ModelConfig(name_or_path=str(qfolder), quantization="nf4")))
    else:
        model = tiny_bert() if kind == "bert" else tiny_llama()
        for module in model.modules():  # no dropout anywhere (BERT's base has some): the same numbers
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    torch.manual_seed(recipe.train.seed)
    m = build_method(recipe.method)
    m.attach(model, task)
    if method_state:
        m.load_state_dict(method_state)
    if weights is not None:
        load_adapter_weights(model, weights)
    world, _ = resolve_mode(world, world.mode, m)
    data = toy_data(n_train=21, classes=3 if kind == "bert" else None)
    return Trainer(model, None, m, data, recipe, torch.device("cpu"), Console(quiet=True), world=world)


def resume(root: Path, case: str, world: World, checkpoint: Path, name: str, qfolder=None,
           dropout: float = 0.0) -> Trainer:
    """Continue ``checkpoint`` (of a run at any world size) in ``root/name`` on ``world``."""
    target = root / name / "checkpoints" / checkpoint.name
    if world.is_main:
        shutil.copytree(checkpoint, target)
    world.barrier()
    _, state = read_checkpoint_meta(target)
    trainer = make(root, case, world, save_every=3, method_state=state, qfolder=qfolder, name=name,
                   weights=target / "adapter.safetensors", dropout=dropout)
    trainer.train(resume_from=target)
    return trainer


def dump_adapter(trainer: Trainer, path: Path) -> None:
    """This rank's whole adapter (FSDP: gathered), for the cross-rank and saved-vs-gathered checks."""
    from safetensors.torch import save_file

    tensors = adapter_state_dict(trainer.model)
    gathered = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file({**tensors, **{f"gathered::{k}": v for k, v in gathered.items()}}, str(path))


def job(rank: int, root: str, mode: str, qfolder: str | None, reference: str) -> None:
    """One rank of the 2-process job: every case of ``mode`` trained, then the resumes."""
    root, reference = Path(root), Path(reference)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-{mode}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    world = World(rank=rank, size=2, mode=mode)
    cases = [c for c in (FSDP_CASES if mode == "fsdp" else CASES) if c != "qlora" or qfolder]
    drawn: list[int] = []
    for case in cases:
        trainer = make(root, case, world, save_every=3 if case == "lora" else None,
                       qfolder=Path(qfolder) if qfolder else None)
        if case == "dylora":
            start = trainer.method.start_step
            trainer.method.start_step = lambda b: (drawn.append(b), start(b))[1]
        trainer.train()
        dump_adapter(trainer, root / case / f"rank{rank}.safetensors")
        if case == "qlora" and mode == "fsdp":
            w = trainer.model.model.layers[0].self_attn.q_proj.base_layer.weight
            (root / case / "base_sharded").write_text(f"{type(w).__name__} {str(w.dtype).removeprefix('torch.')}")
        if case == "lora_drop":
            (root / case / f"kept{rank}.json").write_text(json.dumps(trainer.method.selection["kept"]))
    (root / f"dylora_ranks{rank}.json").write_text(json.dumps(drawn))
    resume(root, "lora", world, reference / "lora" / "checkpoints" / "step-000003", "lora_from_1")
    if mode == "ddp":  # dropout on: resumed on 2 processes, each rank continues its own RNG stream
        make(root, "lora", world, save_every=3, name="dropout", dropout=0.3).train()
        resume(root, "lora", world, root / "dropout" / "checkpoints" / "step-000003", "dropout_resumed",
               dropout=0.3)
    dist.destroy_process_group()
