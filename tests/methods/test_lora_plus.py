"""LoRA+: LoRA's layer with lr_B = λ·lr_A. Checked against the rules of METHODS.md §2, against PEFT's
``create_loraplus_optimizer`` on the same PEFT-wrapped tiny models, and against Adam's first-step math."""

import copy
import importlib.util

import pytest
import torch

from lorakit.config import TrainConfig, recipe_from_dict
from lorakit.errors import RecipeError
from lorakit.train.optim import build_optimizer
from tests.conftest import TINY_MODELS, tiny_inputs
from tests.methods import harness as H

KINDS = ["llama", "gpt2", "bert"]
CFG = {"name": "lora_plus", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
TRAIN = TrainConfig(learning_rate=1e-3, weight_decay=0.1)
HAS_DORA = importlib.util.find_spec("lorakit.methods.dora") is not None


@pytest.mark.parametrize("kind", KINDS)
def test_noop_merge_grads_roundtrip(kind, tmp_path):
    H.check_noop_at_init(kind, CFG)
    H.check_merge_equals_forward(kind, CFG)
    H.check_only_adapters_get_grads(kind, CFG, ("lora_A", "lora_B"))
    H.check_checkpoint_roundtrip(kind, CFG, tmp_path)


def test_config_default_ratio_and_null_rejected():
    assert recipe_from_dict({"method": {"name": "lora_plus"}}).method.loraplus_lr_ratio == 16
    assert recipe_from_dict({"method": {"name": "lora"}}).method.loraplus_lr_ratio is None
    with pytest.raises(RecipeError, match="loraplus_lr_ratio.*needs a learning-rate ratio"):
        recipe_from_dict({"method": {"name": "lora_plus", "loraplus_lr_ratio": None}})
    with pytest.raises(RecipeError, match="loraplus_lr_ratio"):
        recipe_from_dict({"method": {"name": "lora_plus", "loraplus_lr_ratio": 0}})


def expected_lr_wd(name: str, p: torch.Tensor, ratio: float | None) -> tuple[float, float]:
    """METHODS.md §2, restated: A and other 2-D at lr; B and 1-D at λ·lr; decay for matrices only."""
    lr, wd = TRAIN.learning_rate, TRAIN.weight_decay
    fast = ratio is not None and (p.ndim == 1 or ".lora_B." in name)
    return (lr * ratio if fast else lr), (wd if p.ndim >= 2 else 0.0)


METHODS = [("lora", None), ("lora_plus", 16.0), ("lora", 4.0),
           pytest.param("dora", 8.0, marks=pytest.mark.skipif(not HAS_DORA, reason="lorakit.methods.dora absent"))]


@pytest.mark.parametrize("method,ratio", METHODS)
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_group_lrs_and_weight_decays(method, ratio, kind):
    cfg = {**CFG, "name": method}
    if method != "lora_plus":
        cfg["loraplus_lr_ratio"] = ratio
    model, m = H.make(kind, cfg)
    groups = m.param_groups(model, TRAIN)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(where) == len(trainable) == sum(len(g["params"]) for g in groups)  # each exactly once
    for name, p in trainable:
        assert (where[id(p)]["lr"], where[id(p)]["weight_decay"]) == pytest.approx(expected_lr_wd(name, p, ratio)), name
    assert groups[0]["lr"] == TRAIN.learning_rate  # the logged lr is the recipe's
    if kind == "bert":  # the head: weight at lr with decay, bias 1-D at λ·lr without
        assert where[id(model.classifier.bias)]["weight_decay"] == 0.0
    # the optimizer keeps every group's own settings (no global weight_decay trap)
    opt = build_optimizer(groups, TRAIN, torch.device("cpu"))
    for g, og in zip(groups, opt.param_groups):
        assert (og["lr"], og["weight_decay"]) == (g["lr"], g["weight_decay"])


def _peft_twin(kind: str, model, ratio: float):
    """A PEFT LoRA model of the same tiny base with lorakit's adapter tensors, and PEFT's LoRA+ optimizer."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}[kind]
    peft = get_peft_model(TINY_MODELS[kind](0), LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj", "query", "value"]))
    ours = dict(model.named_parameters())
    names = {}
    with torch.no_grad():
        for pname, p in peft.named_parameters():
            if p.requires_grad:
                name = pname.removeprefix("base_model.model.").replace(".default", "").replace("modules_to_save.", "")
                p.copy_(ours[name])
                names[pname] = name
    opt = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=TRAIN.learning_rate, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=TRAIN.weight_decay)
    return peft, opt, names


def _loss(model, kind):
    out = model(**tiny_inputs()).logits
    return out.float().pow(2).mean() if kind == "llama" else out.float().sin().sum()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_same_groups_outputs_grads_and_step_as_peft(kind):
    ratio = 16.0
    model, m = H.make(kind, {**CFG, "target_modules": ["q_proj", "v_proj"] if kind == "llama" else ["query", "value"]})
    H.randomize_adapters(model)
    peft, peft_opt, names = _peft_twin(kind, model, ratio)
    assert sorted(names.values()) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ours_opt = build_optimizer(m.param_groups(model, TRAIN), TRAIN, torch.device("cpu"))

    def settings(opt, key=lambda p: id(p)):
        return {key(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    by_id = {id(p): n for n, p in model.named_parameters()}
    peft_by_id = {id(p): names[n] for n, p in peft.named_parameters() if n in names}
    assert settings(ours_opt, lambda p: by_id[id(p)]) == settings(peft_opt, lambda p: peft_by_id[id(p)])

    # eval mode: BERT's own dropout would make the two forwards differ
    torch.testing.assert_close(model(**tiny_inputs()).logits, peft(**tiny_inputs()).logits, rtol=0, atol=1e-5)
    _loss(model, kind).backward()
    _loss(peft, kind).backward()
    ours = dict(model.named_parameters())
    for pname, p in peft.named_parameters():
        if pname in names:
            torch.testing.assert_close(ours[names[pname]].grad, p.grad, rtol=1e-4, atol=1e-6)
    ours_opt.step(), peft_opt.step()
    for pname, p in peft.named_parameters():
        if pname in names:
            torch.testing.assert_close(ours[names[pname]], p, rtol=0, atol=1e-6)


def _one_step(model, groups):
    opt = torch.optim.AdamW(groups)
    _loss(model, "bert").backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return before, grads, {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_first_adamw_step_moves_b_lambda_times_as_far():
    """Adam's first step is -lr·g/(|g| + eps) ≈ ±lr per element (plus decoupled decay -lr·wd·p)."""
    ratio, no_wd = 16.0, TrainConfig(learning_rate=1e-3, weight_decay=0.0)
    plain, m_plain = H.make("bert", {**CFG, "name": "lora"})
    plus, m_plus = H.make("bert", CFG)
    H.randomize_adapters(plain), H.randomize_adapters(plus)
    _, grads, d_plain = _one_step(plain, m_plain.param_groups(plain, no_wd))
    _, _, d_plus = _one_step(plus, m_plus.param_groups(plus, no_wd))
    for name, g in grads.items():
        fast = ".lora_B." in name or g.ndim == 1
        torch.testing.assert_close(d_plus[name], d_plain[name] * (ratio if fast else 1.0), rtol=1e-5, atol=1e-6)
        big = g.abs() > 1e-5
        torch.testing.assert_close(d_plain[name][big].abs(), torch.full_like(g[big], 1e-3), rtol=1e-2, atol=0)
    # with weight decay: the closed form of AdamW's first step, per parameter, with the group's own lr / wd
    plus, m_plus = H.make("bert", CFG)
    H.randomize_adapters(plus)
    before, grads, delta = _one_step(plus, m_plus.param_groups(plus, TRAIN))
    for name, g in grads.items():
        lr, wd = expected_lr_wd(name, g, ratio)
        expected = -lr * wd * before[name] - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(delta[name], expected, rtol=1e-4, atol=1e-6)
        if g.ndim >= 2:
            assert wd > 0


def test_scheduler_scales_every_group_by_its_own_lr():
    from lorakit.train.optim import build_scheduler

    model, m = H.make("bert", CFG)
    opt = build_optimizer(m.param_groups(model, TRAIN), TRAIN, torch.device("cpu"))
    base = [g["lr"] for g in opt.param_groups]
    assert sorted(set(base)) == [1e-3, 16e-3]
    sched = build_scheduler(opt, "linear", total_steps=6, warmup_steps=2)
    factors = [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]
    for f in factors:
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * f for b in base])
        opt.step(), sched.step()


def test_lora_plus_trains_in_the_trainer(tmp_path):
    from tests.train.test_loop import make_trainer

    t = make_trainer(tmp_path, method={"name": "lora_plus", "lora_dropout": 0.0}, train={"max_steps": 3, "save_every": None})
    before = copy.deepcopy({n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad})
    t.train()
    moved = [n for n, p in t.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and any("lora_B" in n for n in moved)
