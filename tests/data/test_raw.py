"""lorakit.data.raw: sources, format inference, columns, the held-out split."""

from __future__ import annotations

import json
import re
from collections import Counter

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest

from lorakit.data import load_raw
from lorakit.errors import LorakitError
from tests.helpers_data import CHAT, write_jsonl, cfg


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
    named = re.escape(f"data.source '{path}': ")  # the file is named
    with pytest.raises(LorakitError, match=named + r"data.text_field 'body' not in columns \[content, tag\]"):
        load_raw(cfg(path, text_field="body"), "causal_lm", 0)
    with pytest.raises(LorakitError, match=named + r"data.label_field 'label' not in columns"):
        load_raw(cfg(path, text_field="content"), "seq_cls", 0)
    with pytest.raises(LorakitError, match=named + r"data.messages_field 'messages' not in columns"):
        load_raw(cfg(path, format="chat"), "causal_lm", 0)
    with pytest.raises(LorakitError, match=named + r"instruction column 'instruction' not in columns"):
        load_raw(cfg(path, format="instruction"), "causal_lm", 0)


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
