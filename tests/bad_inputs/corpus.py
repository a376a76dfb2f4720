"""The bad-input corpus's harness: run one ``lorakit`` command on a bad input and check that it fails the
way every user error must: the exit status, exactly one line on stderr that names the input, no
traceback, and nothing already written changed (the folders it could touch hashed before and after)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers_cli import clean_error, invoke, tree_hash


def check_fails(args: list, code: int, expect: str | tuple[str, ...], watched: list[Path], input: str | None = None) -> str:
    """Run ``lorakit ARGS``; assert a clean failure with status ``code`` whose line contains ``expect``
    (each of them, when a tuple), and that every folder in ``watched`` is byte for byte as before."""
    before = [tree_hash(p) for p in watched]
    line = clean_error(invoke(*args, input=input), code)
    for part in (expect,) if isinstance(expect, str) else expect:
        assert part in line, (part, line)
    assert [tree_hash(p) for p in watched] == before, f"{args}: changed what was already written"
    return line


def refuse(monkeypatch, module, name: str) -> None:
    """Make ``module.name`` fail the test when called: what must not start for an input refused earlier."""
    def fail(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} was called before the bad input was refused")

    monkeypatch.setattr(module, name, fail)


@pytest.fixture
def no_loading(monkeypatch):
    """For recipe and override errors: no data, tokenizer or model is loaded (lorakit train never gets to
    load the session)."""
    import lorakit.train.run as run

    refuse(monkeypatch, run, "load_session")


@pytest.fixture
def no_model(monkeypatch):
    """For data errors: the data fails before any tokenizer or model loads."""
    import lorakit.session as session

    refuse(monkeypatch, session, "load_base")
