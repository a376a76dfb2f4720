"""Typed recipes: YAML (``yaml.safe_load``) validated into pydantic v2 models.

A recipe has the sections ``model``, ``method``, ``data``, ``train`` and ``output_dir``. The fields of
``method`` are validated by the method's own config class, found in the registry by ``method.name``
(:mod:`lorakit.methods`: the schema imports the registry, never the reverse). Every validation
problem becomes one :class:`RecipeError` line naming the field, the bad value and what is allowed
(unknown keys get the nearest valid name; :mod:`lorakit.recipe_errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorakit.errors import RecipeError
from lorakit.methods import MethodConfig, get_method_class
from lorakit.recipe_errors import format_error, refuse_repeated_keys, yaml_reason

DEFAULT_METHOD = MethodConfig.model_fields["name"].default  # method.name when a recipe leaves it out


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str = Field("smollm2-135m-instruct", description=
        "built-in name (smollm2-135m-instruct, all-minilm-l6-v2), a local model folder, or a hub id")
    task: Literal["causal_lm", "seq_cls"] = Field("causal_lm", description=
        "causal_lm: next-token loss; seq_cls: a classification head (num_labels comes from the data)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=
        "weights of the frozen base; auto follows train.precision (bf16 or fp32)")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model folder (only for models you trust)")
    quantization: Literal["nf4", "fp4", "int8"] | None = Field(None, description=
        "a bitsandbytes 4/8-bit frozen base under any method (QLoRA); null: none")
    gradient_checkpointing: bool = Field(False, description=
        "recompute every decoder layer's activations in backward: least memory, about half the speed "
        "(train.activation_memory_budget is the cheaper switch; docs/benchmarks.md)")
    adapter: str | None = Field(None, description="a PEFT LoRA/DoRA folder whose weights the run starts from")


FORMATS = Literal["auto", "text", "instruction", "chat", "sharegpt", "classification"]


class SourceConfig(Section):
    """one data set of a mix; a field left out (null) takes the data section's value."""

    source: str = Field(description="as data.source: a built-in, a local file or folder, or a hub id")
    weight: float | None = Field(None, gt=0, description=
        "this source's share of the training examples is weight / (sum of the weights); its rows are sampled "
        "(seeded) to that share, repeated when it has fewer; null on every source: each source's rows once")
    format: FORMATS | None = Field(None, description="as data.format; null: data.format")
    split: str | None = Field(None, description="as data.split; null: data.split")
    text_field: str | None = Field(None, description="as data.text_field; null: data.text_field")
    label_field: str | None = Field(None, description="as data.label_field; null: data.label_field")
    messages_field: str | None = Field(None, description="as data.messages_field; null: data.messages_field")
    max_examples: int | None = Field(None, gt=0, description=
        "cap on the rows this source's share is drawn from (after its held-out split); null: no cap")

    @model_validator(mode="before")
    @classmethod
    def _bare_source(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value


class DataConfig(Section):
    source: str | None = Field("chatterbot", description=
        "built-in (chatterbot, bbc-news, bbc-news-text), a local json/jsonl/csv/tsv/parquet/txt file or folder, "
        "or a hub id; null when data.sources mixes several")
    sources: list[SourceConfig] = Field([], description=
        "several data sets mixed by weight, instead of data.source: each {source, weight} and optionally format, "
        "split, text_field, label_field, messages_field, max_examples (data.sources[]); a bare string is "
        "{source: ...}; each source gives its own held-out split")
    format: FORMATS = Field("auto", description=
        "text: loss on every token; instruction: Alpaca columns instruction, input (optional), output, loss on "
        "output only; chat: role/content message lists through the chat template, loss on assistant turns only; "
        "sharegpt: from/value turns (human, gpt, system, function_call, observation, tool) read as chat; "
        "classification: text + label; auto: picked from the columns (and a conversation's keys)")
    split: str = Field("train", description="split of a hub data set to read")
    text_field: str = Field("text", description="column holding the text (text and classification formats)")
    label_field: str = Field("label", description="column holding the class (names or integers 0..n-1)")
    messages_field: str | None = Field(None, description=
        "column holding the conversations (chat, sharegpt); null: messages or conversations, whichever the data "
        "has (both: messages for chat, conversations for sharegpt)")
    max_seq_length: int = Field(512, gt=0, description="tokens per example; longer ones are truncated")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description=
        "held-out share (stratified for classification; of each source with data.sources)")
    eval_max_examples: int | None = Field(None, gt=0, description=
        "cap on held-out examples (of each source with data.sources); null: no cap")
    max_examples: int | None = Field(None, gt=0, description=
        "cap on training examples (with data.sources: on the mix, whose size is otherwise the sources' rows "
        "together); null: no cap")
    packing: bool = Field(False, description="pack short examples into full rows (no attention across examples)")
    skip_bad_rows: bool = Field(False, description=
        "leave out malformed rows (chat messages, empty instruction/output/text, missing label) and print how many; "
        "false: the first one is an error naming it")

    @model_validator(mode="before")
    @classmethod
    def _source_or_sources(cls, value: Any) -> Any:
        """``source`` for one data set, ``sources`` for a mix: not both; ``source`` is null with a mix."""
        if not isinstance(value, dict) or not value.get("sources"):
            return value
        if value.get("source") is not None:
            raise ValueError("data.source and data.sources are both set: use data.source for one data set or "
                             "data.sources for a mix")
        return {**value, "source": None}

    @model_validator(mode="after")
    def _some_source(self) -> "DataConfig":
        if self.source is None and not self.sources:
            raise ValueError("data.source is null and data.sources is empty: name a data source")
        weighted = [i for i, src in enumerate(self.sources) if src.weight is not None]
        if weighted and len(weighted) < len(self.sources):
            unweighted = next(i for i in range(len(self.sources)) if i not in weighted)
            raise ValueError(f"data.sources[{unweighted}] has no weight while data.sources[{weighted[0]}] has one: "
                             "give every source a weight (shares), or none (every row of each source once)")
        return self


class TrainConfig(Section):
    learning_rate: float = Field(2e-4, gt=0, description="peak AdamW learning rate")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    eval_batch_size: int | None = Field(None, gt=0, description="examples per evaluation batch; null: batch_size")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    num_epochs: float = Field(1.0, gt=0, description="passes over the training data (max_steps wins when set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps in all; null: from num_epochs")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps with a linear warmup from 0")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, ge=0, description="clip the gradient norm; null or 0: no clipping")

    @field_validator("max_grad_norm")
    @classmethod
    def _zero_means_off(cls, value: float | None) -> float | None:
        return value or None
    seed: int = Field(42, description="seeds the data order, the adapter's initialization and dropout")
    eval_every: int | None = Field(None, gt=0, description="evaluate every this many steps; null: only before and after")
    save_every: int | None = Field(None, gt=0, description="checkpoint every this many steps; one is always written at the end")
    log_every: int = Field(1, gt=0, description="write a metrics.jsonl record every this many steps")
    # run management (lorakit.train.keep, lorakit.storage.retention)
    save_total_limit: int | None = Field(None, ge=1, description=
        "keep at most this many checkpoints/step-* folders, removing the oldest; the newest and (with "
        "load_best_at_end) the best are always kept; null: keep all")
    metric_for_best: str = Field("eval_loss", description=
        "held-out metric that ranks evaluations for load_best_at_end and early stopping: eval_loss or "
        "perplexity (causal_lm); eval_loss, accuracy or macro_f1 (seq_cls); an eval_ prefix is accepted")
    greater_is_better: bool | None = Field(None, description=
        "whether a larger metric_for_best is better; null: true for accuracy and macro_f1, false for "
        "eval_loss and perplexity")
    load_best_at_end: bool = Field(False, description=
        "an evaluation that beats the best so far also writes a checkpoint; at the end final/ is the best "
        "checkpoint's adapter (needs eval_every)")
    early_stopping_patience: int | None = Field(None, gt=0, description=
        "stop after this many evaluations in a row without an improvement of metric_for_best (needs "
        "eval_every); null: never stop early")
    early_stopping_threshold: float = Field(0.0, ge=0, description=
        "an evaluation improves only when it beats the best by more than this (in the metric's units)")
    num_samples: int = Field(3, ge=0, description=
        "held-out prompts answered before and after training (causal_lm); 0: none")
    # compute precision (lorakit.precision): bf16 = bf16 base + bf16 autocast, fp32 adapter weights;
    # auto = bf16 on CUDA, fp32 on CPU (bf16 on CPU is opt-in: its losses drift past 1e-2 on real models)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description=
        "bf16: bf16 base + autocast, fp32 adapter weights; auto: bf16 on GPU, fp32 on CPU")
    # speed levers (lorakit.fast; docs/benchmarks.md): causal-LM loss without full logits, fused kernels
    cross_entropy: Literal["auto", "chunked", "liger", "full"] = Field("auto", description=
        "causal-LM loss: chunked (no full-vocabulary logits), liger (fused, CUDA), full; docs/benchmarks.md")
    kernels: Literal["auto", "liger", "none"] = Field("auto", description=
        "fused RMSNorm / SwiGLU kernels (liger, CUDA); auto: liger when installed on CUDA")
    # compile: auto = cudagraphs on CUDA unless activation checkpointing is on; cudagraphs = compile + CUDA graphs
    compile: Literal["auto", "cudagraphs"] | bool = Field("auto", description=
        "auto: on GPU, decoder layers compiled and replayed as CUDA graphs (plain compile with accumulation; "
        "none with gradient_checkpointing); cudagraphs; true: plain torch.compile; false")
    activation_memory_budget: float = Field(1.0, gt=0, le=1, description=
        "compiled layers keep at most this fraction of their activations for backward and recompute the "
        "rest (torch.compile's min-cut partitioner picks the cheapest to recompute); 1: keep all")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_choice(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool) or value in ("auto", "cudagraphs"):
            return value
        raise ValueError("expected auto, cudagraphs, true or false")
    optimizer: Literal["auto", "adamw", "paged_adamw"] = Field("auto", description=
        "auto / adamw: torch AdamW (the fused kernel on GPU), also over a 4/8-bit base; paged_adamw: "
        "bitsandbytes' paged AdamW 32-bit (QLoRA's, for memory spikes; slower)")
    distributed: Literal["auto", "ddp", "fsdp"] = Field("auto", description=
        "several processes (torchrun): auto = DDP when more than one process; fsdp = FSDP2, the frozen base "
        "and the adapters sharded over the processes (also on one process); train.batch_size is per process")
    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow"]] = Field([], description=
        "trackers fed the metrics.jsonl records and the recipe (each an extra: pip install 'lorakit[NAME]')")
    project: str = Field("lorakit", description="project (trackio, wandb) or experiment (mlflow) of the tracked run")
    run_name: str | None = Field(None, description="name of the tracked run; null: the output_dir folder's name")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value


# held-out metrics by task, as metrics.jsonl names them (lorakit.evaluate.evaluate_model), and
# whether larger is better
BEST_METRICS = {"causal_lm": {"eval_loss": False, "perplexity": False},
                "seq_cls": {"eval_loss": False, "accuracy": True, "macro_f1": True}}


def best_metric(name: str, task: str) -> str | None:
    """``name`` as metrics.jsonl writes it (``eval_accuracy`` → ``accuracy``), or None if ``task`` has no such metric."""
    allowed = BEST_METRICS[task]
    for candidate in (name, name.removeprefix("eval_"), f"eval_{name}"):
        if candidate in allowed:
            return candidate
    return None


def check_run_management(train: "TrainConfig", task: str) -> None:
    """Cross-field rules of the run-management fields; fills ``metric_for_best`` (the metrics.jsonl name)
    and ``greater_is_better`` (from the metric when null). Raises ValueError with one line naming the fields."""
    name = best_metric(train.metric_for_best, task)
    if name is None:
        raise ValueError(f"train.metric_for_best {train.metric_for_best!r} is not a {task} metric; allowed: "
                         f"{', '.join(BEST_METRICS[task])}")
    if name != train.metric_for_best:
        train.metric_for_best = name
    if train.greater_is_better is None:
        train.greater_is_better = BEST_METRICS[task][name]
    for field, value in (("load_best_at_end", train.load_best_at_end),
                         ("early_stopping_patience", train.early_stopping_patience)):
        if value and not train.eval_every:
            raise ValueError(f"train.{field} needs train.eval_every (evaluations to compare); set "
                             f"train.eval_every, e.g. train.eval_every=20")


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    output_dir: str = Field("runs/default", min_length=1, description=
        "the run folder: metrics.jsonl, summary.json, checkpoints/, final/")

    @field_validator("method", mode="before")
    @classmethod
    def _method_by_name(cls, value: Any) -> Any:
        if isinstance(value, MethodConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError("expected a mapping with at least `name`, e.g. {name: lora, r: 8}")
        if not isinstance(value.get("name", DEFAULT_METHOD), str):
            raise ValueError("method.name must be a method name; see lorakit list-methods")
        method_cls = get_method_class(value.get("name", DEFAULT_METHOD))
        return method_cls.config_class.model_validate(value)

    @model_validator(mode="before")
    @classmethod
    def _method_default_quantization(cls, data: Any) -> Any:
        """A method may need a quantized base (QLoRA): its ``default_quantization`` fills an unset
        ``model.quantization``."""
        if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
            return data
        method = data.get("method", {})
        if not isinstance(method, (dict, MethodConfig)) and method is not None:
            return data  # the method field's own validation reports it
        name = method.name if isinstance(method, MethodConfig) else (method or {}).get("name", DEFAULT_METHOD)
        if not isinstance(name, str):
            return data
        try:
            default = get_method_class(name).default_quantization
        except (RecipeError, TypeError):
            return data  # the method field's own validation reports it
        if default is not None and "quantization" not in data.get("model", {}):
            data = {**data, "model": {**data.get("model", {}), "quantization": default}}
        return data

    @model_validator(mode="after")
    def _task_and_format(self) -> "Recipe":
        if self.model.task == "seq_cls" and self.data.format not in ("auto", "classification"):
            raise ValueError(f"data.format {self.data.format!r} needs model.task causal_lm")
        check_run_management(self.train, self.model.task)
        default = get_method_class(self.method.name).default_quantization
        if default is not None and self.model.quantization is None:
            raise ValueError(f"method {self.method.name} needs a quantized base: set model.quantization to "
                             f"nf4, fp4 or int8 (unset means {default})")
        return self


def parse_value(text: str) -> Any:
    """Parse an override's right-hand side as YAML (``3``, ``1e-4``, ``true``, ``[q_proj, v_proj]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides, e.g. ``train.max_steps=20``. Raises RecipeError."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(part.strip() for part in parts):
            raise RecipeError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, for example train.max_steps=20")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: `{part}` is not a section")
            node = child
        node[parts[-1]] = parse_value(raw)
    return data


def recipe_from_dict(data: dict, origin: str = "recipe") -> Recipe:
    """Validate a recipe mapping. Raises RecipeError with one line naming the field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping with sections model, method, data, train")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_error(err, data, origin, Recipe)) from None
    except RecipeError as err:  # raised inside a validator (an unknown method.name): name the file too
        raise RecipeError(f"{origin}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe with ``yaml.safe_load``, apply overrides, validate.

    Raises:
        RecipeError: the file is missing, is not YAML, or a field is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte {path.read_bytes()[err.start]:#04x} on line {line}); "
                          "save the recipe as UTF-8") from None
    try:
        refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({yaml_reason(err)})") from None
    if data is None or data == {}:
        raise RecipeError(f"{path}: the recipe is empty; it needs at least model, data and output_dir "
                          "(lorakit recipe prints a commented one)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping with sections model, method, data, train")
    origin = f"{path} + command-line overrides" if overrides else str(path)
    return recipe_from_dict(apply_overrides(data, overrides or []), origin=origin)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (what a run folder records as ``recipe.yaml``)."""
    return recipe.model_dump(mode="json", serialize_as_any=True)


def flat_fields(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe mapping as dotted field names, ``{"train.batch_size": 4, ...}`` (as overrides
    name them)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
