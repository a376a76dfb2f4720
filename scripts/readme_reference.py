"""Rewrite the README's recipe reference from the schema (what tests/test_reference.py compares)."""

from pathlib import Path

from lorakit.reference import markdown

BEGIN, END = "<!-- BEGIN lorakit recipe --markdown -->\n", "<!-- END lorakit recipe --markdown -->"

if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + markdown() + text[end:])
