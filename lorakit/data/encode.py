"""Phase 2: tokenize standardized rows into ``input_ids``/``labels`` with loss only on the answers.

Chat loss masking renders, for each assistant turn, the conversation before it with the generation
prompt and the conversation up to and including it; the tokens between the two lengths are that
turn's answer. Trailing template text after the end-of-turn token (ChatML's ``\\n`` after
``<|im_end|>``) is left out; the end-of-turn token itself is kept, so generation learns to stop.
When a prefix's tokens are not a prefix of the full conversation's (templates that rewrite history),
the character offsets of the rendered text are used instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import zip_longest

import datasets

from lorakit.config import DataConfig
from lorakit.data.collate import IGNORE, Collator, pack
from lorakit.data.raw import RawData, clean_messages, map_batches
from lorakit.errors import LorakitError

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
NUM_SAMPLES = 3


@dataclass
class DataBundle:
    train: datasets.Dataset  # tokenized: input_ids, labels (and position_ids when packed)
    eval: datasets.Dataset  # tokenized, never packed
    collate: Callable[[list[dict]], dict]
    format: str
    label_names: list[str] | None
    sample_prompts: list  # chat (and instruction with a chat template): message lists; else strings
    sample_references: list[str]
    packed: bool = False  # train rows are packed: call the model with use_cache=False
    pad_token_id: int = 0
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what tokenizing left out, for one console line each

    def eval_by_source(self) -> dict[str, datasets.Dataset]:
        """A mix's held-out rows of each source, in ``data.sources`` order; {} for one source."""
        out, start = {}, 0
        for name, count in self.stats.get("eval_sources", {}).items():
            out[name], start = self.eval.select(range(start, start + count)), start + count
        return out


# ---- token helpers -------------------------------------------------------------------------------
def _ids(out) -> list[int]:
    """input ids from whatever ``apply_chat_template``/``__call__`` returned (list, dict, BatchEncoding, tensor)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def _render(tok, messages: list[dict], generation_prompt: bool, tokenize: bool = True):
    out = tok.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=generation_prompt)
    return _ids(out) if tokenize else out


def end_of_turn_ids(tok) -> set[int]:
    vocab = tok.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _trim_to_end_of_turn(ids: list[int], start: int, end: int, eot: set[int]) -> int:
    """``end`` moved back to just after the last end-of-turn token in ``ids[start:end]`` (if any)."""
    for j in range(end - 1, start - 1, -1):
        if ids[j] in eot:
            return j + 1
    return end


def _spans_by_offsets(tok, messages: list[dict], turns: list[int]) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Answer token spans from character offsets of the rendered text (fallback); None if impossible."""
    text = _render(tok, messages, False, tokenize=False)
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    spans = []
    for i in turns:
        before = _render(tok, messages[:i], True, tokenize=False) if i else ""
        upto = _render(tok, messages[: i + 1], False, tokenize=False)
        if not (text.startswith(before) and text.startswith(upto)):
            return None
        toks = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a >= len(before) and b <= len(upto) and b > a]
        if toks:
            spans.append((toks[0], toks[-1] + 1))
    return _ids(enc), spans


def encode_chat(tok, messages: list[dict], eot: set[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are -100 except on assistant answers + end of turn."""
    full = _render(tok, messages, False)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    spans = []
    for i in turns:
        before = _render(tok, messages[:i], True) if i else []
        upto = full if i == len(messages) - 1 else _render(tok, messages[: i + 1], False)
        if full[: len(before)] != before or full[: len(upto)] != upto:
            spans = None
            break
        spans.append((len(before), len(upto)))
    if spans is None:
        found = _spans_by_offsets(tok, messages, turns)
        if found is None:
            return full, [IGNORE] * len(full)
        full, spans = found
    labels = [IGNORE] * len(full)
    for start, end in spans:
        end = _trim_to_end_of_turn(full, start, end, eot)
        labels[start:end] = full[start:end]
    last_end = spans[-1][1] if spans else 0
    if spans and not any(t in eot for t in full[spans[-1][0]: last_end]) and tok.eos_token_id is not None:
        full, labels = full[:last_end] + [tok.eos_token_id], labels[:last_end] + [tok.eos_token_id]
    return full, labels


def instruction_messages(row: Mapping) -> list[dict]:
    user = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def alpaca_prompt(row: Mapping) -> str:
    text = f"### Instruction:\n{row['instruction'].strip()}\n\n"
    if row["input"].strip():
        text += f"### Input:\n{row['input'].strip()}\n\n"
    return text + "### Response:\n"


def encode_alpaca(tok, row: Mapping) -> tuple[list[int], list[int]]:
    prompt = _ids(tok(alpaca_prompt(row), add_special_tokens=True))
    if len(prompt) > 1 and tok.eos_token_id is not None and prompt[-1] == tok.eos_token_id:
        prompt = prompt[:-1]  # tokenizers that append EOS to every encoding
    answer = _ids(tok(row["output"], add_special_tokens=False))
    answer += [tok.eos_token_id] if tok.eos_token_id is not None else []
    return prompt + answer, [IGNORE] * len(prompt) + answer


def encode_texts(tok, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of whole documents, truncated to ``max_len``; an untruncated document ends with EOS."""
    encoded = tok(texts, add_special_tokens=True, truncation=True, max_length=max_len + 1)["input_ids"]
    return [_end_document(tok, list(ids), max_len) for ids in encoded]


def _end_document(tok, ids: list[int], max_len: int) -> list[int]:
    if len(ids) > max_len:
        return ids[:max_len]
    if tok.eos_token_id is not None and len(ids) < max_len and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)  # whole document: mark its end (separates packed documents)
    return ids


# ---- samples -------------------------------------------------------------------------------------
def samples(raw: RawData, uses_template: bool) -> tuple[list, list[str]]:
    """Up to 3 held-out prompts for sample generations and their reference answers."""
    prompts, refs = [], []
    for row in raw.eval:
        if len(prompts) == NUM_SAMPLES:
            break
        if raw.format == "chat":
            msgs = clean_messages(row["messages"]) or []
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last:  # an answer with at least one message before it
                prompts.append(msgs[:last])
                refs.append(str(msgs[last]["content"]))
        elif raw.format == "instruction":
            prompts.append(instruction_messages(row)[:1] if uses_template else alpaca_prompt(row))
            refs.append(row["output"])
        elif raw.format == "text":
            words = row["text"].split()
            if len(words) >= 4:
                cut = min(32, len(words) // 2)
                prompts.append(" ".join(words[:cut]))
                refs.append(" ".join(words[cut: cut + 64]))
    return prompts, refs


# ---- tokenize ------------------------------------------------------------------------------------
def _encoder(raw: RawData, tok, max_len: int, uses_template: bool) -> Callable[[dict], dict]:
    eot = end_of_turn_ids(tok)

    def encode(batch: dict) -> dict:
        if raw.format == "classification":
            ids = tok(batch["text"], truncation=True, max_length=max_len)["input_ids"]
            return {"input_ids": ids, "labels": [int(label) for label in batch["label"]]}
        if raw.format == "text":
            ids = encode_texts(tok, batch["text"], max_len)
            return {"input_ids": ids, "labels": [list(x) for x in ids]}
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            if raw.format == "chat":
                ids, labels = encode_chat(tok, clean_messages(row["messages"]) or [], eot)
            elif uses_template:
                ids, labels = encode_chat(tok, instruction_messages(row), eot)
            else:
                ids, labels = encode_alpaca(tok, row)
            ids, labels = ids[:max_len], labels[:max_len]
            if any(t != IGNORE for t in labels[1:]):  # else the answer was truncated away: nothing to learn
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out

    return encode


def _samples(parts: list[RawData], uses_template: bool) -> tuple[list, list[str]]:
    """Sample prompts and references, taking from each source in turn (a mix)."""
    each = [samples(part, uses_template) for part in parts if part.format != "classification"]
    pairs = [pair for row in zip_longest(*(list(zip(*s)) for s in each)) for pair in row if pair is not None]
    return [p for p, _ in pairs[:NUM_SAMPLES]], [r for _, r in pairs[:NUM_SAMPLES]]


def tokenize(raw: RawData, cfg: DataConfig, tokenizer, task: str) -> DataBundle:
    """Tokenize ``raw`` for ``task`` (a mix: each source with its own format, then concatenated in the
    order of ``data.sources``); pack the train split when ``cfg.packing`` (causal LM only).

    Raises:
        LorakitError: chat data without a chat template; nothing left to train on after truncation.
    """
    uses_template = bool(getattr(tokenizer, "chat_template", None))
    parts = raw.parts or [raw]
    for part in parts:
        if part.format == "chat" and not uses_template:
            raise LorakitError("data.format chat needs a tokenizer with a chat template (this one has none)"
                               + (f": {part.name}" if raw.parts else ""))
    if cfg.packing and task != "causal_lm":
        raise LorakitError("data.packing needs model.task causal_lm")
    trains, helds = [], []
    for part in parts:
        encode = _encoder(part, tokenizer, cfg.max_seq_length, uses_template)
        trains.append(map_batches(part.train, encode))
        helds.append(map_batches(part.eval, encode))
    train, held = (trains[0], helds[0]) if len(parts) == 1 else (
        datasets.concatenate_datasets([t for t in trains if len(t)] or trains[:1]), datasets.concatenate_datasets(helds))
    stats = {"train_examples": len(train), "eval_examples": len(held),
             "dropped": sum(len(p.train) + len(p.eval) for p in parts) - len(train) - len(held)}
    if raw.parts:
        stats["eval_sources"] = {part.name: len(h) for part, h in zip(parts, helds, strict=True)}
    notes = []
    if stats["dropped"]:
        n_train, n_eval = sum(len(p.train) for p in parts), sum(len(p.eval) for p in parts)
        notes.append(f"data: left out {stats['dropped']} of {n_train + n_eval} examples ({n_train - len(train)} "
                     f"training, {n_eval - len(held)} held-out) whose answer data.max_seq_length={cfg.max_seq_length} "
                     "cut off entirely (no answer token left to learn); a larger data.max_seq_length keeps them")
    if (len(train) == 0 and any(len(p.train) for p in parts)) or len(held) == 0:  # no train rows: evaluation only
        raise LorakitError(f"data: no {'training' if not len(train) else 'held-out'} examples left after "
                           f"tokenizing (answers truncated away? data.max_seq_length={cfg.max_seq_length})")
    if cfg.packing:
        train = pack(train, cfg.max_seq_length)
        stats["train_rows"] = len(train)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else int(pad)
    prompts, refs = _samples(parts, uses_template)
    return DataBundle(
        train=train, eval=held, collate=Collator(pad, classification=raw.format == "classification", max_width=cfg.max_seq_length),
        format=raw.format, label_names=raw.label_names, sample_prompts=prompts, sample_references=refs,
        packed=cfg.packing, pad_token_id=pad, stats=stats, notes=notes,
    )
