"""``lorakit generate`` and ``lorakit chat``: talk to a trained adapter, a merged model or any model.

The target is a run folder or checkpoint (the recipe's base with the adapter attached, no data loaded),
a PEFT LoRA/DoRA adapter folder (its ``base_model_name_or_path`` plus the adapter, via
:mod:`lorakit.methods.peft_import`), or a plain model folder / built-in name / hub id (e.g. a merged folder).
Prompts go through the tokenizer's chat template when it has one (``raw`` sends the text as is).
Generation stops at any end-of-turn token: the generation config's ``eos_token_id`` (one id or a list),
the tokenizer's eos, and ``<|im_end|>``-style tokens in its vocabulary (:func:`stop_token_ids`), so a
chat model whose eos differs from its end-of-turn token still stops. Text streams as it is produced.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from transformers import TextStreamer

from lorakit.config import ModelConfig
from lorakit.data.encode import end_of_turn_ids
from lorakit.device import model_device
from lorakit.errors import LorakitError
from lorakit.models import load_model, load_tokenizer
from lorakit.precision import autocast
from lorakit.session import Checkpoint, PeftFolder, load_session, peft_folder_recipe, run_recipe
from lorakit.storage import checkpoint as ckpt

EXIT_COMMANDS = ("/exit", "/quit")


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False
    seed: int | None = None


class _Stream(TextStreamer):
    """Writes decoded text as it is produced (to the current ``sys.stdout``, so test runners capture it)."""

    def __init__(self, tokenizer, write: Callable[[str], None] | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        out = text + ("\n" if stream_end else "")
        if self.write is not None:
            self.write(out)
        else:
            sys.stdout.write(out)
            sys.stdout.flush()


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: generation config eos (int or list) ∪ tokenizer eos ∪ known end-of-turn tokens."""
    ids = set(end_of_turn_ids(tokenizer))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(int(i) for i in ids)


# ---- loading -------------------------------------------------------------------------------------------
def load_for_generation(target: str, trust_remote_code: bool = False, console=None) -> tuple[torch.nn.Module, object, torch.device, str]:
    """(model in eval mode on its device, tokenizer, device, description) for a run, checkpoint, PEFT
    adapter folder or model, through :func:`lorakit.session.load_session`. Remote code runs only with
    ``trust_remote_code`` (the user's flag), never on a stored recipe's word (:mod:`lorakit.trust`).
    Raises LorakitError for a classification model or an unloadable target."""
    path = Path(target).expanduser()
    try:
        checkpoint = ckpt.resolve_checkpoint(path)
    except ckpt.NoCheckpoint:
        checkpoint = None
    if checkpoint is not None:
        recipe, weights = run_recipe(checkpoint, None, trust_remote_code, console), Checkpoint(checkpoint)
        what = f"{checkpoint} ({recipe.method.name} on {recipe.model.name_or_path})"
    elif (path / "adapter_config.json").is_file():
        recipe, weights = peft_folder_recipe(path), PeftFolder(path)
        what = f"PEFT adapter {path} on {recipe.model.name_or_path}"
    else:  # a plain model: no adapter
        mcfg = ModelConfig(name_or_path=str(target), trust_remote_code=trust_remote_code)
        tokenizer, model, device = load_tokenizer(mcfg), load_model(mcfg), model_device()
        return model.to(device).eval(), tokenizer, device, str(target)
    if recipe.model.task != "causal_lm":
        raise LorakitError(f"{target}: a {recipe.model.task} model classifies, it does not generate text")
    session = load_session(recipe, weights, with_data=False, trust_remote_code=trust_remote_code)
    torch.seed()  # sampling stays random unless --seed (the session seeded the RNG with the recipe's seed)
    return session.model.eval(), session.tokenizer, session.device, what


# ---- generating ----------------------------------------------------------------------------------------
def encode_prompt(tokenizer, messages: list[dict] | str, raw: bool = False) -> torch.Tensor:
    """Input ids ``(1, n)``: chat messages through the chat template (with the generation prompt), or a
    plain string (through the template as one user turn unless ``raw`` or there is no template)."""
    if isinstance(messages, str):
        if raw or not getattr(tokenizer, "chat_template", None):
            return tokenizer(messages, return_tensors="pt")["input_ids"]
        messages = [{"role": "user", "content": messages}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return out["input_ids"]


@torch.no_grad()
def generate_reply(model, tokenizer, device, prompt: list[dict] | str, options: GenerationOptions,
                   raw: bool = False, stream: bool | Callable[[str], None] = True) -> tuple[str, int]:
    """(reply text without special tokens, number of new tokens); streams the text unless ``stream`` is
    False (a callable receives the pieces instead of stdout)."""
    ids = encode_prompt(tokenizer, prompt, raw).to(device)
    kwargs = dict(max_new_tokens=options.max_new_tokens, eos_token_id=stop_token_ids(model, tokenizer),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if options.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        if options.seed is not None:
            torch.manual_seed(options.seed)
    if stream:
        kwargs["streamer"] = _Stream(tokenizer, stream if callable(stream) else None)
    with autocast(device, "bf16" if model.dtype == torch.bfloat16 else "fp32"):  # as loaded (train.precision)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel())


def _fit(model, tokenizer, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """Drop the oldest exchanges (keeping a system prompt) until prompt + reply fit the context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return messages
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    while len(body) > 1 and encode_prompt(tokenizer, head + body).shape[1] + max_new_tokens > limit:
        body = body[2:] if len(body) > 2 else body[1:]
    return head + body


def chat_loop(model, tokenizer, device, options: GenerationOptions, console: Console, system: str | None = None,
              read: Callable[[str], str] = input) -> int:
    """Read user turns until ``/exit`` (or end of input), stream each reply. ``/reset`` clears the
    history. Returns the number of replies. Raises LorakitError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError("this tokenizer has no chat template; use `lorakit generate --raw` for plain text")
    start = [{"role": "system", "content": system}] if system else []
    messages, replies = list(start), 0
    console.print("[dim]/exit to quit, /reset to clear the history[/dim]")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in EXIT_COMMANDS:
            break
        if line == "/reset":
            messages = list(start)
            console.print("[dim]history cleared[/dim]")
            continue
        if not line:
            continue
        messages = _fit(model, tokenizer, messages + [{"role": "user", "content": line}], options.max_new_tokens)
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        reply, _ = generate_reply(model, tokenizer, device, messages, options)
        messages.append({"role": "assistant", "content": reply})
        replies += 1
    return replies
