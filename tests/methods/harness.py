"""Checks every method must pass on the tiny models (called from each method's test module)."""

from __future__ import annotations

import copy

import torch

from lorakit.config import recipe_from_dict
from lorakit.methods import build_method
from lorakit.storage.checkpoint import adapter_state_dict, load_adapter_weights
from tests.conftest import TINY_MODELS, tiny_inputs

TASK = {"llama": "causal_lm", "gpt2": "causal_lm", "bert": "seq_cls"}


def make(kind: str, method_cfg: dict, seed: int = 0, adapter_seed: int | None = None):
    """(model, method) with the method attached to a tiny model of ``kind`` (base weights from ``seed``,
    adapter initialization from ``adapter_seed``, default seed + 100)."""
    cfg = recipe_from_dict({"method": method_cfg}).method
    model = TINY_MODELS[kind](seed)
    torch.manual_seed(seed + 100 if adapter_seed is None else adapter_seed)
    method = build_method(cfg)
    method.attach(model, TASK[kind])
    return model, method


def randomize_adapters(model: torch.nn.Module, scale: float = 0.3, seed: int = 5) -> None:
    """Give every trainable tensor random values, so merge/round-trip checks are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


def check_noop_at_init(kind: str, method_cfg: dict) -> None:
    model, _ = make(kind, method_cfg)
    base = TINY_MODELS[kind](0)
    if TASK[kind] == "seq_cls":  # the classification head is trainable but initialized identically
        base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()}, strict=False)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-6)


def check_merge_equals_forward(kind: str, method_cfg: dict, atol: float = 1e-5) -> None:
    model, method = make(kind, method_cfg)
    randomize_adapters(model)
    expected = logits(model)
    merged = method.merge(copy.deepcopy(model))
    from lorakit.methods.base import AdapterLayer

    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=atol)


def check_only_adapters_get_grads(kind: str, method_cfg: dict, trainable_names: tuple[str, ...]) -> None:
    """Backward reaches exactly the trainable tensors, whose names all contain one of ``trainable_names``."""
    model, _ = make(kind, method_cfg)
    randomize_adapters(model)
    model.train()
    out = model(**tiny_inputs())
    out.logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert any(t in name for t in trainable_names) or name.startswith(("score", "classifier")), name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def check_checkpoint_roundtrip(kind: str, method_cfg: dict, tmp_path) -> None:
    from safetensors.torch import save_file

    model, method = make(kind, method_cfg)
    randomize_adapters(model)
    save_file(adapter_state_dict(model), str(tmp_path / "a.safetensors"))
    state = method.state_dict()
    fresh, fresh_method = make(kind, method_cfg, adapter_seed=7)  # other random init: everything must load
    fresh_method.load_state_dict(state)
    load_adapter_weights(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(("score", "classifier")))


def check_resume_continues(tmp_path, method_cfg: dict, cut: int = 3):
    """Train 6 toy steps; resume a copy from the step-``cut`` checkpoint: the next losses and the final
    adapter tensors are identical. Returns (full trainer, resumed trainer)."""
    import shutil

    import pytest

    from lorakit.storage.checkpoint import read_checkpoint_meta
    from tests.train.test_loop import losses, make_trainer

    full = make_trainer(tmp_path, "full", method=method_cfg)
    full.train()
    ckpt = tmp_path / f"cut/checkpoints/step-{cut:06d}"
    shutil.copytree(tmp_path / f"full/checkpoints/step-{cut:06d}", ckpt)
    _, state = read_checkpoint_meta(ckpt)
    resumed = make_trainer(tmp_path, "cut", method=method_cfg, method_state=state)
    load_adapter_weights(resumed.model, ckpt / "adapter.safetensors")
    resumed.train(resume_from=ckpt)
    expected, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(cut + 1, 7)) and expected[6] != expected[cut + 1]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    final, again = adapter_state_dict(full.model), adapter_state_dict(resumed.model)
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-6, atol=1e-7)
    return full, resumed


def check_merged_like_peft(method, peft_merged) -> None:
    """Every merged adapter layer's weight equals PEFT's ``merge_and_unload`` weight (fp32)."""
    for name, layer in method.layers.items():
        torch.testing.assert_close(layer.merged_layer().weight, peft_merged.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)


def compile_recording(module: torch.nn.Module, fullgraph: bool = False):
    """(compiled ``module``, graphs): torch.compile through AOTAutograd without inductor, keeping every
    forward (or inference) and backward graph it builds, to check what a compiled layer computes; the
    forward / backward split is inductor's (min-cut rematerialization), so a forward graph's outputs
    after the first are what the compiled layer saves for backward."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs: dict[str, list] = {"forward": [], "backward": []}

    def keep(kind: str):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    return torch.compile(module, backend=backend, fullgraph=fullgraph), graphs


def graph_outputs(gm) -> list:
    """The example values (tensors, or None) of an FX graph module's outputs."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return [o.meta.get("val") if o is not None else None for o in out]
