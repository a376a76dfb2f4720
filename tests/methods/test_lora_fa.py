import copy

import pytest
import torch
from torch import nn

from lorakit.config import recipe_from_dict
from lorakit.methods.lora import LoraLayer
from lorakit.methods.lora_fa import DropoutFrozenProjection, LoraFaLayer, dropout_mask
from lorakit.storage.checkpoint import adapter_state_dict, load_adapter_weights
from tests.conftest import TINY_MODELS, tiny_inputs
from tests.methods import harness as H
from tests.train.test_loop import make_trainer

KINDS = ["llama", "gpt2", "bert"]
CFG = {"name": "lora_fa", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize("kind", KINDS)
def test_harness_checks(kind):
    H.check_noop_at_init(kind, CFG)
    H.check_merge_equals_forward(kind, CFG)
    H.check_only_adapters_get_grads(kind, CFG, ("lora_B",))
    H.check_only_adapters_get_grads(kind, {**CFG, "gradient_projection": True}, ("lora_B",))
    model, method = H.make(kind, CFG)
    assert H.trainable_count(model) - H.head_count(model) == sum(4 * l.out_features for l in method.layers.values())


def test_checkpoint_stores_the_frozen_random_A(tmp_path):
    from safetensors.torch import save_file

    model, _ = H.make("llama", CFG)
    H.randomize_adapters(model)
    state = adapter_state_dict(model)
    assert any(k.endswith("lora_A.weight") for k in state)
    save_file(state, str(tmp_path / "a.safetensors"))
    other, _ = H.make("llama", CFG)
    torch.manual_seed(123)  # a different random A in the fresh model
    for layer in other.modules():
        if isinstance(layer, LoraFaLayer):
            layer.reset_lora_parameters()
    load_adapter_weights(other, tmp_path / "a.safetensors")
    torch.testing.assert_close(H.logits(other), H.logits(model), rtol=0, atol=0)


def test_training_moves_only_B(tmp_path):
    trainer = make_trainer(tmp_path, method={"name": "lora_fa", "lora_dropout": 0.1})
    before = {k: v.clone() for k, v in adapter_state_dict(trainer.model).items()}
    trainer.train()
    after = adapter_state_dict(trainer.model)
    for key, value in before.items():
        if key.endswith("lora_A.weight"):
            assert torch.equal(after[key], value), key
        elif key.endswith("lora_B.weight"):
            assert not torch.equal(after[key], value), key


def saved_bytes(fn, exclude: list[torch.Tensor]) -> dict:
    """Storages autograd saves while running ``fn`` (those of ``exclude`` left out): {ptr: (bytes, shape)}."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_autograd_saves_no_full_width_activation(dropout):
    """LoRA saves x (or x̃) for A's gradient; LoRA-FA saves only the r-wide Ax, with dropout too."""
    n_in, r = 256, 4
    cfg = recipe_from_dict({"method": {**CFG, "r": r, "lora_dropout": dropout}}).method
    base = nn.Linear(n_in, n_in).requires_grad_(False)
    x = torch.randn(4, 32, n_in, requires_grad=True)
    full = x.numel() * 4
    for layer_class in (LoraLayer, LoraFaLayer):
        layer = layer_class(base, cfg).train()
        saved = saved_bytes(lambda: layer(x), list(layer.parameters()))
        widths = sorted(shape[-1] for _, shape in saved.values())
        total = sum(nbytes for nbytes, _ in saved.values())
        if layer_class is LoraFaLayer:
            assert widths == [r] and total == x.numel() // n_in * r * 4, saved
        else:  # x for A's gradient, plus (with dropout) the mask and x̃
            assert total >= full * (2 if dropout else 1), saved


def test_dropout_function_matches_its_formula():
    torch.manual_seed(0)
    x = torch.randn(64, 50, requires_grad=True)
    A = torch.randn(3, 50)
    torch.manual_seed(7)
    y = DropoutFrozenProjection.apply(x, A, 0.25)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, ()).item())
    mask = dropout_mask(x.shape, x.dtype, x.device, 0.25, seed)
    assert 0.15 < (mask == 0).float().mean() < 0.35 and set(mask.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    torch.testing.assert_close(y, (x.detach() * mask) @ A.T)
    torch.testing.assert_close(x.grad, (g @ A) * mask)


def raw_and_projected_grads(xs):
    cfg = recipe_from_dict({"method": {**CFG, "r": 4}}).method
    base = nn.Linear(24, 16).requires_grad_(False)
    raw = LoraFaLayer(base, cfg)
    proj = LoraFaLayer(base, cfg.model_copy(update={"gradient_projection": True}))
    with torch.no_grad():
        raw.lora_B.weight.normal_()
        proj.load_state_dict(raw.state_dict())
    for x in xs:  # accumulate over micro-batches, as the trainer does
        raw(x).pow(2).sum().backward()
        proj(x).pow(2).sum().backward()
    return raw, proj


def test_gradient_projection_equals_formula_also_when_accumulated():
    torch.manual_seed(0)
    xs = [torch.randn(5, 24), torch.randn(3, 24)]
    raw, proj = raw_and_projected_grads(xs)
    A = raw.lora_A.weight.double()
    s = raw.scaling
    expected = raw.lora_B.weight.grad.double() @ torch.linalg.inv(A @ A.T) / s**2
    # fp32 solve against (AAᵀ)⁻¹ vs the fp64 formula: 1e-4 relative (1.1e-5 seen on an AVX-512 CPU)
    torch.testing.assert_close(proj.lora_B.weight.grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(proj.lora_B.weight.grad, raw.lora_B.weight.grad)
    assert proj.lora_A.weight.grad is None


def peft_model_like(model, kind: str):
    """A PEFT LoRA on a fresh copy of the same tiny base, holding ``model``'s A and B, A frozen."""
    from peft import LoraConfig, get_peft_model

    targets = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "gpt2": ["c_attn", "c_proj", "c_fc"]}[kind]
    peft = get_peft_model(TINY_MODELS[kind](0), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=kind == "gpt2"))
    ours = adapter_state_dict(model)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if ".lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                param.copy_(ours[key])
                if "lora_A" in name:
                    param.requires_grad_(False)
    assert sum(".lora_" in n for n, _ in peft.named_parameters()) == len(ours)
    return peft


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matches_peft_lora_with_frozen_A(kind):
    model, _ = H.make(kind, CFG)
    H.randomize_adapters(model)
    peft = peft_model_like(model, kind)
    inputs = tiny_inputs()
    ours, theirs = model(**inputs).logits, peft(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    grads = {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad
             for n, p in peft.named_parameters() if "lora_B" in n}
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-7)


def test_projected_adamw_steps_match_peft_lorafa_optimizer(monkeypatch):
    """PEFT's LoRA-FA optimizer projects inside its AdamW step; lorakit projects in backward."""
    import peft.optimizers.lorafa as lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)  # PEFT would project in bf16 here
    model, method = H.make("llama", {**CFG, "gradient_projection": True})
    H.randomize_adapters(model)
    peft = peft_model_like(model, "llama")
    lr, eps = 1e-2, 1e-12  # a tiny eps: the two AdamW variants place eps differently
    ours_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps, weight_decay=0.0)
    peft_opt = lorafa.create_lorafa_optimizer(peft, r=4, lora_alpha=8, lr=lr)
    peft_opt.param_groups[0]["eps"] = eps
    for seed in range(3):
        inputs = tiny_inputs(seed=seed + 10)
        model(**inputs).logits.pow(2).mean().backward()
        peft(**inputs).logits.pow(2).mean().backward()
        ours_opt.step(), peft_opt.step()
        ours_opt.zero_grad(), peft_opt.zero_grad()
    theirs = {n.removeprefix("base_model.model.").replace(".default.", "."): p for n, p in peft.named_parameters()}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            torch.testing.assert_close(param, theirs[name], rtol=1e-3, atol=1e-4)


def test_compiled_projection_reads_a_precomputed_matrix():
    """With gradient projection the compiled backward only multiplies by P = pinv(AAᵀ)/s²; the
    pseudo-inverse (a host sync on CUDA, not capturable in a CUDA graph) runs eagerly before the step."""
    torch.manual_seed(0)
    xs = [torch.randn(5, 24)]
    _, eager = raw_and_projected_grads(xs)
    layer = copy.deepcopy(eager)
    layer.lora_B.weight.grad = None
    layer.refresh_projection()  # what LoraFa.before_step does
    compiled, graphs = H.compile_recording(layer)
    compiled(xs[0]).pow(2).sum().backward()
    code = "".join(gm.code for kind in graphs.values() for gm in kind)
    assert graphs["backward"] and "pinv" not in code
    torch.testing.assert_close(layer.lora_B.weight.grad, eager.lora_B.weight.grad, rtol=1e-5, atol=1e-6)


def test_compiled_dropout_branch_has_no_graph_break_and_saves_no_float_activation():
    """Under torch.compile (the CUDA default) dropout > 0 takes the traceable branch: one graph, and
    the tensors kept for backward are the bool mask and r-wide ones, never a float copy of x."""
    cfg = recipe_from_dict({"method": {**CFG, "r": 4, "lora_dropout": 0.1}}).method
    layer = LoraFaLayer(nn.Linear(24, 16).requires_grad_(False), cfg).train()
    compiled, graphs = H.compile_recording(layer, fullgraph=True)  # a graph break raises
    x = torch.randn(5, 24, requires_grad=True)
    compiled(x).pow(2).sum().backward()
    assert layer.lora_B.weight.grad is not None and x.grad is not None
    saved = [v for v in H.graph_outputs(graphs["forward"][0])[1:] if isinstance(v, torch.Tensor)]
    full_width_float = [tuple(v.shape) for v in saved if v.shape[-1] == 24 and v.dtype.is_floating_point and v.ndim == 2
                        and v.shape[0] == 5]
    assert full_width_float == [] and any(v.dtype == torch.bool for v in saved), [(v.shape, v.dtype) for v in saved]


def test_projection_computed_inside_bf16_autocast_is_fp32():
    """A first forward under bf16 autocast (a custom loop without the trainer's before_step) still
    computes P in fp32: pinv has no bf16 kernel."""
    cfg = recipe_from_dict({"method": {**CFG, "r": 4, "gradient_projection": True}}).method
    layer = LoraFaLayer(nn.Linear(24, 16).requires_grad_(False), cfg).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(5, 24)).float().pow(2).sum().backward()
    assert layer.projection.dtype == torch.float32 and layer.lora_B.weight.grad is not None
    A = layer.lora_A.weight.double()
    torch.testing.assert_close(layer.projection.double(), torch.linalg.pinv(A @ A.T) / layer.scaling**2, rtol=1e-4, atol=1e-6)
