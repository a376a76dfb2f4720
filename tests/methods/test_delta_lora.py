"""Delta-LoRA: the telescoped form against the paper's in-place rule (Zi et al. 2023, Algorithm 1)."""

import copy
import json
import shutil

import pytest
import torch

from lorakit.config import recipe_from_dict
from lorakit.methods import delta_lora
from lorakit.methods.delta_lora import as_lora
from lorakit.storage.checkpoint import adapter_state_dict, load_adapter_weights, read_checkpoint_meta
from tests.tiny_run import tiny_world  # noqa: F401 (fixture)
from tests.conftest import tiny_inputs
from tests.methods import harness as H
from tests.train.test_loop import losses, make_trainer

KINDS = ["llama", "gpt2", "bert"]
K, LAM = 3, 2.0
CFG = {"name": "delta_lora", "r": 4, "lora_alpha": 8, "delta_start_step": K, "delta_lambda": LAM}


def activated(kind: str, cfg: dict = CFG):
    """A model whose snapshot (A_K, B_K) is taken and differs from the current (A, B)."""
    model, method = H.make(kind, cfg)
    H.randomize_adapters(model, seed=5)
    method.after_optimizer_step(K - 1, None)
    assert method.state_dict() == {"snapshot_taken": False, "snapshot_step": None}
    method.after_optimizer_step(K, None)
    assert method.state_dict() == {"snapshot_taken": True, "snapshot_step": K}
    H.randomize_adapters(model, scale=0.1, seed=6)
    return model, method


def test_config_defaults_and_dropout_set_aside():
    cfg = recipe_from_dict({"method": {"name": "delta_lora"}}).method
    assert (cfg.delta_lambda, cfg.delta_start_step, cfg.lora_dropout) == (2.0, 500, 0.0)
    assert cfg.set_aside_notes() == []
    cfg = recipe_from_dict({"method": {"name": "delta_lora", "dropout": 0.1}}).method  # a LoRA recipe's dropout
    assert cfg.lora_dropout == 0.0
    assert cfg.set_aside_notes() == ["method.lora_dropout = 0.1 set aside (Delta-LoRA uses no dropout on the LoRA "
                                     "path so that the gradient of BA is that of W, Zi et al. 2023); using 0.0"]


@pytest.mark.parametrize("kind", KINDS)
def test_harness_checks(kind, tmp_path):
    H.check_noop_at_init(kind, CFG)
    H.check_merge_equals_forward(kind, CFG)
    H.check_only_adapters_get_grads(kind, CFG, ("lora_A", "lora_B"))
    H.check_checkpoint_roundtrip(kind, CFG, tmp_path)
    model, method = H.make(kind, CFG)
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in method.layers.values())
    assert H.trainable_count(model) - H.head_count(model) == expected  # snapshots are buffers


@pytest.mark.parametrize("kind", KINDS)
def test_active_merge_export_and_roundtrip(kind, tmp_path):
    from safetensors.torch import save_file

    model, method = activated(kind)
    n_layers, expected = len(method.layers), H.logits(model)
    for layer in method.layers.values():  # the correction is really there, and the rank-2r export equals ΔW
        s, a, b = layer.scaling, layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        manual = s * b @ a + LAM * s * (b @ a - layer.snapshot_B @ layer.snapshot_A)
        torch.testing.assert_close(layer.delta_weight(), manual, rtol=1e-6, atol=1e-6)
        assert (layer.delta_weight() - s * b @ a).abs().max() > 1e-3
        a2, b2, scaling = as_lora(layer)
        assert a2.shape == (8, layer.in_features) and b2.shape == (layer.out_features, 8) and scaling == 1.0
        torch.testing.assert_close(b2 @ a2, layer.delta_weight(), rtol=1e-5, atol=1e-6)
    tensors = adapter_state_dict(model)
    assert sum(k.endswith(("snapshot_A", "snapshot_B")) for k in tensors) == 2 * n_layers
    save_file(tensors, str(tmp_path / "a.safetensors"))
    fresh, fresh_method = H.make(kind, CFG)
    fresh_method.load_state_dict(json.loads(json.dumps(method.state_dict())))
    load_adapter_weights(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(H.logits(fresh), expected, rtol=0, atol=0)
    torch.testing.assert_close(H.logits(method.merge(copy.deepcopy(model))), expected, rtol=0, atol=3e-5)


def test_inactive_export_is_plain_lora():
    model, method = H.make("llama", CFG)
    H.randomize_adapters(model)
    layer = next(iter(method.layers.values()))
    a2, b2, _ = as_lora(layer)
    torch.testing.assert_close(b2 @ a2, layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)


@pytest.mark.parametrize("fused", [True, False])
def test_correction_passes_no_gradient(fused, monkeypatch):
    """Once active, the layer computes (W0 + λs(BA − B_K A_K))x + sBAx with the W term constant
    (on the fused addmm path and on the plain one)."""
    if not fused:
        monkeypatch.setattr(delta_lora, "can_fuse", lambda *a: False)
    model, method = activated("llama", {**CFG, "target_modules": ["q_proj"]})
    layer = method.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    s = layer.scaling
    w = layer.base_layer.weight + LAM * s * (b.detach() @ a.detach() - layer.snapshot_B @ layer.snapshot_A)
    ref = x2 @ w.T + s * (x2 @ a.T) @ b.T
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)  # the input's gradient goes through W


def test_bf16_autocast_matches_fp32():
    """Under bf16 autocast with a bf16 base (the GPU setting) the fused rank-3r branch stays within bf16
    rounding of the fp32 formula, output in bf16."""
    _, method = activated("llama", {**CFG, "target_modules": ["q_proj"]})
    layer = method.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(64, layer.in_features)
    s, a, b = layer.scaling, layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    corr = x @ (LAM * s * (b @ a - layer.snapshot_B @ layer.snapshot_A)).T
    branch = s * (x @ a.T) @ b.T + corr
    assert corr.abs().max() > 0.1 * branch.abs().max()  # the correction is a real part of the branch
    layer.base_layer.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, base = layer(x.bfloat16()), layer.base_layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close((out - base).float(), branch, rtol=0, atol=2e-2 * branch.abs().max().item())


def _step_losses(model, opt, steps, after_step):
    out = []
    for t in range(steps):
        batch = tiny_inputs(batch=3, length=9, seed=t)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        after_step(t)
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_telescoped_equals_naive_in_place_update():
    """Paper: after optimizer step t (0-based), if t > K: W += λs(B_{t+1}A_{t+1} − B_tA_t). fp32, 15 steps."""
    steps = 15
    tele, tm = H.make("llama", CFG)
    naive, nm = H.make("llama", {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    for (n, p), (m, q) in zip(tele.named_parameters(), naive.named_parameters()):
        assert n == m and torch.equal(p, q)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in nm.layers.items()}
    adamw = dict(lr=5e-3, weight_decay=0.01)  # larger lr: Adam amplifies fp32 roundoff in tiny grads
    opt_t = torch.optim.AdamW([p for p in tele.parameters() if p.requires_grad], **adamw)
    opt_n = torch.optim.AdamW([p for p in naive.parameters() if p.requires_grad], **adamw)
    products = {}

    def product(layer):
        return layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()

    def naive_rule(t):
        for n, layer in nm.layers.items():
            new = product(layer)
            if t > K:
                with torch.no_grad():
                    layer.base_layer.weight.add_(LAM * layer.scaling * (new - products[n]))
            products[n] = new

    for n, layer in nm.layers.items():
        products[n] = product(layer)
    got = _step_losses(tele, opt_t, steps, lambda t: tm.after_optimizer_step(t, opt_t))
    want = _step_losses(naive, opt_n, steps, naive_rule)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    moved = 0.0
    for n, layer in tm.layers.items():
        ref = nm.layers[n]
        torch.testing.assert_close(layer.base_layer.weight, w0[n], rtol=0, atol=0)  # W0 stays frozen
        torch.testing.assert_close(layer.merged_weight(), ref.merged_weight(), rtol=0, atol=1e-6)
        moved = max(moved, (ref.base_layer.weight - w0[n]).abs().max().item())
    assert moved > 3e-2  # the naive W really moved: the comparison is not trivial


def test_resume_continues_identically(tmp_path):
    """Checkpoints at steps 2 (before the snapshot, taken after the step with index 2) and 4 (after)."""
    method = {"name": "delta_lora", "lora_dropout": 0.0, "delta_start_step": 2}
    train = {"max_steps": 6, "save_every": 2, "learning_rate": 2e-2}
    full = make_trainer(tmp_path, "full", method=method, train=train)
    full.train()
    expected = losses(tmp_path / "full")
    for cut in (2, 4):
        name, run = f"step-{cut:06d}", f"cut{cut}"
        ckpt = tmp_path / run / "checkpoints" / name
        shutil.copytree(tmp_path / "full/checkpoints" / name, ckpt)
        _, state = read_checkpoint_meta(ckpt)
        taken = {"snapshot_taken": True, "snapshot_step": 2}
        assert state == (taken if cut > 2 else {"snapshot_taken": False, "snapshot_step": None})
        resumed = make_trainer(tmp_path, run, method=method, train=train, method_state=state)
        load_adapter_weights(resumed.model, ckpt / "adapter.safetensors")
        resumed.train(resume_from=ckpt)
        got = losses(tmp_path / run)
        assert sorted(got) == list(range(cut + 1, 7))
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
        a, b = adapter_state_dict(full.model), adapter_state_dict(resumed.model)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
        assert resumed.method.state_dict() == taken


def test_a_start_step_past_the_end_is_said_at_the_start(tmp_path, tiny_world):
    """delta_start_step ≥ the run's steps: W never follows, the run is plain LoRA, and lorakit says so."""
    from lorakit.config import recipe_from_dict
    from lorakit.methods import build_method
    from tests.helpers_cli import invoke
    from tests.tiny_run import tiny_recipe, write_recipe

    method = build_method(recipe_from_dict({"method": {"name": "delta_lora", "lora_dropout": 0}}).method)
    assert "past the end of this run (40 steps)" in method.schedule_warnings(40)[0]  # default K = 500
    assert method.schedule_warnings(502) == [] and method.schedule_warnings(501) != []
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", train={"max_steps": 2},
                                                           method={"name": "delta_lora", "lora_dropout": 0}))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "warning: method.delta_start_step 500 is past the end of this run (2 steps)" in result.stderr
