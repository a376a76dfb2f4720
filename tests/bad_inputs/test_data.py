"""Bad data files: one line naming the file (and the line or row) and what was expected, exit 1, before
any tokenizer or model loads, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.bad_inputs.corpus import check_fails, no_model  # noqa: F401 (fixture)
from tests.tiny_run import tiny_recipe, tiny_world  # noqa: F401 (fixture)

USER = {"role": "user", "content": "Say hello."}
ANSWER = {"role": "assistant", "content": "Hello."}


def jsonl(rows: list) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def chat(n: int = 8, bad: dict | None = None) -> str:
    rows = [{"messages": [USER, ANSWER]} for _ in range(n)]
    rows[2:3] = [bad] if bad is not None else rows[2:3]
    return jsonl(rows)


TEXTS = [{"text": f"w{i} w{i + 1} w{i + 2}"} for i in range(8)]
HUMAN = {"from": "human", "value": "Say hello."}
SHARE = {"conversations": [HUMAN, {"from": "gpt", "value": "Hello."}]}

# (id, file name, content (str or bytes), data fields, exit status, what the line must name)
FILES = [
    ("empty-jsonl", "d.jsonl", "", {}, 1, ("d.jsonl", "empty")),
    ("blank-jsonl", "d.jsonl", "\n\n  \n", {}, 1, ("d.jsonl", "empty")),
    ("empty-csv", "d.csv", "", {"format": "text"}, 1, ("d.csv", "empty")),
    ("empty-txt", "d.txt", "", {"format": "text"}, 1, ("d.txt", "empty")),
    ("broken-line", "d.jsonl", jsonl(TEXTS[:4] + ['{"text": "w1 w2'] + TEXTS[4:]), {"format": "text"}, 1,
     ("d.jsonl", "line 5", "JSON")),
    ("broken-first-line", "d.jsonl", jsonl(["{text: w1}"] + TEXTS), {"format": "text"}, 1, ("line 1", "JSON")),
    ("line-not-object", "d.jsonl", jsonl(TEXTS[:2] + ['["w1", "w2"]'] + TEXTS[2:]), {"format": "text"}, 1,
     ("line 3", "object")),
    ("line-a-string", "d.jsonl", jsonl(TEXTS[:2] + ['"w1 w2"'] + TEXTS[2:]), {"format": "text"}, 1,
     ("line 3", "object")),
    ("latin1-jsonl", "d.jsonl", jsonl(TEXTS[:3]).encode() + b'{"text": "caf\xe9"}\n', {"format": "text"}, 1,
     ("d.jsonl", "UTF-8", "line 4")),
    ("latin1-csv", "d.csv", b"text\nw1 w2\ncaf\xe9 w3\n", {"format": "text"}, 1, ("d.csv", "UTF-8", "line 3")),
    ("latin1-txt", "d.txt", b"w1 w2 w3\n\xff\xfe w4\n", {"format": "text"}, 1, ("d.txt", "UTF-8", "line 2")),
    ("bad-json", "d.json", '{"text": ["w1", ', {"format": "text"}, 1, ("d.json", "JSON")),
    ("binary-parquet", "d.parquet", b"\x00\x01garbage" * 20, {"format": "text"}, 1, "d.parquet"),
    ("ragged-csv", "d.csv", 'text,label\n"w1 w2",a\n"w3",b,c,d\n', {"format": "text"}, 1, "d.csv"),
    ("unsupported-type", "d.xlsx", "PK", {}, 1, ("d.xlsx", "unsupported")),
    ("one-example", "d.jsonl", jsonl(TEXTS[:1]), {"format": "text"}, 1, ("1 usable", "at least 2")),
    ("text-empty", "d.jsonl", jsonl(TEXTS[:3] + [{"text": " "}] + TEXTS[3:]), {"format": "text"}, 1,
     ("d.jsonl", "row 4: text is empty", "skip_bad_rows")),
    ("text-null", "d.jsonl", jsonl(TEXTS[:3] + [{"text": None}] + TEXTS[3:]), {"format": "text"}, 1,
     ("row 4: text is missing", "skip_bad_rows")),
    ("text-field-missing", "d.jsonl", jsonl([{"body": "w1 w2"}] * 4), {"format": "text"}, 1,
     ("data.text_field", "[body]")),
    ("chat-field-missing", "d.jsonl", jsonl(TEXTS), {"format": "chat"}, 1, "data.messages_field"),
    ("chat-not-a-list", "d.jsonl", chat(bad={"messages": "Say hello."}), {"format": "chat"}, 1,
     ("row 3", "list")),
    ("chat-wrong-role", "d.jsonl", chat(bad={"messages": [USER, {"role": "bot", "content": "Hi."}]}),
     {"format": "chat"}, 1, ("row 3", "'bot'", "assistant")),
    ("chat-no-content", "d.jsonl", chat(bad={"messages": [USER, {"role": "assistant"}]}), {"format": "chat"}, 1,
     ("row 3", "content")),
    ("chat-content-number", "d.jsonl", chat(bad={"messages": [USER, {"role": "assistant", "content": 5}]}),
     {"format": "chat"}, 1, ("row 3", "content")),
    ("chat-no-answer", "d.jsonl", chat(bad={"messages": [USER]}), {"format": "chat"}, 1, ("row 3", "assistant")),
    ("chat-sharegpt-roles", "d.jsonl",
     jsonl([{"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}]}] * 6),
     {"format": "chat"}, 1, ("row 1", "'human'")),
    ("chat-message-a-string", "d.jsonl", chat(bad={"messages": ["Say hello.", "Hello."]}), {"format": "chat"}, 1,
     ("row 3", "role")),
    ("chat-role-a-list", "d.jsonl", chat(bad={"messages": [USER, {"role": ["assistant"], "content": "Hi."}]}),
     {"format": "chat"}, 1, ("row 3", "messages[1].role", "['assistant']")),
    ("sharegpt-from-a-list", "d.jsonl", jsonl([SHARE] * 4 + [{"conversations": [HUMAN, {"from": ["gpt"], "value": "Hi"}]}]),
     {"format": "sharegpt"}, 1, ("row 5", "conversations[1].from", "['gpt']")),
    ("sharegpt-from-a-mapping", "d.jsonl", jsonl([SHARE] * 4 + [{"conversations": [HUMAN, {"from": {"a": 1}, "value": "Hi"}]}]),
     {"format": "sharegpt"}, 1, ("row 5", "conversations[1].from")),
    ("instruction-no-output", "d.jsonl", jsonl([{"instruction": "Add.", "input": "2 3"}] * 4),
     {"format": "instruction"}, 1, "output"),
    ("instruction-empty-output", "d.jsonl",
     jsonl([{"instruction": "Add.", "output": "5"}] * 3 + [{"instruction": "Add.", "output": ""}] * 2),
     {"format": "instruction"}, 1, ("row 4", "output")),
    ("sharegpt-unknown-from", "d.jsonl", jsonl([SHARE] * 2 + [{"conversations": [HUMAN, {"from": "bot", "value": "Hi"}]}]
                                              + [SHARE] * 5), {"format": "auto"}, 1, ("d.jsonl", "row 3", "conversations[1].from", "'bot'")),
    ("sharegpt-no-gpt", "d.jsonl", jsonl([SHARE] * 4 + [{"conversations": [HUMAN]}] * 2), {"format": "sharegpt"}, 1,
     ("row 5", "no gpt", "2 bad rows of 6")),
    ("sharegpt-value-number", "d.jsonl", jsonl([SHARE] * 4 + [{"conversations": [HUMAN, {"from": "gpt", "value": 5}]}]),
     {"format": "auto"}, 1, ("row 5", "conversations[1].value")),
    ("sharegpt-not-a-list", "d.jsonl", jsonl([SHARE] * 4 + [{"conversations": "Say hello."}]), {"format": "sharegpt"},
     1, ("row 5", "conversations is str")),
    ("sharegpt-and-chat-turns", "d.jsonl", jsonl([SHARE] * 4 + [{"conversations": [USER, ANSWER]}]), {"format": "auto"}, 1,
     ("{role, content} and {from, value}", "data.format")),
    ("brackets-in-name", "[x].jsonl", "", {}, 1, "[x].jsonl"),
]


def _recipe(tmp_path, world: dict, source: str, data: dict, **model) -> object:
    recipe = tiny_recipe(world, tmp_path / "run", data={"source": source, **data})
    recipe["model"].update(model)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("case, name, content, data, code, expect", FILES, ids=[c[0] for c in FILES])
def test_bad_data_file(tmp_path, tiny_world, no_model, case, name, content, data, code, expect):
    file = tmp_path / "data" / name
    file.parent.mkdir()
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = _recipe(tmp_path, tiny_world, str(file), data)
    check_fails(["train", recipe], code, expect, [tmp_path])


CLASSES = [
    ("single-class", [{"text": f"w{i} w{i + 1}", "label": "sport"} for i in range(6)], ("one class", "'sport'")),
    ("mixed-label-types", [{"text": "w1", "label": "a"}, {"text": "w2", "label": 1}] * 3, "label"),
    ("negative-label", [{"text": "w1", "label": -1}, {"text": "w2", "label": 1}] * 3, "label"),
    ("missing-label", [{"text": "w1", "label": "a"}, {"text": "w2", "label": None}, {"text": "w3", "label": "b"}] * 2,
     ("row 2", "label")),
    ("empty-text", [{"text": "w1", "label": "a"}, {"text": "", "label": "b"}, {"text": "w3", "label": "b"}] * 2,
     ("row 2", "text is empty")),
]


@pytest.mark.parametrize("case, rows, expect", CLASSES, ids=[c[0] for c in CLASSES])
def test_bad_classification_data(tmp_path, tiny_world, no_model, case, rows, expect):
    file = tmp_path / "labels.jsonl"
    file.write_text(jsonl(rows))
    recipe = _recipe(tmp_path, tiny_world, str(file), {"format": "classification"}, task="seq_cls")
    check_fails(["train", recipe], 1, expect, [tmp_path])


def test_missing_file_and_folders(tmp_path, tiny_world, no_model):
    recipe = _recipe(tmp_path, tiny_world, str(tmp_path / "nope.jsonl"), {})
    check_fails(["train", recipe], 1, ("nope.jsonl", "no such file"), [tmp_path])
    (tmp_path / "empty").mkdir()
    recipe = _recipe(tmp_path, tiny_world, str(tmp_path / "empty"), {})
    check_fails(["train", recipe], 1, ("empty", "no "), [tmp_path])
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(jsonl(TEXTS))
    (tmp_path / "mixed" / "b.csv").write_text("text\nw1\n")
    recipe = _recipe(tmp_path, tiny_world, str(tmp_path / "mixed"), {})
    check_fails(["train", recipe], 1, ("mixed", "mixes"), [tmp_path])


def test_skipping_bad_chat_rows_is_explicit_and_counted(tmp_path, tiny_world):
    from tests.helpers_cli import invoke

    file = tmp_path / "d.jsonl"
    file.write_text(chat(bad={"messages": [USER, {"role": "bot", "content": "Hi."}]}))
    recipe = _recipe(tmp_path, tiny_world, str(file), {"format": "chat", "skip_bad_rows": True})
    result = invoke("train", recipe, "train.max_steps=1")
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad row of 8" in result.stderr and "row 3" in result.stderr


def test_a_bad_source_of_a_mix_is_named_by_its_place(tmp_path, tiny_world, no_model):
    good = tmp_path / "good.jsonl"
    good.write_text(jsonl([SHARE] * 8))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl(TEXTS[:3] + ['{"text": "w1'] + TEXTS[3:]))
    recipe = _recipe(tmp_path, tiny_world, None, {"format": "auto", "sources": [str(good), {"source": str(bad)}]})
    check_fails(["train", recipe], 1, ("data.sources[1]", "bad.jsonl", "line 4", "JSON"), [tmp_path])
    recipe = _recipe(tmp_path, tiny_world, None, {"format": "auto", "sources": [str(good), str(tmp_path / "no.jsonl")]})
    check_fails(["train", recipe], 1, ("data.sources[1]", "no.jsonl", "no such file"), [tmp_path])
