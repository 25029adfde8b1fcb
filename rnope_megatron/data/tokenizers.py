"""Tokenizers: a built-in byte-level one and a Hugging Face ``tokenizer.json``.

Both expose what Megatron's GPTDataset and our tools need: ``vocab_size``, ``eod``,
``tokenize`` (a list of ids), ``tokenize_array`` (a compact numpy array, for streaming
large documents) and ``detokenize``."""

from __future__ import annotations

import pathlib
from typing import Iterable

import numpy

EOD_BYTES = 256


class ByteTokenizer:
    """Bytes as tokens: id = byte value, 256 = end of document. Vocab 257."""

    vocab_size = 257
    eod = EOD_BYTES
    # No padding token: packed pretraining samples are never padded. An id outside the
    # vocabulary keeps Megatron from treating EOD as padding (it would warn and do this).
    pad = -1
    # Megatron's dataset cache key includes the tokenizer's identity.
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 257}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> numpy.ndarray:
        # One byte per token until the caller widens it: no Python int per token.
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (fast tokenizers library, installed with the
    ``hf`` extra)."""

    END_OF_DOCUMENT = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<EOS_TOKEN>")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"tokenizer {path}: reading a tokenizer.json needs the 'tokenizers' package "
                             "(pip install 'rnope-megatron[hf]')") from None
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises plain Exception on a bad file
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from None
        self.vocab_size = self._tok.get_vocab_size()
        vocab = self._tok.get_vocab()
        eod = next((vocab[t] for t in self.END_OF_DOCUMENT if t in vocab), None)
        if eod is None:
            raise ValueError(f"{path}: no end-of-document token found (looked for {', '.join(self.END_OF_DOCUMENT)})")
        self.eod, self.pad = eod, -1  # see ByteTokenizer.pad
        self.unique_identifiers = {"class": "HFTokenizer", "path": str(path), "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_array(self, text: str) -> numpy.ndarray:
        return numpy.asarray(self.tokenize(text), dtype=numpy.int64)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def make_tokenizer(spec: str):
    """``bytes`` or the path of a ``tokenizer.json``."""
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
