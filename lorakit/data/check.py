"""Checks of untrusted data, so a bad file or row is one line naming it instead of a reader's traceback
or a row dropped without a word.

- :func:`check_file`, before a reader sees a local file: it is not empty, it is UTF-8 (json, jsonl, csv,
  tsv, txt), every JSON line parses to an object (jsonl; json written as lines), a parquet file has
  parquet's magic bytes. The line (and byte) at fault is named.
- :func:`keep_good_rows`, after the columns are standardized: every chat row is a list of
  ``{role, content}`` messages with a known role, string content and at least one assistant turn (a
  ShareGPT row the same in its own terms: :func:`lorakit.data.sharegpt.problem`); instruction rows have
  an instruction and an output; text and classification rows have text, classification rows a label (a
  .txt file's blank lines are not rows: :func:`drop_blank_lines`). The first bad
  row is named; with ``data.skip_bad_rows`` bad rows are dropped instead and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from lorakit.data import sharegpt
from lorakit.errors import LorakitError

ROLES = ("system", "user", "assistant", "tool")
TEXT_KINDS = {".json", ".jsonl", ".csv", ".tsv", ".txt"}


def _where(source: str, path: Path) -> str:
    return f"data.source '{source}'" + ("" if Path(source).expanduser() == path else f" ({path.name})")


PLAIN_JSON = {  # json's messages, said plainly
    "Expecting value": "a value is missing",
    "Expecting ',' delimiter": "a ',' is missing",
    "Expecting ':' delimiter": "a ':' is missing",
    "Expecting property name enclosed in double quotes": "a key is not in double quotes",
    "Unterminated string starting at": "a string is not closed",
    "Invalid control character at": "a raw tab or line break inside a string (write \\t or \\n)",
    "Extra data": "more text after the JSON value ends",
}


def json_problem(err: json.JSONDecodeError, unit: str = "line") -> str:
    """What is wrong with a JSON text (one ``unit``: a line, a file), plainly, from json's error: a text
    that ends inside its value says so (cut off); else the fault, its column (and line, for a text of
    several lines) and the text around it."""
    plain = PLAIN_JSON.get(err.msg, err.msg)
    if not err.doc[err.pos:].strip() or err.msg.startswith("Unterminated string"):  # ends inside the value
        return f"the {unit} ends before its JSON value is complete (cut off?)"
    where = f"line {err.lineno}, column {err.colno}" if "\n" in err.doc.rstrip("\r\n") else f"column {err.colno}"
    return f"{plain} at {where} (near {err.doc[max(0, err.pos - 10):err.pos + 10].strip()!r})"


def _check_line(where: str, number: int, line: bytes, json_lines: bool) -> None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LorakitError(f"{where}: not UTF-8 text (byte {line[err.start]:#04x} on line {number}); save the "
                           "file as UTF-8") from None
    if json_lines and text.strip():
        try:
            value = json.loads(text.rstrip("\r\n"))  # the line's end is not part of its JSON
        except json.JSONDecodeError as err:
            raise LorakitError(f"{where}: line {number} is not valid JSON: {json_problem(err)}") from None
        if not isinstance(value, dict):
            raise LorakitError(f"{where}: line {number} is a JSON {type(value).__name__}; each line must be "
                               'one object, e.g. {"text": "..."}')


def _is_json_document(path: Path) -> bool:
    """A .json file holding one JSON document (a list or a mapping), not JSON lines."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).lstrip()
    return head[:1] == b"[" or (head[:1] == b"{" and not _first_line_parses(head))


def _first_line_parses(head: bytes) -> bool:
    try:
        json.loads(head.split(b"\n", 1)[0])
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def check_file(source: str, path: Path) -> None:
    """Raise LorakitError naming ``path`` (and the line) unless it is a readable data file.

    Streams the file once; JSON documents (a .json holding one list or mapping) are parsed whole."""
    where, suffix = _where(source, path), path.suffix.lower()
    if suffix == ".parquet":
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(max(0, path.stat().st_size - 4))
            tail = handle.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise LorakitError(f"{where}: not a parquet file (no PAR1 marker); write it with pandas/pyarrow "
                               "or use jsonl")
        return
    if suffix not in TEXT_KINDS:
        return
    document = suffix == ".json" and _is_json_document(path)
    empty = True
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            _check_line(where, number, line, json_lines=suffix == ".jsonl" or (suffix == ".json" and not document))
            empty = empty and not line.strip()
    if empty:
        raise LorakitError(f"{where}: the file is empty (no rows)")
    if document:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LorakitError(f"{where}: not valid JSON: {json_problem(err, 'file')}") from None


def _chat_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"messages is {type(messages).__name__ if messages is not None else 'missing'}; expected a list of " \
               "{role, content} messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            return f"messages[{i}] has no role; expected {{role, content}} with role one of {', '.join(ROLES)}"
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:  # a list or dict is no role (and unhashable)
            hint = " (ShareGPT roles: set data.format: sharegpt)" if isinstance(role, str) and role in sharegpt.ROLES else ""
            return f"messages[{i}].role is {message['role']!r}; expected one of {', '.join(ROLES)}{hint}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content is {'missing' if message.get('content') is None else type(message['content']).__name__}; expected text"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message; each conversation needs at least one answer to learn"
    return None


def row_problem(fmt: str, row: dict) -> str | None:
    """What is wrong with one standardized row of format ``fmt``, or None."""
    if fmt == "chat":
        return _chat_problem(row["messages"])
    if fmt == "sharegpt":
        return sharegpt.problem(row["conversations"], row.get("system"))
    if fmt in ("text", "classification") and (not isinstance(row.get("text"), str) or not row["text"].strip()):
        text = row.get("text")
        return f"text is {'empty' if isinstance(text, str) else 'missing' if text is None else type(text).__name__}; " \
               "expected text"
    if fmt == "instruction":
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                return f"{key} is empty; expected text"
    if fmt == "classification" and row.get("label") is None:
        return "label is missing"
    return None


def drop_blank_lines(ds: Dataset) -> Dataset:
    """A .txt source's rows without its blank lines (paragraph breaks in a text file, not rows of data)."""
    return ds.filter(lambda r: bool(r["text"].strip()))


def keep_good_rows(ds: Dataset, fmt: str, source: str, skip: bool, notes: list[str]) -> Dataset:
    """``ds`` when every row is good; with ``skip`` the good rows (the count of the others appended to
    ``notes``, which the caller prints).

    Raises LorakitError naming the first bad row (counted from 1) and what was expected."""
    bad = [(i, problem) for i, row in enumerate(ds) if (problem := row_problem(fmt, row)) is not None]
    if not bad:
        return ds
    first = f"row {bad[0][0] + 1}: {bad[0][1]}"
    if not skip:
        raise LorakitError(f"data.source '{source}' {first} ({len(bad)} bad row{'s' if len(bad) > 1 else ''} of "
                           f"{len(ds)}); fix it, or set data.skip_bad_rows: true to leave bad rows out")
    notes.append(f"data.source '{source}': skipped {len(bad)} bad row{'s' if len(bad) > 1 else ''} of {len(ds)} "
                 f"(data.skip_bad_rows; first: {first})")
    drop = {i for i, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in drop])
