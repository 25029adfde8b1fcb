"""Embedded corpora: real text on every machine without a download (the running Python's
standard library sources), and a synthetic long-context retrieval mix (passkey and
key-value lookups) whose answers can only be predicted by retrieving them."""

from __future__ import annotations

import pathlib
import random
import sysconfig
from typing import Iterator


def stdlib_documents(limit_bytes: int = 4_000_000) -> Iterator[str]:
    """Source files of the running Python's standard library, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= limit_bytes:
            return


# The haystack of the retrieval mix and of ``rnope-eval passkey``.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_needle(key: str) -> str:
    """The sentence that hides a pass key (training mix and ``rnope-eval passkey``)."""
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_question() -> str:
    """What precedes the answer ``" {key}."``."""
    return " What is the pass key? The pass key is"


def key_value_needle(pairs: dict) -> str:
    """Key-value pairs as the training mix and ``rnope-eval niah`` write them."""
    return " " + " ".join(f'"{k}": "{v}",' for k, v in pairs.items()) + " "


def key_value_question(probe: str) -> str:
    """What precedes the answer ``value + '".'``."""
    return f' The value of key "{probe}" is "'


def retrieval_documents(count: int, length: int, seed: int) -> Iterator[str]:
    """Synthetic long-context retrieval: a passkey or key-value pairs buried in filler,
    then the question and answer. The answer is only predictable by retrieving it."""
    rng = random.Random(seed)
    filler = FILLER
    for i in range(count):
        if i % 2 == 0:
            key = str(rng.randrange(10_000, 100_000))
            needle = passkey_needle(key)
            question = f"{passkey_question()} {key}."
        else:
            pairs = {f"{rng.randrange(16**6):06x}": f"{rng.randrange(16**6):06x}" for _ in range(8)}
            needle = key_value_needle(pairs)
            probe = rng.choice(list(pairs))
            question = f'{key_value_question(probe)}{pairs[probe]}".'
        body_len = max(0, length - len(needle) - len(question))
        body = (filler * (body_len // len(filler) + 1))[:body_len]
        cut = rng.randrange(0, body_len + 1)
        yield body[:cut] + needle + body[cut:] + question
