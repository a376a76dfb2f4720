"""Model-level levers: which modules get liger's kernels, when levers apply, and the errors."""

import pytest
import torch

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.fast import accelerate, resolve_cross_entropy
from lorakit.fast.cross_entropy import liger_available
from lorakit.fast.kernels import apply_liger, decoder_layers, liger_kernels_available
from tests.conftest import tiny_gpt2, tiny_inputs, tiny_llama


def test_liger_patches_rms_norms_and_swiglu_of_llama_style_models_only():
    model = tiny_llama()
    assert apply_liger(model) == ["liger rms_norm×5", "liger swiglu×2"]  # 2 per layer + final; 2 MLPs
    assert "forward" in vars(model.model.norm) and "forward" in vars(model.model.layers[0].mlp)
    assert "forward" not in vars(tiny_llama().model.norm)  # instances only, not the class
    assert apply_liger(tiny_gpt2()) == []


def test_decoder_layers():
    assert len(decoder_layers(tiny_llama())) == 2
    assert len(decoder_layers(tiny_gpt2())) == 2


def test_cpu_defaults_change_nothing():
    model = tiny_llama()
    assert accelerate(model, TrainConfig(), torch.device("cpu"), None) == []
    assert "forward" not in vars(model.model.norm)
    assert resolve_cross_entropy("auto", torch.device("cpu")) == "chunked"
    assert resolve_cross_entropy("full", torch.device("cpu")) == "full"


@pytest.mark.skipif(liger_available() or liger_kernels_available(), reason="liger-kernel is installed here")
def test_asking_for_liger_without_it_says_how_to_get_it():
    with pytest.raises(LorakitError, match="pip install liger-kernel"):
        resolve_cross_entropy("liger", torch.device("cpu"))
    with pytest.raises(LorakitError, match="pip install liger-kernel"):
        accelerate(tiny_llama(), TrainConfig(kernels="liger"), torch.device("cpu"), None)


@pytest.mark.parametrize("choice, device, auto_ok, expected", [
    ("auto", "cuda", True, "reduce-overhead"), ("auto", "cuda", False, None), ("auto", "cpu", True, None),
    (True, "cpu", True, "default"), (False, "cuda", True, None),
    ("cudagraphs", "cuda", False, "reduce-overhead"), ("cudagraphs", "cpu", True, "default"),
])
def test_compile_mode_resolution(choice, device, auto_ok, expected):
    from lorakit.fast.kernels import compile_mode

    assert compile_mode(TrainConfig(compile=choice), torch.device(device), auto_ok) == expected
    if choice == "auto" and expected:  # with gradient accumulation auto compiles without CUDA graphs
        assert compile_mode(TrainConfig(compile=choice), torch.device(device), auto_ok, auto_graphs=False) == "default"


def test_compile_field_rejects_other_words():
    from lorakit.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="train.compile = .max-autotune. is invalid: expected auto, cudagraphs, true or false"):
        recipe_from_dict({"train": {"compile": "max-autotune"}})


@pytest.mark.parametrize("name, extra", [
    ("lora", {}), ("lora_plus", {}), ("dora", {}), ("vera", {"r": 16}), ("lora_fa", {}),
    ("lora_fa", {"gradient_projection": True}), ("dylora", {}), ("lora_drop", {}),
    ("delta_lora", {"delta_start_step": 0, "lora_dropout": 0.0}),
])
def test_every_method_compiles_each_decoder_layer_as_one_graph(name, extra):
    """train.compile compiles whole decoder layers; a graph break inside one (e.g. an untraceable op in
    an adapter) would split it, and under CUDA graphs every piece becomes a separate graph. Default
    dropout (0.05) and the trainer's before_step hook included, training mode, forward and backward."""
    from tests.methods import harness as H

    model, method = H.make("llama", {"name": name, "r": 4, "lora_dropout": 0.05, **extra})
    model.train()
    method.before_step(0)
    torch._dynamo.reset()
    for layer in decoder_layers(model):
        layer.compile(backend="aot_eager", fullgraph=True)  # raises at a graph break
    inputs = tiny_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
