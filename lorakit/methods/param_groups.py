"""Optimizer parameter groups of an adapter method, with LoRA+'s learning-rate ratio.

Groups built by :func:`build_param_groups`, each carrying its own ``lr`` and ``weight_decay`` (a
group's own value overrides the optimizer's default, so a default alone would silently do nothing):

===========  ===========================================  ====================  ===============
group        members (trainable parameters only)          lr                    weight_decay
===========  ===========================================  ====================  ===============
decay        ≥2-D tensors (no LoRA+ ratio)                 lr                    weight_decay
no_decay     1-D tensors (biases, vectors)                 lr, or λ·lr (LoRA+)   0
lr           LoRA+: A matrices and every other ≥2-D tensor lr                    weight_decay
lora_B       LoRA+: ``lora_B`` matrices (ratio params)     λ·lr                  weight_decay
embedding    LoRA+: tensors of adapters on nn.Embedding    loraplus_lr_embedding  weight_decay / 0
===========  ===========================================  ====================  ===============

LoRA+ (Hayou et al. 2024, arXiv 2402.12354, §4; the groups of the reference implementation and of
``peft.optimizers.create_loraplus_optimizer``): λ = ``method.loraplus_lr_ratio`` (A/B methods; :class:`lorakit.methods.config.LoraConfig`).
The ``lora_B`` matrices are the layers' :meth:`~lorakit.methods.layer.AdapterLayer.ratio_parameters`. One deliberate
difference from PEFT's helper: PEFT decays 1-D tensors that are not biases or norms (a DoRA magnitude,
VeRA's vectors) and takes its decay from ``loraplus_weight_decay`` (default 0), ignoring a plain
``weight_decay``; lorakit decays every ≥2-D group by ``train.weight_decay`` and never decays 1-D ones.
"""

from __future__ import annotations

from torch import nn

from lorakit.methods.layer import AdapterLayer

GROUP_ORDER = ("decay", "lr", "lora_B", "no_decay", "embedding")  # the lr-group first: it is logged


def _embedding_adapter_params(model: nn.Module) -> set[int]:
    """ids of the adapter tensors (not the frozen base) of adapter layers that wrap an nn.Embedding."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer) and isinstance(module.base_layer, nn.Embedding):
            base = {id(p) for p in module.base_layer.parameters()}
            ids |= {id(p) for p in module.parameters() if id(p) not in base}
    return ids


def build_param_groups(model: nn.Module, train, loraplus: tuple[float, float] | None = None,
                       ratio_params: list[nn.Parameter] = ()) -> list[dict]:
    """AdamW groups over the trainable parameters of ``model`` (see the module docstring's table).

    ``train``: the recipe's TrainConfig (``learning_rate``, ``weight_decay``); ``loraplus``: (λ, lr of
    adapters on embeddings) or None; ``ratio_params``: the ``lora_B`` matrices, which take λ·lr.

    Returns a list of dicts with ``params``, ``lr``, ``weight_decay`` and ``name``, in the order of
    ``GROUP_ORDER`` (so group 0, whose lr the trainer logs, is at the recipe's lr); empty groups are
    dropped.
    """
    lr, wd = train.learning_rate, train.weight_decay
    ratio, embedding_lr = loraplus if loraplus is not None else (None, None)
    b_side = {id(p) for p in ratio_params}
    groups: dict[str, dict] = {}

    def add(key: str, param: nn.Parameter, group_lr: float, decay: float) -> None:
        groups.setdefault(key, {"params": [], "lr": group_lr, "weight_decay": decay, "name": key})
        groups[key]["params"].append(param)

    embedding = _embedding_adapter_params(model) if ratio is not None else set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2
        decay = wd if is_matrix else 0.0
        if ratio is None:
            add("decay" if is_matrix else "no_decay", param, lr, decay)
        elif id(param) in embedding:
            add("embedding", param, embedding_lr, decay)
        elif not is_matrix:
            add("no_decay", param, lr * ratio, 0.0)
        elif id(param) in b_side:
            add("lora_B", param, lr * ratio, decay)
        else:
            add("lr", param, lr, decay)
    return [groups[key] for key in GROUP_ORDER if key in groups]
