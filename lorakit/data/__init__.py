"""Data for lorakit: load a source, or mix several (:func:`load_raw`), into a held-out split, then
tokenize it for the model's tokenizer (:func:`tokenize`). Two phases because a classification model
needs the number of labels before it loads, and tokenization needs the tokenizer.
"""

from lorakit.data.collate import Collator, pack
from lorakit.data.encode import DataBundle, encode_chat, tokenize
from lorakit.data.mix import load_raw
from lorakit.data.raw import BUILTINS, RawData

__all__ = ["BUILTINS", "Collator", "DataBundle", "RawData", "encode_chat", "load_raw", "pack", "tokenize"]
