import copy
import shutil

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.methods import dylora
from lorakit.storage.checkpoint import adapter_state_dict, load_adapter_weights, read_checkpoint_meta
from tests.conftest import tiny_inputs
from tests.methods import harness as H
from tests.train.test_loop import losses, make_trainer

KINDS = ["llama", "gpt2", "bert"]
R = 4
CFG = {"name": "dylora", "r": R, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize("kind", KINDS)
def test_harness_checks(kind, tmp_path):
    H.check_noop_at_init(kind, CFG)
    H.check_merge_equals_forward(kind, CFG)
    H.check_only_adapters_get_grads(kind, {**CFG, "update": "all"}, ("lora_A", "lora_B"))
    H.check_checkpoint_roundtrip(kind, CFG, tmp_path)
    model, method = H.make(kind, CFG)
    expected = sum(R * (layer.in_features + layer.out_features) for layer in method.layers.values())
    assert H.trainable_count(model) - H.head_count(model) == expected


def test_drawn_rank_is_shared_uniform_and_reproducible():
    _, method = H.make("llama", CFG)
    torch.manual_seed(0)
    drawn = []
    for step in range(2000):
        method.before_step(step)
        ranks = {layer.train_rank for layer in method.layers.values()}
        assert ranks == {method.current}
        drawn.append(method.current)
    counts = torch.bincount(torch.tensor(drawn), minlength=R + 1)[1:].double()
    assert counts.sum() == 2000 and (counts > 0).all()
    # each count ~ Binomial(2000, 1/4): mean 500, sd ≈ 19.4; allow 5 sd
    assert (counts - 500).abs().max() < 5 * 19.4, counts
    torch.manual_seed(0)
    again = []
    for step in range(50):
        method.before_step(step)
        again.append(method.current)
    assert again == drawn[:50]


def truncated_lora(kind: str, dylora_model, b: int, rslora: bool):
    """A plain lorakit LoRA of rank b on the same base, holding A[:b] and B[:, :b]."""
    lora, _ = H.make(kind, {**CFG, "name": "lora", "r": b, "use_rslora": rslora})
    state = adapter_state_dict(dylora_model)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if name.endswith("lora_A.weight"):
                param.copy_(state[name][:b])
            elif name.endswith("lora_B.weight"):
                param.copy_(state[name][:, :b])
            elif param.requires_grad:
                param.copy_(state[name])
    return lora


@pytest.mark.parametrize("kind,rslora", [("llama", False), ("gpt2", True)])
def test_forward_at_rank_b_is_a_plain_lora_of_rank_b(kind, rslora):
    model, method = H.make(kind, {**CFG, "use_rslora": rslora})
    H.randomize_adapters(model)
    for b in range(1, R + 1):
        expected = H.logits(truncated_lora(kind, model, b, rslora))
        method.set_rank(b)
        model.eval()
        torch.testing.assert_close(H.logits(model), expected, rtol=0, atol=1e-5)
        method.set_rank(R)
        method.start_step(b)  # training forward at the drawn rank (GPT-2's own dropout stays off)
        for layer in method.layers.values():
            layer.train()
        torch.testing.assert_close(H.logits(model), expected, rtol=0, atol=1e-5)
    layer = next(iter(method.layers.values()))
    layer.set_rank(3)
    assert layer.scaling == pytest.approx(8 / 3**0.5 if rslora else 8 / 3)


@pytest.mark.parametrize("update", ["frozen", "all"])
@pytest.mark.parametrize("fused", [True, False])
def test_training_forward_and_gradients_equal_the_sliced_formula(update, fused, monkeypatch):
    """Forward W0x + s_b·B[:, :b](A[:b]x) and gradients (A, B: only the trained rows/columns; x: all)
    against autograd on the sliced formula, for every b, on the fused addmm path and on the plain one."""
    if not fused:
        monkeypatch.setattr(dylora, "can_fuse", lambda *a: False)
    _, method = H.make("llama", {**CFG, "update": update, "target_modules": ["q_proj"]})
    layer = method.layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.train()
    for b in range(1, R + 1):
        method.start_step(b)
        x = torch.randn(2, 5, layer.in_features, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        A, B = (w.detach().clone().requires_grad_() for w in (layer.lora_A.weight, layer.lora_B.weight))
        ref = layer.base_layer(x2) + (8 / b) * (x2 @ A[:b].T) @ B[:, :b].T
        out = layer(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        (ref * g).sum().backward()
        trained = [b - 1] if update == "frozen" else list(range(b))
        rows = torch.tensor([i in trained for i in range(R)])
        torch.testing.assert_close(layer.lora_A.weight.grad, A.grad * rows[:, None], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight.grad, B.grad * rows[None, :], rtol=1e-4, atol=1e-5)
        assert layer.lora_A.weight.grad[~rows].eq(0).all() and layer.lora_B.weight.grad[:, ~rows].eq(0).all()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
        layer.zero_grad(set_to_none=True)
        method.after_optimizer_step(0, None)


def step_at(model, method, optimizer, b: int, skip_restore: bool = False) -> None:
    method.start_step(b)
    model.train()
    model(**tiny_inputs()).logits.pow(2).mean().backward()
    optimizer.step()
    if not skip_restore:
        method.after_optimizer_step(0, optimizer)
    optimizer.zero_grad(set_to_none=True)


def adapter_params(method):
    return {n: (l.lora_A.weight, l.lora_B.weight) for n, l in method.layers.items()}


@pytest.mark.parametrize("update", ["frozen", "all"])
def test_untrained_rows_are_bit_identical_after_a_step(update):
    model, method = H.make("llama", {**CFG, "update": update})
    H.randomize_adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for b in (1, 2, 3, 4):  # momentum on every row
        step_at(model, method, opt, b)
    some_A = next(iter(adapter_params(method).values()))[0]
    assert (opt.state[some_A]["exp_avg"].abs().sum(dim=1) > 0).all()

    # gradients: frozen -> only row/column b; all -> rows/columns 1..b
    b = 2
    method.start_step(b)
    model(**tiny_inputs()).logits.pow(2).mean().backward()
    trained = [b - 1] if update == "frozen" else list(range(b))
    for A, B in adapter_params(method).values():
        for i in range(R):
            assert (A.grad[i].abs().sum() > 0) == (i in trained)
            assert (B.grad[:, i].abs().sum() > 0) == (i in trained)
    opt.zero_grad(set_to_none=True)

    before = {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in adapter_params(method).items()}
    step_at(model, method, opt, b)
    for name, (A, B) in adapter_params(method).items():
        A0, B0 = before[name]
        for i in range(R):
            if i in trained:
                assert not torch.equal(A[i], A0[i]) and not torch.equal(B[:, i], B0[:, i])
            else:
                assert torch.equal(A[i], A0[i]) and torch.equal(B[:, i], B0[:, i]), (name, i)

    # control: without the restore, AdamW's momentum and decay do move the other rows
    step_at(model, method, opt, b, skip_restore=True)
    A, _ = next(iter(adapter_params(method).values()))
    assert not torch.equal(A[R - 1], before[next(iter(before))][0][R - 1])


def test_restore_with_mixed_dtypes_and_moved_tensors():
    """The flat snapshot groups adapters by dtype and is rebuilt when a tensor's storage changes
    (as after ``model.to(device)``); untrained rows stay bit-identical through both."""
    model, method = H.make("llama", CFG)
    H.randomize_adapters(model)
    first = next(iter(method.layers.values()))
    first.lora_A.double()  # one layer's adapter in float64 (it takes the plain, unfused path)
    first.lora_B.double()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step, b in enumerate((4, 1, 3, 2, 3)):
        if step == 3:
            for p in params:  # new storage under the same Parameter objects
                p.data = p.data.clone()
        before = {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in adapter_params(method).items()}
        step_at(model, method, opt, b)
        for name, (A, B) in adapter_params(method).items():
            A0, B0 = before[name]
            for i in range(R):
                if i != b - 1:
                    assert torch.equal(A[i], A0[i]) and torch.equal(B[:, i], B0[:, i]), (step, name, i)
                else:
                    assert not torch.equal(A[i], A0[i]), (step, name, i)
    assert first.lora_A.weight.dtype == torch.float64 and len(method._snapshots) == 2


def test_merge_at_rank_b_equals_forward_at_rank_b():
    for b in (1, 3):
        model, method = H.make("gpt2", CFG)
        H.randomize_adapters(model)
        method.set_rank(b)
        model.eval()
        expected = H.logits(model)
        merged = method.merge(copy.deepcopy(model))
        torch.testing.assert_close(H.logits(merged), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(expected, H.logits(truncated_lora("gpt2", model, R, False)), atol=1e-3)


def test_rank_validation():
    _, method = H.make("llama", CFG)
    for bad in (0, R + 1, -1):
        with pytest.raises(LorakitError, match="--rank"):
            method.set_rank(bad)
    for bad in ("0,2", "a,b", "", str(R + 1)):
        with pytest.raises(LorakitError, match="--ranks"):
            method.evaluate(lambda: {}, ranks=bad)
    with pytest.raises(LorakitError, match="--rank"):
        method.evaluate(lambda: {}, rank=2, ranks="1,2")


def test_evaluate_at_several_ranks(tmp_path):
    trainer = make_trainer(tmp_path, method={"name": "dylora", "lora_dropout": 0.0})
    H.randomize_adapters(trainer.model)
    method = trainer.method
    result = trainer.evaluate(ranks="1,2,4")
    assert [k for k in result if k.startswith("rank_")] == ["rank_1", "rank_2", "rank_4"]
    assert result["eval_loss"] == result["rank_4"]["eval_loss"]  # default rank r at top level
    assert len({result[f"rank_{b}"]["eval_loss"] for b in (1, 2, 4)}) == 3
    assert method.rank == R
    for b in (1, 2):
        single = trainer.evaluate(rank=b)
        assert single["rank"] == b and single["eval_loss"] == result[f"rank_{b}"]["eval_loss"]
        method.set_rank(b)
        assert trainer.evaluate()["eval_loss"] == result[f"rank_{b}"]["eval_loss"]
    method.set_rank(3)
    every = trainer.evaluate(ranks="all")
    assert sorted(k for k in every if k.startswith("rank_")) == [f"rank_{b}" for b in range(1, R + 1)]
    assert every["eval_loss"] == every["rank_3"]["eval_loss"] and method.rank == 3


def test_resume_continues_identically(tmp_path):
    cfg = {"name": "dylora"}
    full = make_trainer(tmp_path, "full", method=cfg)
    drawn = []
    original = full.method.start_step
    full.method.start_step = lambda b: (drawn.append(b), original(b))
    full.train()
    assert len(set(drawn)) > 1
    expected = losses(tmp_path / "full")
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step-000003", tmp_path / "cut/checkpoints/step-000003")
    ckpt = tmp_path / "cut/checkpoints/step-000003"
    _, state = read_checkpoint_meta(ckpt)
    resumed = make_trainer(tmp_path, "cut", method=cfg, method_state=state)
    load_adapter_weights(resumed.model, ckpt / "adapter.safetensors")
    resumed.train(resume_from=ckpt)
    got = losses(tmp_path / "cut")
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    a, b = adapter_state_dict(full.model), adapter_state_dict(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_eval_rank_below_r_compiles_once_with_no_side_outputs():
    """The rank-b mask of evaluation is built inside the layer's graph: no module-level tensor cache
    (under CUDA graphs a tensor created in one graph and kept outside would be freed or overwritten)."""
    from lorakit.config import recipe_from_dict

    cfg = recipe_from_dict({"method": {**CFG, "r": 7}}).method  # r, b and shapes no other test uses
    layer = dylora.DyLoraLayer(torch.nn.Linear(13, 11), cfg).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.set_rank(5)
    compiled, graphs = H.compile_recording(layer)
    x = torch.randn(3, 13)
    with torch.no_grad():
        first, second = compiled(x), compiled(x)
        eager = layer(x)
    assert len(graphs["forward"]) == 1 and len(H.graph_outputs(graphs["forward"][0])) == 1
    assert "arange" in graphs["forward"][0].code  # the mask is computed in the graph, not a captured constant
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(second, eager)
