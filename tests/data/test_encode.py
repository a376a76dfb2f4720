"""lorakit.data.encode: loss masking (chat, instruction, text), truncation, sample prompts."""

from __future__ import annotations

import pytest
import torch

from lorakit.data import load_raw, tokenize
from lorakit.errors import LorakitError
from tests.helpers_data import CHAT, write_jsonl, cfg, supervised, make_tiny_tokenizer, tiny_tokenizer  # noqa: F401 - fixture
from tests.tiny_run import tiny_world  # noqa: F401 - fixture


def test_chat_masking_exactly_answers_and_end_of_turn(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    raw = load_raw(cfg(write_jsonl(tmp_path / "c.jsonl", CHAT), eval_fraction=0.2), "causal_lm", 0)
    bundle = tokenize(raw, cfg("x"), tok, "causal_lm")
    assert bundle.format == "chat"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seen = set()
    for row in bundle.train:
        text = tok.decode(row["input_ids"])
        answers = [a for a in ("I am fine.", "Machines that think.", "The quick brown fox.") if a in text]
        runs = supervised(row["input_ids"], row["labels"])
        expected = [tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in answers]
        assert runs == expected and all(r[-1] == end for r in runs)
        seen.add(len(runs))
    assert seen == {1, 2}  # single- and two-answer conversations both present


def test_chat_labels_stop_before_template_newline(tiny_tokenizer):
    from lorakit.data.encode import encode_chat, end_of_turn_ids

    tok = tiny_tokenizer
    ids, labels = encode_chat(tok, CHAT[0]["messages"], end_of_turn_ids(tok))
    assert tok.decode(ids).endswith("<|im_end|>\n") and labels[-1] == -100
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == "I am fine.<|im_end|>"


def test_chat_offsets_fallback_agrees_with_token_prefixes(tiny_tokenizer, monkeypatch):
    """Templates whose prefixes don't tokenize as prefixes fall back to character offsets: same labels."""
    from lorakit.data import encode

    tok, eot = tiny_tokenizer, encode.end_of_turn_ids(tiny_tokenizer)
    messages = CHAT[1]["messages"]
    expected = encode.encode_chat(tok, messages, eot)
    real_render = encode._render

    def bad_prefix(tok_, msgs, generation_prompt, tokenize=True):  # token prefixes never match
        out = real_render(tok_, msgs, generation_prompt, tokenize)
        return [-1] + out if tokenize and generation_prompt else out

    monkeypatch.setattr(encode, "_render", bad_prefix)
    assert encode.encode_chat(tok, messages, eot) == expected


def test_instruction_with_and_without_chat_template(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}] * 6
    raw = load_raw(cfg(write_jsonl(tmp_path / "i.jsonl", rows)), "causal_lm", 0)
    with_template = tokenize(raw, cfg("x"), tiny_tokenizer, "causal_lm")
    row = with_template.train[0]
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in tiny_tokenizer.decode(row["input_ids"])
    assert supervised(row["input_ids"], row["labels"]) == [tiny_tokenizer("5<|im_end|>")["input_ids"]]
    assert with_template.sample_prompts[0] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]

    plain = make_tiny_tokenizer()
    plain.chat_template = None
    bundle = tokenize(raw, cfg("x"), plain, "causal_lm")
    row = bundle.train[0]
    prompt = "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert plain.decode(row["input_ids"]) == prompt + "5<|im_end|>"
    assert plain.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]) == "5<|im_end|>"
    assert bundle.sample_prompts[0] == prompt and bundle.sample_references[0] == "5"


def test_chat_without_template_is_an_error(tmp_path):
    plain = make_tiny_tokenizer()
    plain.chat_template = None
    raw = load_raw(cfg(write_jsonl(tmp_path / "c.jsonl", CHAT)), "causal_lm", 0)
    with pytest.raises(LorakitError, match="chat template"):
        tokenize(raw, cfg("x"), plain, "causal_lm")


def test_sample_prompts_hold_out_the_answer(tmp_path, tiny_tokenizer):
    raw = load_raw(cfg(write_jsonl(tmp_path / "c.jsonl", CHAT), eval_fraction=0.5), "causal_lm", 0)
    bundle = tokenize(raw, cfg("x"), tiny_tokenizer, "causal_lm")
    assert len(bundle.sample_prompts) == 3 == len(bundle.sample_references)
    for prompt, ref in zip(bundle.sample_prompts, bundle.sample_references):
        assert prompt[-1]["role"] == "user" and ref in ("I am fine.", "The quick brown fox.")


# ---- text, classification, truncation ------------------------------------------------------------
def test_text_and_truncation(tmp_path, tiny_tokenizer):
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long}, {"text": "Hello there"}] * 5)
    raw = load_raw(cfg(path, eval_fraction=0.2), "causal_lm", 0)
    bundle = tokenize(raw, cfg(path, max_seq_length=16), tiny_tokenizer, "causal_lm")
    lengths = sorted({len(r["input_ids"]) for r in bundle.train})
    assert lengths[-1] == 16
    short = next(r for r in bundle.train if len(r["input_ids"]) < 16)
    assert short["labels"] == short["input_ids"]
    assert short["input_ids"][-1] == tiny_tokenizer.eos_token_id  # whole documents end with EOS
    assert bundle.sample_prompts and isinstance(bundle.sample_prompts[0], str)


def test_chat_truncation_drops_examples_without_answer(tmp_path, tiny_tokenizer):
    raw = load_raw(cfg(write_jsonl(tmp_path / "c.jsonl", CHAT)), "causal_lm", 0)
    bundle = tokenize(raw, cfg("x", max_seq_length=30), tiny_tokenizer, "causal_lm")
    # the one-turn chat (29 tokens) fits; the long one's first answer starts after token 30: dropped
    assert bundle.stats["dropped"] == 5 and len(bundle.train) + len(bundle.eval) == 5
    assert len(bundle.notes) == 1 and bundle.notes[0].startswith("data: left out 5 of 10 examples (")
    assert "data.max_seq_length=30 cut off entirely" in bundle.notes[0]
    assert all(len(r["input_ids"]) == 29 and r["labels"][-2] == tiny_tokenizer.eos_token_id for r in bundle.train)
    with pytest.raises(LorakitError, match="max_seq_length=5"):
        tokenize(raw, cfg("x", max_seq_length=5), tiny_tokenizer, "causal_lm")


def test_classification_tokens_and_collate(tmp_path, tiny_tokenizer):
    rows = [{"text": "Hello there " * (i + 1), "label": "ab"[i % 2]} for i in range(20)]
    raw = load_raw(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), "seq_cls", 0)
    bundle = tokenize(raw, cfg("x", max_seq_length=8), tiny_tokenizer, "seq_cls")
    assert bundle.label_names == ["a", "b"] and bundle.sample_prompts == [] == bundle.sample_references
    assert all(len(r["input_ids"]) <= 8 and r["labels"] in (0, 1) for r in bundle.train)
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    assert batch["attention_mask"].sum(1).tolist() == [len(bundle.train[i]["input_ids"]) for i in range(4)]


def test_truncated_answers_are_one_console_line_of_lorakit_train(tmp_path, tiny_world):
    from tests.helpers_cli import invoke
    from tests.tiny_run import tiny_recipe, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", train={"max_steps": 1},
                                                           data={"max_seq_length": 26}))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "left out" in line]
    assert len(lines) == 1 and lines[0].startswith("data: left out 8 of 32 examples (8 training, 0 held-out)")
