"""Shared by the data tests: a tiny offline tokenizer (a byte-level BPE with a ChatML chat template),
chat rows, a jsonl writer and a DataConfig maker."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Hello there, how are you today?",
    "I am fine, thank you. What is AI?",
    "Artificial intelligence is the science of making machines that think.",
    "The quick brown fox jumps over the lazy dog.",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (~340 tokens) with ChatML specials; eos = <|im_end|>, pad = <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=340, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


# ---- rows and configs shared by the data tests --------------------------------------------------
CHAT = [
    {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine."}]},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Machines that think."},
        {"role": "user", "content": "And a fox?"},
        {"role": "assistant", "content": "The quick brown fox."},
    ]},
] * 5


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(source, **kw):
    from lorakit.config import DataConfig

    return DataConfig(source=str(source), **kw)


def supervised(ids, labels) -> list[list[int]]:
    """Runs of consecutive supervised (label != -100) token ids."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])

