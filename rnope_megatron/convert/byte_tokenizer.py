"""The built-in byte tokenizer as a Hugging Face ``tokenizer.json``, written next to an
export so that transformers, ``AutoTokenizer`` and tools built on them (lm-evaluation-
harness) read a byte-level model's text exactly as training did: id = UTF-8 byte value,
256 = end of document (``<|endoftext|>``).

It is a BPE model without merges over the 256 byte symbols of the byte-level
pre-tokenizer (GPT-2's printable stand-ins for raw bytes): every byte becomes one token
whose id is its value, and the byte-level decoder maps the stand-ins back to bytes.
"""

from __future__ import annotations

import json
import pathlib

END_OF_DOCUMENT = "<|endoftext|>"


def _byte_symbols() -> dict[int, str]:
    """Byte value -> the printable character the byte-level pre-tokenizer stands it for
    (printable Latin-1 bytes are themselves, the rest are shifted past U+0100 in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return symbols


def write_byte_tokenizer(directory) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in _byte_symbols().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split, no prefix space: the text's bytes in order, nothing added
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_DOCUMENT, special=True)])  # id 256
    directory = pathlib.Path(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_DOCUMENT,
              "pad_token": END_OF_DOCUMENT, "model_max_length": 1 << 30}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
