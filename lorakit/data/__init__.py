"""Data for lorakit: load a source into a held-out split (:func:`load_raw`), then tokenize it for the
model's tokenizer (:func:`tokenize`). Two phases because a classification model needs the number of
labels before it loads, and tokenization needs the tokenizer.
"""

from lorakit.data.collate import Collator, pack
from lorakit.data.encode import DataBundle, encode_chat, tokenize
from lorakit.data.raw import BUILTINS, RawData, load_raw

__all__ = ["BUILTINS", "Collator", "DataBundle", "RawData", "encode_chat", "load_raw", "pack", "tokenize"]
