"""Several data sets in one recipe, mixed by weight (``data.sources``).

What a mix is:

- every source is loaded as ``data.source`` would load it (:func:`lorakit.data.raw.load_one`), with its
  own ``format``, ``split``, ``text_field``, ``label_field``, ``messages_field`` (left out: the data
  section's) and split into its own training and held-out rows (``data.eval_fraction`` and
  ``data.eval_max_examples`` of each source), so evaluation covers every source; a source's
  ``max_examples`` caps the training rows its share is drawn from;
- the mix has N training examples: the sources' training rows together, or ``data.max_examples`` when
  that is smaller;
- source i gets ``N · w_i / Σw`` of them, rounded by largest remainder so that they add up to N: a
  seeded sample of its rows when it has more, every row repeated as often as fits and a seeded
  sample of the rest when it has fewer. Held-out rows are never resampled. Without weights (null on
  every source, the default) the weights are the sources' training rows: each row once, as a
  concatenation (Axolotl's and LLaMA-Factory's default), sampled in proportion when
  ``data.max_examples`` is smaller;
- the trainer then shuffles the whole mix by ``train.seed`` (:mod:`lorakit.data.batches`), so one
  recipe gives the same examples in the same order, and a resumed run continues it.

Sources of different formats mix (each keeps its own loss mask); classification sources must have
the same label set. :func:`datasets.interleave_datasets` is not used: it draws each example's source
at random (shares only approximate) and ``first_exhausted`` stops at a random point, where the counts
here are exact and printed (:func:`mix_line`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from lorakit.config import DataConfig, SourceConfig
from lorakit.data.raw import RawData, load_one, quiet_datasets
from lorakit.errors import LorakitError

INHERITED = ("format", "split", "text_field", "label_field", "messages_field")


def source_config(cfg: DataConfig, src: SourceConfig) -> DataConfig:
    """The single-source data section of ``src``: its fields, the data section's where it leaves one out."""
    update = {"source": src.source, "sources": [], "max_examples": src.max_examples}
    update.update({name: getattr(src, name) for name in INHERITED if getattr(src, name) is not None})
    return cfg.model_copy(update=update)


def shares(weights: list[float], total: int) -> list[int]:
    """Examples per source: ``total · w_i / Σw`` rounded by largest remainder (ties to the earlier
    source), so that they sum to ``total``."""
    if total == 0:
        return [0] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(ds: Dataset, count: int, seed: list[int]) -> Dataset:
    """``count`` rows of ``ds``: a seeded sample without repetition when ``count`` ≤ ``len(ds)``, else every
    row ``count // len(ds)`` times plus a seeded sample of the rest."""
    whole, rest = divmod(count, len(ds)) if len(ds) else (0, 0)
    order = np.random.default_rng(seed).permutation(len(ds))  # seed: [train.seed, index]
    indices = np.concatenate([np.tile(np.arange(len(ds)), whole), order[:rest]])
    return ds.select(indices.tolist())


def _names(sources: list[SourceConfig]) -> list[str]:
    """A short name per source (a file's name, else the source as written), unique within the mix."""
    names = [Path(s.source).name if Path(s.source).expanduser().exists() else s.source for s in sources]
    return [f"{n}[{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _relabel(message: str, index: int, source: str) -> str:
    """A single-source error or note, naming the source by its place in ``data.sources``."""
    own, label = f"data.source '{source}'", f"data.sources[{index}] '{source}'"
    return message.replace(own, label, 1) if message.startswith(own) else f"{label}: {message}"


def mix_line(parts: list[RawData], pools: list[int]) -> str:
    """One line: the sources, how many training examples each gives of the mix and from how many rows."""
    total = sum(len(p.train) for p in parts)
    items = []
    for part, pool in zip(parts, pools, strict=True):
        count = len(part.train)
        drawn = "" if count == pool else f" of {pool:,}" if count < pool else f" from {pool:,}, repeated"
        items.append(f"{part.name} {count:,}{drawn} ({100 * count / max(1, total):.0f}%)")
    held = ", ".join(f"{p.name} {len(p.eval):,}" for p in parts)
    return f"data: {len(parts)} sources, {total:,} training examples: {', '.join(items)}; held out: {held}"


def source_line(raw: RawData, source: str) -> str:
    """One line for a single source, like :func:`mix_line`: what was read, how, and the split, e.g.
    ``data: chat.jsonl (chat, auto-detected), 27 training examples, 3 held out``."""
    name = Path(source).name if Path(source).expanduser().exists() else source
    return (f"data: {name} ({raw.read_as}), {len(raw.train):,} training example{'s' * (len(raw.train) != 1)}, "
            f"{len(raw.eval):,} held out")


def load_mix(cfg: DataConfig, task: str, seed: int, whole_for_eval: bool = False,
             label_names: list[str] | None = None) -> RawData:
    """The sources of ``cfg.sources`` loaded, split and mixed as the module says: a :class:`RawData` whose
    ``parts`` are the sources (each with its share of training rows and its held-out rows) and whose
    first note is :func:`mix_line`.

    Raises:
        LorakitError: any source's error, naming ``data.sources[i]`` and its file; classification
        sources with different label sets; a mix with no training rows.
    """
    parts, pools = [], []
    for index, (src, name) in enumerate(zip(cfg.sources, _names(cfg.sources), strict=True)):
        try:
            part = load_one(source_config(cfg, src), task, seed, whole_for_eval, label_names)
        except LorakitError as err:
            raise LorakitError(_relabel(str(err), index, src.source)) from None
        part.name, part.notes = name, [_relabel(note, index, src.source) for note in part.notes]
        if parts and part.label_names != parts[0].label_names:
            raise LorakitError(f"data.sources[{index}] '{src.source}' has labels {part.label_names}, data.sources[0] "
                               f"'{cfg.sources[0].source}' has {parts[0].label_names}: classification sources "
                               "need the same label set")
        parts.append(part)
        pools.append(len(part.train))
    if not whole_for_eval:
        total = min(sum(pools), cfg.max_examples or sum(pools))
        with quiet_datasets():
            weights = [s.weight for s in cfg.sources] if cfg.sources[0].weight is not None else pools
            for index, (part, count) in enumerate(zip(parts, shares(weights, total),
                                                      strict=True)):
                part.train = draw(part.train, count, [seed % (1 << 64), index])
    notes = [mix_line(parts, pools)] + [note for part in parts for note in part.notes]
    formats = {part.format for part in parts}
    return RawData(train=None, eval=None, format=formats.pop() if len(formats) == 1 else "mixed",
                   label_names=parts[0].label_names, notes=notes, parts=parts)


def load_raw(cfg: DataConfig, task: str, seed: int, whole_for_eval: bool = False,
             label_names: list[str] | None = None, describe: bool = False) -> RawData:
    """``cfg.source`` (:func:`lorakit.data.raw.load_one`; with ``describe``, its first note is
    :func:`source_line`) or the mix of
    ``cfg.sources`` (:func:`load_mix`), untokenized, with its held-out split."""
    if cfg.sources:
        return load_mix(cfg, task, seed, whole_for_eval, label_names)
    raw = load_one(cfg, task, seed, whole_for_eval, label_names)
    if describe and not whole_for_eval:
        raw.notes.insert(0, source_line(raw, cfg.source))
    return raw
