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


def retrieval_documents(count: int, length: int, seed: int) -> Iterator[str]:
    """Synthetic long-context retrieval: a passkey or key-value pairs buried in filler,
    then the question and answer. The answer is only predictable by retrieving it."""
    rng = random.Random(seed)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    for i in range(count):
        if i % 2 == 0:
            key = str(rng.randrange(10_000, 100_000))
            needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
            question = f" What is the pass key? The pass key is {key}."
        else:
            pairs = {f"{rng.randrange(16**6):06x}": f"{rng.randrange(16**6):06x}" for _ in range(8)}
            needle = " " + " ".join(f'"{k}": "{v}",' for k, v in pairs.items()) + " "
            probe = rng.choice(list(pairs))
            question = f' The value of key "{probe}" is "{pairs[probe]}".'
        body_len = max(0, length - len(needle) - len(question))
        body = (filler * (body_len // len(filler) + 1))[:body_len]
        cut = rng.randrange(0, body_len + 1)
        yield body[:cut] + needle + body[cut:] + question
