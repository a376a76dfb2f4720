"""lorakit.data: sources, format inference, held-out split, loss masking, truncation, packing, collate."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.config import DataConfig
from lorakit.data import Collator, load_raw, pack, tokenize
from lorakit.errors import LorakitError
from tests.helpers_data import make_tiny_tokenizer, tiny_tokenizer  # noqa: F401 - fixture

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


def cfg(source, **kw) -> DataConfig:
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


# ---- built-in sources ----------------------------------------------------------------------------
def test_chatterbot_builtin():
    raw = load_raw(cfg("chatterbot"), "causal_lm", 42)
    assert raw.format == "chat" and raw.label_names is None
    total = len(raw.train) + len(raw.eval)
    assert 2000 <= total <= 2400  # item[0] → item[1] of each conversation: 2,025
    assert len(raw.eval) == round(total * 0.1)
    msgs = raw.train[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] and all(m["content"] for m in msgs)


def test_bbc_news_builtins():
    raw = load_raw(cfg("bbc-news"), "seq_cls", 0)
    assert raw.format == "classification"
    assert raw.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(raw.train) + len(raw.eval) == 2225
    counts = Counter(raw.eval["label"])
    assert len(counts) == 5 and min(counts.values()) >= 15  # stratified: every class held out
    text = load_raw(cfg("bbc-news-text"), "causal_lm", 0)
    assert text.format == "text" and text.train.column_names == ["text"]
    assert len(text.train) + len(text.eval) == 2225


# ---- format inference and errors -----------------------------------------------------------------
@pytest.mark.parametrize("rows,task,expected", [
    (CHAT, "causal_lm", "chat"),
    ([{"instruction": "Add", "input": "2 and 3", "output": "5"}] * 6, "causal_lm", "instruction"),
    ([{"instruction": "Say hi", "output": "hi"}] * 6, "causal_lm", "instruction"),
    ([{"text": "a b c", "label": "x"}, {"text": "d e", "label": "y"}] * 5, "seq_cls", "classification"),
    ([{"text": "a b c", "label": "x"}] * 6, "causal_lm", "text"),
    ([{"text": "the quick brown fox"}] * 6, "causal_lm", "text"),
])
def test_format_inference(tmp_path, rows, task, expected):
    raw = load_raw(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), task, 0)
    assert raw.format == expected
    if expected == "instruction":
        assert raw.train.column_names == ["instruction", "input", "output"]
    if expected == "classification":
        assert raw.label_names == ["x", "y"]


def test_custom_field_names(tmp_path):
    rows = [{"body": f"text {i}", "category": i % 3} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    raw = load_raw(cfg(path, text_field="body", label_field="category"), "seq_cls", 0)
    assert raw.train.column_names == ["text", "label"] and raw.label_names == ["0", "1", "2"]


def test_missing_column_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "tag": "a"}] * 4)
    with pytest.raises(LorakitError, match=r"data.text_field 'body' not in columns \[content, tag\]"):
        load_raw(cfg(path, text_field="body"), "causal_lm", 0)
    with pytest.raises(LorakitError, match=r"data.label_field 'label' not in columns"):
        load_raw(cfg(path, text_field="content"), "seq_cls", 0)
    with pytest.raises(LorakitError, match=r"data.messages_field 'messages' not in columns"):
        load_raw(cfg(path, format="chat"), "causal_lm", 0)


def test_unknown_source_errors(tmp_path, monkeypatch):
    with pytest.raises(LorakitError, match="no such file or folder"):
        load_raw(cfg(tmp_path / "missing.jsonl"), "causal_lm", 0)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = (r"data.source 'someorg/some-data': not a built-in \(chatterbot, bbc-news, bbc-news-text\), "
               r"not a local file, and not loadable from the hub: ")
    with pytest.raises(LorakitError, match=message):
        load_raw(cfg("someorg/some-data"), "causal_lm", 0)


# ---- local files ---------------------------------------------------------------------------------
def test_local_file_kinds(tmp_path):
    rows = [{"text": f"sentence number {i}", "label": "ab"[i % 2]} for i in range(20)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet"):
        raw = load_raw(cfg(tmp_path / name), "seq_cls", 0)
        assert (raw.format, len(raw.train) + len(raw.eval), raw.label_names) == ("classification", 20, ["a", "b"])
    (tmp_path / "d.txt").write_text("first line of text\n\nsecond line\nthird line\n")
    raw = load_raw(cfg(tmp_path / "d.txt"), "causal_lm", 0)
    assert raw.format == "text" and len(raw.train) + len(raw.eval) == 3  # the empty line is dropped
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:10])
    write_jsonl(folder / "b.jsonl", rows[10:])
    raw = load_raw(cfg(folder), "causal_lm", 0)
    assert len(raw.train) + len(raw.eval) == 20


# ---- held-out split ------------------------------------------------------------------------------
def test_split_sizes_and_determinism(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(100)])
    a = load_raw(cfg(path, eval_fraction=0.2), "causal_lm", 7)
    b = load_raw(cfg(path, eval_fraction=0.2), "causal_lm", 7)
    c = load_raw(cfg(path, eval_fraction=0.2), "causal_lm", 8)
    assert (len(a.train), len(a.eval)) == (80, 20)
    assert a.eval["text"] == b.eval["text"] and a.train["text"] == b.train["text"]
    assert a.eval["text"] != c.eval["text"]
    assert set(a.eval["text"]).isdisjoint(a.train["text"])
    capped = load_raw(cfg(path, eval_fraction=0.2, eval_max_examples=5, max_examples=10), "causal_lm", 7)
    assert (len(capped.train), len(capped.eval)) == (10, 5)
    assert capped.eval["text"] == a.eval["text"][:5] and capped.train["text"] == a.train["text"][:10]


# ---- loss masking --------------------------------------------------------------------------------
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


def test_causal_collate_right_pads():
    collate = Collator(pad_token_id=9)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


# ---- packing -------------------------------------------------------------------------------------
def test_packing_layout():
    examples = [list(range(10 * k + 1, 10 * k + 1 + n)) for k, n in enumerate([3, 4, 2, 5, 6])]
    ds = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    packed = pack(ds, max_len=8)
    assert packed["input_ids"] == [examples[0] + examples[1], examples[2] + examples[3], examples[4]]
    assert packed["position_ids"][0] == [0, 1, 2, 0, 1, 2, 3]
    assert packed["labels"][1] == [-100, 22, -100, 32, 33, 34, 35]
    batch = Collator(pad_token_id=0)([packed[0], packed[2]])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0]]
    assert batch["labels"][1].tolist() == [-100, 42, 43, 44, 45, 46, -100]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_matches_unpacked_logits(tmp_path, tiny_tokenizer, attn):
    """transformers 5 derives a block-diagonal causal mask from restarting position_ids (use_cache=False)."""
    raw = load_raw(cfg(write_jsonl(tmp_path / "c.jsonl", CHAT), eval_fraction=0.2), "causal_lm", 0)
    bundle = tokenize(raw, cfg("x", packing=True, max_seq_length=128), tiny_tokenizer, "causal_lm")
    plain = tokenize(raw, cfg("x", max_seq_length=128), tiny_tokenizer, "causal_lm")
    assert bundle.packed and len(bundle.train) < len(plain.train)
    assert sum(len(r["input_ids"]) for r in bundle.train) == sum(len(r["input_ids"]) for r in plain.train)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
    )).eval()
    rows = list(bundle.train)  # all packed rows in one batch: rows of different lengths get padding
    batch = bundle.collate(rows)
    assert max(r["position_ids"].count(0) for r in rows) >= 2  # some row holds several examples
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for b, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            for s, e in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][s:e]])).logits[0]
                torch.testing.assert_close(packed_logits[b, s:e], alone, atol=1e-5, rtol=1e-4)
        # the check is sensitive: with a plain 2-D mask (no block-diagonal) later examples see earlier ones
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        assert not torch.allclose(leaky, packed_logits, atol=1e-3)



def test_collator_pads_to_a_multiple():
    from lorakit.data import Collator

    rows = [{"input_ids": [5] * 3, "labels": [5] * 3}, {"input_ids": [6] * 70, "labels": [6] * 70}]
    batch = Collator(0, pad_to_multiple_of=64)(rows)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum().item() == 73 and (batch["labels"][0, 3:] == -100).all()
    assert Collator(0)(rows)["input_ids"].shape == (2, 70)
    assert Collator(0, pad_to_multiple_of=64, max_width=100)(rows)["input_ids"].shape == (2, 100)  # not past max
