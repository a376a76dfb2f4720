"""lorakit.data.check: the file and row checks on their own (the CLI cases are in tests/bad_inputs/test_data.py)."""

import pytest
from datasets import Dataset

from lorakit.data.check import check_file, keep_good_rows, row_problem
from lorakit.errors import LorakitError

OK = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_a_good_jsonl_and_a_json_document_pass(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (tmp_path / "b.json").write_text('[{"text": "a"},\n {"text": "b"}]')
    check_file("a", tmp_path / "a.jsonl")
    check_file("b", tmp_path / "b.json")


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("a.txt", b"ok\nok\n\xc3\x28\n", "byte 0xc3 on line 3"),
    ("a.json", b'{"text": "a"}\n{"oops"}\n', "line 2 is not valid JSON"),  # JSON lines in a .json
    ("a.csv", b"  \n\n", "empty"),
])
def test_the_line_at_fault_is_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LorakitError, match=message):
        check_file("src", tmp_path / name)


@pytest.mark.parametrize("content, said", [
    (b'{"text": "a"}\n{"text": "b"\n', "line 2 is not valid JSON: the line ends before its JSON value is complete (cut off?)"),
    (b'{"messages": [{"role": "user", "content": "What is th\n', "line 1 is not valid JSON: the line ends before"),
    (b'{"text": "b" "x": 1}\n', "line 1 is not valid JSON: a ',' is missing at column 14 (near 'ext\": \"b\" \"x\": 1}')"),
    (b'{"text": "a\tb"}\n', "line 1 is not valid JSON: a raw tab or line break inside a string"),
])
def test_a_broken_json_line_is_said_plainly(tmp_path, content, said):
    (tmp_path / "a.jsonl").write_bytes(content)
    with pytest.raises(LorakitError) as err:
        check_file(str(tmp_path / "a.jsonl"), tmp_path / "a.jsonl")
    assert str(err.value).startswith(f"data.source '{tmp_path / 'a.jsonl'}': ") and said in str(err.value)
    assert "column 1 " not in str(err.value) and "at at" not in str(err.value)


def test_a_cut_off_json_document_is_said_plainly(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "a"},\n {"text": "b"')
    with pytest.raises(LorakitError, match=r"a.json': not valid JSON: the file ends before its JSON value is complete"):
        check_file(str(tmp_path / "a.json"), tmp_path / "a.json")


def test_row_problems():
    assert row_problem("chat", {"messages": OK}) is None
    assert "role is 'bot'" in row_problem("chat", {"messages": [OK[0], {"role": "bot", "content": "x"}]})
    assert "no assistant" in row_problem("chat", {"messages": OK[:1]})
    assert "output is empty" in row_problem("instruction", {"instruction": "Add.", "input": "", "output": " "})
    assert row_problem("classification", {"text": "x", "label": None}) == "label is missing"


def test_empty_text_is_a_bad_row_counted_when_skipped():
    ds = Dataset.from_dict({"text": ["a b", "", "c d", "  "]})
    with pytest.raises(LorakitError, match=r"row 2: text is empty; expected text \(2 bad rows of 4\)"):
        keep_good_rows(ds, "text", "src", skip=False, notes=[])
    notes = []
    assert keep_good_rows(ds, "text", "src", skip=True, notes=notes)["text"] == ["a b", "c d"]
    assert notes and notes[0].startswith("data.source 'src': skipped 2 bad rows of 4")
    assert row_problem("classification", {"text": None, "label": 1}) == "text is missing; expected text"


def test_bad_rows_are_an_error_unless_skipped_and_counted():
    ds = Dataset.from_dict({"messages": [OK, OK[:1], OK, OK[:1]]})
    with pytest.raises(LorakitError, match=r"row 2: no assistant message.*\(2 bad rows of 4\)"):
        keep_good_rows(ds, "chat", "src", skip=False, notes=[])
    notes = []
    assert len(keep_good_rows(ds, "chat", "src", skip=True, notes=notes)) == 2
    assert notes == ["data.source 'src': skipped 2 bad rows of 4 (data.skip_bad_rows; first: row 2: no assistant "
                     "message; each conversation needs at least one answer to learn)"]
