"""LoRA-drop: importance against independent math, selection rule, sharing, merge, checkpoints, Trainer."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lorakit.config import recipe_from_dict
from lorakit.errors import LorakitError, RecipeError
from lorakit.methods.lora_drop_select import choose_kept, sample_indices
from lorakit.storage.checkpoint import adapter_state_dict, load_adapter_weights, read_checkpoint_meta
from tests.helpers import pad_collate, toy_data
from tests.methods import harness as H
from tests.train.test_loop import losses, make_trainer

KINDS = ["llama", "gpt2", "bert"]
CFG = {"name": "lora_drop", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
SEL = {**CFG, "sample_fraction": 1.0, "selection_epochs": 0, "threshold": 0.9}


def selection_for(layers, kept):
    """A selection built by the test's own grouping: non-kept modules grouped by (in, out)."""
    groups = {}
    for name, layer in layers.items():
        if name not in kept:
            groups.setdefault((layer.in_features, layer.out_features), []).append(name)
    return {"scores": {n: 1.0 for n in layers}, "importance": {n: 1 / len(layers) for n in layers},
            "kept": list(kept), "threshold": 0.9,
            "shared_groups": [{"in": i, "out": o, "modules": m} for (i, o), m in groups.items()]}


def make_selected(kind, seed=0):
    model, method = H.make(kind, CFG, seed=seed)
    names = list(method.layers)
    method.apply_selection(selection_for(method.layers, names[::3]))  # every third module keeps its own
    return model, method


def set_known_adapters(layers, factors, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3 * factors.get(name, 1.0))


def expected_scores(model, layers, data, use_mask=True):
    """Σ over non-padding tokens (all tokens without ``use_mask``) of ‖s·ΔW x‖² in float64, inputs captured by the test's own hooks."""
    captured = {n: [] for n in layers}
    handles = [l.register_forward_hook(lambda m, i, o, n=n: captured[n].append(i[0].detach().clone())) for n, l in layers.items()]
    masks = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), 5):
            batch = pad_collate(data[start:start + 5])
            masks.append(batch["attention_mask"])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    out = {}
    for name, layer in layers.items():
        dw = layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double()).detach()
        total = 0.0
        for x, mask in zip(captured[name], masks):
            sq = (x.double() @ dw.T).pow(2).sum(-1)
            total += float((sq * mask.double()).sum() if use_mask and sq.shape == mask.shape else sq.sum())
        out[name] = total
    return out


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_importance_equals_independent_math_and_kept_set(tmp_path, kind):
    t = make_trainer(tmp_path, method=SEL, kind=kind, train={"precision": "fp32"})  # vs fp64 math at 1e-4
    names = list(t.method.layers)
    # q/k outputs only steer softmax weights, so scaling them does not inflate other modules' inputs
    big = [n for n in names if n.endswith(("q_proj", "query"))][:1] + [n for n in names if n.endswith(("k_proj", "key"))][-1:]
    tiny = names[-2:]
    factors = {**{n: 100.0 for n in big}, **{n: 0.01 for n in tiny}}
    set_known_adapters(t.method.layers, factors)
    want = expected_scores(t.model, t.method.layers, t.data.train)
    t.method.prepare(t.context())
    got = t.method.selection["scores"]
    assert set(got) == set(names)
    for name in names:
        assert got[name] == pytest.approx(want[name], rel=1e-4), name
    order = sorted(want, key=lambda n: -want[n])
    total, cum, kept = sum(want.values()), 0.0, []
    for name in order:
        kept.append(name)
        cum += want[name] / total
        if cum >= 0.9:
            break
    assert t.method.selection["kept"] == kept
    assert set(kept) == set(big)  # by construction (×100 in B → ×10⁴ in g)

def test_importance_excludes_padding(tmp_path):
    t = make_trainer(tmp_path, method=SEL, train={"precision": "fp32"})  # vs fp64 math at 1e-4
    set_known_adapters(t.method.layers, {})
    want = expected_scores(t.model, t.method.layers, t.data.train)
    unmasked = expected_scores(t.model, t.method.layers, t.data.train, use_mask=False)
    t.method.prepare(t.context())
    for name, g in t.method.selection["scores"].items():
        assert unmasked[name] > want[name] * 1.01  # the toy batches carry padding
        assert g == pytest.approx(want[name], rel=1e-4)


def test_choose_kept_rule_and_errors():
    kept, imp = choose_kept({"a": 1.0, "b": 6.0, "c": 3.0, "d": 0.0}, 0.9)
    assert kept == ["b", "c"] and imp["b"] == pytest.approx(0.6)
    assert choose_kept({"a": 1.0, "b": 6.0, "c": 3.0}, 0.6)[0] == ["b"]
    assert choose_kept({"a": 1.0, "b": 6.0, "c": 3.0}, 1.0)[0] == ["b", "c", "a"]
    assert choose_kept({"a": 2.0, "b": 2.0}, 0.5)[0] == ["a"]  # ties keep model order
    with pytest.raises(LorakitError, match="zero"):
        choose_kept({"a": 0.0, "b": 0.0}, 0.9)


def test_stratified_and_random_samples():
    data = [{"input_ids": [1], "labels": y} for y in [0] * 50 + [1] * 30 + [2] * 20]
    idx = sample_indices(data, 0.1, seed=7, stratify=True)
    counts = [sum(data[i]["labels"] == c for i in idx) for c in range(3)]
    assert counts == [5, 3, 2]
    assert idx == sample_indices(data, 0.1, seed=7, stratify=True)
    assert idx != sample_indices(data, 0.1, seed=8, stratify=True)
    lm = toy_data(n_train=40).train
    idx = sample_indices(lm, 0.25, seed=1, stratify=True)  # list labels: a plain random sample
    assert len(idx) == 10 and len(set(idx)) == 10 and all(0 <= i < 40 for i in idx)
    assert sample_indices(lm, 1.0, seed=1, stratify=False) == list(range(40))


@pytest.mark.parametrize("kind", KINDS)
def test_shared_layers_really_share_and_count_formula(kind):
    model, method = make_selected(kind)
    sel = method.selection
    for group in sel["shared_groups"]:
        first = method.layers[group["modules"][0]]
        for name in group["modules"]:
            layer = method.layers[name]
            assert layer.lora_A is first.lora_A and layer.lora_B is first.lora_B
            assert layer.lora_A.weight is first.lora_A.weight
    shapes = [(g["in"], g["out"]) for g in sel["shared_groups"]]
    assert len(shapes) == len(set(shapes))
    kept_mods = [method.layers[n].lora_A for n in sel["kept"]]
    assert len({id(m) for m in kept_mods}) == len(kept_mods)
    r = CFG["r"]
    expected = sum(r * (method.layers[n].in_features + method.layers[n].out_features) for n in sel["kept"])
    expected += sum(r * (i + o) for i, o in shapes)
    assert H.trainable_count(model) - H.head_count(model) == expected
    groups = method.param_groups(model, recipe_from_dict({}).train)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and sum(p.numel() for g in groups for p in g["params"]) == H.trainable_count(model)


def test_shared_gradient_is_sum_over_sharers():
    shared_model, method = make_selected("llama")
    H.randomize_adapters(shared_model)
    plain, plain_method = H.make("llama", {**CFG, "name": "lora"})
    with torch.no_grad():  # the same values, but every module with its own copy
        for name, layer in method.layers.items():
            plain_method.layers[name].lora_A.weight.copy_(layer.lora_A.weight)
            plain_method.layers[name].lora_B.weight.copy_(layer.lora_B.weight)
    for model in (shared_model, plain):
        model(**H.tiny_inputs()).logits.pow(2).mean().backward()
    for group in method.selection["shared_groups"]:
        shared = method.layers[group["modules"][0]]
        for attr in ("lora_A", "lora_B"):
            want = sum(getattr(plain_method.layers[n], attr).weight.grad for n in group["modules"])
            torch.testing.assert_close(getattr(shared, attr).weight.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_forward_after_selection(kind):
    from lorakit.methods.base import AdapterLayer

    model, method = make_selected(kind)
    H.randomize_adapters(model)
    expected = H.logits(model)
    merged = method.merge(copy.deepcopy(model))
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(H.logits(merged), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_roundtrip_rebuilds_sharing(kind, tmp_path):
    model, method = make_selected(kind)
    H.randomize_adapters(model)
    tensors = adapter_state_dict(model)
    assert len(tensors) == len([p for p in model.parameters() if p.requires_grad])  # each shared pair once
    save_file(tensors, str(tmp_path / "a.safetensors"))
    state = json.loads(json.dumps(method.state_dict()))
    fresh, fresh_method = H.make(kind, CFG, seed=0)
    fresh_method.load_state_dict(state)
    load_adapter_weights(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(H.logits(fresh), H.logits(model), rtol=0, atol=0)
    for group in state["selection"]["shared_groups"]:
        first = fresh_method.layers[group["modules"][0]]
        for name in group["modules"]:
            layer = fresh_method.layers[name]
            assert layer.lora_B is first.lora_B and layer.lora_A is first.lora_A
            torch.testing.assert_close(layer.lora_B.weight, method.layers[name].lora_B.weight, rtol=0, atol=0)


def test_selection_naming_unknown_module_is_rejected():
    _, method = H.make("llama", CFG)
    bad = selection_for(method.layers, [])
    bad["shared_groups"][0]["modules"].append("model.layers.9.self_attn.q_proj")
    with pytest.raises(LorakitError, match="does not adapt"):
        method.apply_selection(bad)


def test_config_validation():
    for bad in ({"sample_fraction": 0}, {"sample_fraction": 1.5}, {"threshold": 0}, {"threshold": 1.2},
                {"selection_epochs": -1}, {"selection_batch_size": 0}):
        with pytest.raises(RecipeError):
            recipe_from_dict({"method": {**CFG, **bad}})
    with pytest.raises(RecipeError, match="threshold"):
        recipe_from_dict({"method": {**CFG, "treshold": 0.9}})
    cfg = recipe_from_dict({"method": CFG}).method
    assert (cfg.sample_fraction, cfg.threshold, cfg.reinit, cfg.selection_epochs) == (0.1, 0.9, True, 1)


def test_prepare_via_trainer_writes_selection_and_reinits(tmp_path):
    t = make_trainer(tmp_path, method={**CFG, "sample_fraction": 0.5, "threshold": 0.7})
    base_logits = H.logits(H.TINY_MODELS["llama"](0))
    t.method.prepare(t.context())
    saved = json.loads((tmp_path / "run" / "lora_drop_selection.json").read_text())
    assert saved["sample_size"] == 12 and saved["kept"] and all(v > 0 for v in saved["scores"].values())
    shared = [n for g in saved["shared_groups"] for n in g["modules"]]
    assert sorted(saved["kept"] + shared) == sorted(t.method.layers)
    assert saved == t.method.state_dict()["selection"]
    torch.testing.assert_close(H.logits(t.model), base_logits, rtol=0, atol=1e-6)  # reinit: B = 0 again


def test_resume_continues_identically_without_reselecting(tmp_path, monkeypatch):
    method = {**CFG, "sample_fraction": 0.5, "threshold": 0.6}
    full = make_trainer(tmp_path, "full", method=method)
    full.train()
    expected = losses(tmp_path / "full")
    assert (tmp_path / "full" / "lora_drop_selection.json").is_file()
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step-000003", tmp_path / "cut/checkpoints/step-000003")
    ckpt = tmp_path / "cut/checkpoints/step-000003"
    _, state = read_checkpoint_meta(ckpt)
    resumed = make_trainer(tmp_path, "cut", method=method, method_state=state)
    assert resumed.method.selection["kept"] == full.method.selection["kept"]
    load_adapter_weights(resumed.model, ckpt / "adapter.safetensors")
    monkeypatch.setattr(type(resumed.method), "prepare", lambda self, ctx: pytest.fail("selection redone"))
    resumed.train(resume_from=ckpt)
    got = losses(tmp_path / "cut")
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    assert not (tmp_path / "cut" / "lora_drop_selection.json").exists()


def test_without_reinit_kept_pairs_keep_brief_training(tmp_path):
    t = make_trainer(tmp_path, kind="bert", method={**CFG, "sample_fraction": 0.5, "threshold": 0.5,
                                                   "reinit": False, "selection_batch_size": 3})
    head = t.model.classifier.weight.detach().clone()
    t.method.prepare(t.context())
    sel = t.method.selection
    assert sel["shared_groups"] and sel["sample_size"] == 12  # 3 classes, stratified halves
    for name in sel["kept"]:
        assert t.method.layers[name].lora_B.weight.abs().sum() > 0  # trained, not reset
    for group in sel["shared_groups"]:
        assert t.method.layers[group["modules"][0]].lora_B.weight.abs().sum() == 0  # a fresh shared pair
    assert not torch.equal(t.model.classifier.weight, head)  # the head keeps its brief training too
