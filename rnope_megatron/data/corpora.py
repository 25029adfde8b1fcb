"""Embedded corpora: real text on every machine without a download (the running Python's
standard library sources), and a synthetic long-context retrieval mix (passkey and
key-value lookups) whose answers can only be predicted by retrieving them."""

from __future__ import annotations

import dataclasses
import pathlib
import random
import sysconfig
from typing import Iterator

from rnope_megatron.recipe.sections import RETRIEVAL_TASKS


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


@dataclasses.dataclass(frozen=True)
class RetrievalDocument:
    """One case of the retrieval mix before its haystack is laid: the ``needle`` goes at
    relative ``depth`` of the haystack, then come the ``question``, the ``answer`` (the one
    thing only retrieval predicts) and the ``tail`` closing the document."""

    needle: str
    question: str
    answer: str
    tail: str
    depth: float

    def text(self, haystack: str) -> str:
        cut = round(self.depth * len(haystack))
        return haystack[:cut] + self.needle + haystack[cut:] + self.question + self.answer + self.tail




def retrieval_documents(count: int, seed: int, tasks=RETRIEVAL_TASKS, max_pairs: int = 8) -> Iterator[RetrievalDocument]:
    """Synthetic long-context retrieval cases, taking ``tasks`` in turn: ``passkey`` (a
    5-digit key) and ``key_value`` (``max_pairs`` pairs of 6 hex digits, one of them asked
    for). The haystack is
    the caller's: :mod:`rnope_megatron.data.dataset` fills each case with the repeated
    ``FILLER`` up to exactly one training sequence, as ``rnope-eval passkey`` does up to
    its evaluated length, so an evaluation at the training length is in distribution and
    longer ones differ only in length."""
    rng = random.Random(seed)
    for i in range(count):
        if tasks[i % len(tasks)] == "passkey":
            key = str(rng.randrange(10_000, 100_000))
            yield RetrievalDocument(passkey_needle(key), passkey_question(), f" {key}", ".", rng.random())
        else:
            pairs = {f"{rng.randrange(16**6):06x}": f"{rng.randrange(16**6):06x}" for _ in range(max_pairs)}
            probe = rng.choice(list(pairs))
            yield RetrievalDocument(key_value_needle(pairs), key_value_question(probe), pairs[probe], '".',
                                    rng.random())
