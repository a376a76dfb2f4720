"""lorakit.data.sharegpt: ShareGPT conversations detected, checked and read as chat rows (loss on the
assistant turns only, through the chat template)."""

from __future__ import annotations

import pytest

from lorakit.data import load_raw, tokenize
from lorakit.data.sharegpt import problem, to_messages, turn_style
from lorakit.errors import LorakitError
from tests.helpers_data import cfg, supervised, tiny_tokenizer, write_jsonl  # noqa: F401 - fixture


def conversation(i: int = 0) -> list[dict]:
    return [{"from": "human", "value": f"What is AI? {i}"}, {"from": "gpt", "value": "Machines that think."},
            {"from": "human", "value": "And a fox?"}, {"from": "gpt", "value": "The quick brown fox."}]


SHAREGPT = [{"conversations": conversation(i)} for i in range(10)]


def test_roles_map_as_llama_factory_and_axolotl():
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "function_call", "value": "C"},
             {"from": "observation", "value": "O"}, {"from": "gpt", "value": "A"}, {"from": "user", "value": "U2"},
             {"from": "assistant", "value": "A2"}, {"from": "tool", "value": "T"}]
    assert [m["role"] for m in to_messages(turns)] == ["system", "user", "assistant", "tool", "assistant", "user",
                                                        "assistant", "tool"]
    assert to_messages(turns)[2] == {"role": "assistant", "content": "C"}
    # role/content keys with ShareGPT role names; a row's system text goes first unless one is there
    assert to_messages([{"role": "human", "content": "U"}, {"role": "gpt", "content": "A"}], "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"}]
    assert to_messages(turns, "other")[0] == {"role": "system", "content": "S"}


def test_turn_style_tells_sharegpt_from_chat():
    assert turn_style([conversation()]) == "sharegpt"
    assert turn_style([[{"role": "user", "content": "x"}]]) == "chat"
    # Arrow gives every row every struct key, as None where a row lacks it
    assert turn_style([[{"from": "human", "value": "x", "role": None, "content": None}]]) == "sharegpt"
    assert turn_style([conversation(), [{"role": "user", "content": "x"}]]) == "mixed"
    assert turn_style([None, "text"]) is None


@pytest.mark.parametrize("turns, system, expected", [
    (None, None, "conversations is missing"),
    ("hello", None, "conversations is str"),
    ([], None, "conversations is list"),
    (["hello"], None, "conversations[0] is a str"),
    ([{"from": "bot", "value": "x"}], None, "conversations[0].from is 'bot'; expected one of system, human"),
    ([{"value": "x"}], None, "conversations[0] has no from"),
    ([{"from": "human", "value": "x"}, {"from": "gpt"}], None, "conversations[1].value is missing"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}], None, "conversations[1].value is int"),
    ([{"from": "human", "value": "x"}], None, "no gpt (assistant) turn"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], 5, "system is a int"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], None, None),
])
def test_row_problems(turns, system, expected):
    found = problem(turns, system)
    assert (found is None) if expected is None else expected in found


def test_auto_detects_sharegpt_and_reads_it_as_chat(tmp_path):
    rows = [{**r, "system": "Be brief." if i % 2 else None} for i, r in enumerate(SHAREGPT)]
    raw = load_raw(cfg(write_jsonl(tmp_path / "s.jsonl", rows), eval_fraction=0.2), "causal_lm", 0)
    assert raw.format == "chat" and raw.train.column_names == ["messages"]
    every = list(raw.train["messages"]) + list(raw.eval["messages"])
    assert sum(m[0]["role"] == "system" for m in every) == 5
    assert all([m["role"] for m in msgs if m["role"] != "system"] == ["user", "assistant"] * 2 for msgs in every)
    # the same turns under another column, or with role/content keys, when the format says sharegpt
    other = [{"dialog": r["conversations"]} for r in SHAREGPT]
    raw = load_raw(cfg(write_jsonl(tmp_path / "o.jsonl", other), messages_field="dialog"), "causal_lm", 0)
    assert raw.format == "chat"
    keyed = [{"messages": [{"role": t["from"], "content": t["value"]} for t in r["conversations"]]} for r in SHAREGPT]
    raw = load_raw(cfg(write_jsonl(tmp_path / "k.jsonl", keyed), format="sharegpt"), "causal_lm", 0)
    assert raw.train[0]["messages"][0]["role"] == "user"


def test_ambiguous_or_missing_columns_are_one_line(tmp_path):
    both = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
             "conversations": conversation()}] * 4
    with pytest.raises(LorakitError, match=r"both 'messages' and 'conversations' columns; set data.messages_field"):
        load_raw(cfg(write_jsonl(tmp_path / "b.jsonl", both)), "causal_lm", 0)
    assert load_raw(cfg(str(tmp_path / "b.jsonl"), messages_field="conversations"), "causal_lm", 0).format == "chat"
    mixed = SHAREGPT[:4] + [{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(LorakitError, match=r"\{role, content\} and \{from, value\} turns; set data.format"):
        load_raw(cfg(write_jsonl(tmp_path / "m.jsonl", mixed)), "causal_lm", 0)
    with pytest.raises(LorakitError, match=r"data.messages_field 'conversations' not in columns \[text\]"):
        load_raw(cfg(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}] * 4), format="sharegpt"), "causal_lm", 0)


def test_bad_rows_named_with_count_or_skipped(tmp_path):
    rows = [dict(r) for r in SHAREGPT]
    rows[3] = {"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}
    rows[6] = {"conversations": [{"from": "human", "value": "x"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LorakitError, match=r"bad.jsonl' row 4: conversations\[1\].from is 'bot'.*\(2 bad rows of 10\)"):
        load_raw(cfg(path), "causal_lm", 0)
    raw = load_raw(cfg(path, skip_bad_rows=True), "causal_lm", 0)
    assert len(raw.train) + len(raw.eval) == 8
    assert raw.notes == [f"data.source '{path}': skipped 2 bad rows of 10 (data.skip_bad_rows; first: row 4: "
                         "conversations[1].from is 'bot'; expected one of system, human, user, gpt, assistant, "
                         "function_call, observation, tool)"]


def test_chat_format_hints_at_sharegpt_roles(tmp_path):
    keyed = [{"messages": [{"role": "human", "content": "x"}, {"role": "gpt", "content": "y"}]}] * 4
    with pytest.raises(LorakitError, match=r"'human'; expected one of .* \(ShareGPT roles: set data.format: sharegpt\)"):
        load_raw(cfg(write_jsonl(tmp_path / "k.jsonl", keyed)), "causal_lm", 0)


def test_loss_only_on_gpt_and_function_call_turns(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is AI?"},
             {"from": "function_call", "value": "fox"}, {"from": "observation", "value": "The lazy dog."},
             {"from": "gpt", "value": "Machines that think."}]
    raw = load_raw(cfg(write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}] * 6)), "causal_lm", 0)
    bundle = tokenize(raw, cfg("x"), tok, "causal_lm")
    for row in list(bundle.train) + list(bundle.eval):
        runs = supervised(row["input_ids"], row["labels"])
        assert [tok.decode(r) for r in runs] == ["fox<|im_end|>", "Machines that think.<|im_end|>"]
        assert "<|im_start|>tool\nThe lazy dog.<|im_end|>" in tok.decode(row["input_ids"])
