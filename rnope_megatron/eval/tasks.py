"""Retrieval prompts: passkey and needle-in-a-haystack, built with the recipe's tokenizer.

Every case is ``prompt ids + answer ids`` of exactly the requested length in tokens, with
the needle placed at a relative ``depth`` of the haystack (0 = right at the start, 1 =
just before the question). The needle and question texts are the training retrieval mix's
own (:mod:`rnope_megatron.data.corpora`), so a model trained on that mix knows the format
and the evaluation measures only *how far* it can retrieve.

* ``passkey``: haystack = the repeated filler sentences; needle = a 5-digit pass key;
  answer = the key (5 tokens with the byte tokenizer).
* ``niah``: haystack = real text (the embedded Python standard-library corpus, a
  different stretch per sample); needle = 8 key-value pairs of 6 hex digits; question asks
  for one key's value; answer = that value.

Cases depend only on (task, length, depth, sample index, seed): the same call gives the
same tokens on every rank, in every run, so a training-time gate reads no data order and
touches no global random state (its :class:`random.Random` is its own).
"""

from __future__ import annotations

import dataclasses
import random

from rnope_megatron.data.corpora import (
    FILLER,
    key_value_needle,
    key_value_question,
    passkey_needle,
    passkey_question,
    stdlib_documents,
)
from rnope_megatron.recipe.sections import EVAL_TASKS

TASKS = EVAL_TASKS


@dataclasses.dataclass(frozen=True)
class Case:
    """One retrieval prompt: ``ids`` = prompt followed by the answer (``len(ids)`` is the
    evaluated length); the last ``len(answer)`` ids are the answer."""

    ids: tuple
    answer: tuple
    length: int
    depth: float

    @property
    def prompt_length(self) -> int:
        return len(self.ids) - len(self.answer)


class Haystacks:
    """Token streams to cut haystacks from, tokenized once per tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._filler = None
        self._text = None

    def filler(self, count: int) -> list:
        if self._filler is None or len(self._filler) < count:
            repeats = count // max(1, len(self.tokenizer.tokenize(FILLER))) + 2
            self._filler = self.tokenizer.tokenize(FILLER * repeats)
        return self._filler[:count]

    def text(self, count: int, rng: random.Random) -> list:
        if self._text is None:
            # ~1 MB of real text: room for different 16k-token stretches per sample
            self._text = self.tokenizer.tokenize("\n".join(stdlib_documents(limit_bytes=1_000_000)))
        if count > len(self._text):
            raise ValueError(f"niah: haystack of {count} tokens is longer than the embedded corpus "
                             f"({len(self._text)} tokens)")
        start = rng.randrange(0, len(self._text) - count + 1)
        return self._text[start:start + count]


def _needle_and_question(task: str, rng: random.Random) -> tuple[str, str, str]:
    if task == "passkey":
        key = str(rng.randrange(10_000, 100_000))
        return passkey_needle(key), passkey_question(), f" {key}"
    pairs = {f"{rng.randrange(16**6):06x}": f"{rng.randrange(16**6):06x}" for _ in range(8)}
    probe = rng.choice(list(pairs))
    return key_value_needle(pairs), key_value_question(probe), pairs[probe]


def build_case(task: str, length: int, depth: float, index: int, seed: int, haystacks: Haystacks) -> Case:
    """Case ``index`` of ``task`` at ``length`` tokens with the needle at ``depth``."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    # One stream per (task, length, depth, index): cases do not shift when the grid changes.
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{index}")
    needle, question, answer = _needle_and_question(task, rng)
    tok = haystacks.tokenizer
    needle_ids, question_ids, answer_ids = tok.tokenize(needle), tok.tokenize(question), tok.tokenize(answer)
    room = length - len(needle_ids) - len(question_ids) - len(answer_ids)
    if room < 0:
        raise ValueError(f"length {length} is too short for a {task} prompt "
                         f"(needle, question and answer take {length - room} tokens)")
    hay = haystacks.filler(room) if task == "passkey" else haystacks.text(room, rng)
    cut = round(depth * room)
    ids = tuple(hay[:cut] + needle_ids + hay[cut:] + question_ids + answer_ids)
    return Case(ids=ids, answer=tuple(answer_ids), length=length, depth=depth)


def build_grid(task: str, lengths, depths, samples: int, seed: int, tokenizer) -> dict:
    """``{(length, depth): [Case, ...]}`` with ``samples`` cases per cell."""
    haystacks = Haystacks(tokenizer)
    return {(length, depth): [build_case(task, length, depth, i, seed, haystacks) for i in range(samples)]
            for length in lengths for depth in depths}


def minimum_length(task: str, tokenizer) -> int:
    """The shortest length a prompt of ``task`` fits in (no haystack at all)."""
    case = build_case(task, 10**6, 0.0, 0, 0, _NoHaystack(tokenizer))
    return len(case.ids)


class _NoHaystack(Haystacks):
    def filler(self, count):
        return []

    def text(self, count, rng):
        return []
