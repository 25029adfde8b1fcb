"""Document lengths for pricing document-masked attention (``data.document_mask``).

With document masking a sequence's attention costs the sum over its documents, so the
price depends on how long the documents are. ``rnope-plan`` simulates packed sequences
the way Megatron's GPTDataset cuts them (documents in random order, concatenated, cut
every ``seq_length`` tokens) from, in order of preference:

1. the indexed datasets' own document index (``data.paths``' ``.idx`` files, when this
   machine can read them), blended by ``data.weights`` per sample;
2. ``data.mean_document_length`` (documents of that length, the first one cut at a
   random offset);
3. neither: priced as without masking, and the report says so.

The retrieval mix (``data.retrieval_fraction``) is priced with its own case lengths.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random

from rnope_megatron.data.dataset import longest_bare_case, retrieval_case_length
from rnope_megatron.data.tokenizers import make_tokenizer

SIMULATED_SEQUENCES = 64
"""Packed sequences simulated per source: enough for a stable mean attention cost."""
# A retrieval case's needle, question and answer when the tokenizer cannot be read here
# (bytes: at most ~200 tokens; a subword tokenizer needs fewer).
ASSUMED_BARE_CASE = 256


@dataclasses.dataclass
class DocumentPacks:
    """Simulated packed sequences: each a list of document lengths summing to seq_length."""

    source: str
    """Where the lengths came from (files read, or the recipe field)."""
    packs: list[list[int]]
    weights: list[float]
    """Each pack's share of the samples (blend weight / packs of its source)."""

    @property
    def mean_document_length(self) -> float:
        pieces = sum(w * len(p) for p, w in zip(self.packs, self.weights))
        tokens = sum(w * sum(p) for p, w in zip(self.packs, self.weights))
        return tokens / pieces


def _cut(lengths_stream, seq_length: int, count: int) -> list[list[int]]:
    """Concatenate documents from ``lengths_stream`` and cut ``count`` sequences."""
    packs, current, room = [], [], seq_length
    for length in lengths_stream:
        while length > 0 and len(packs) < count:
            piece = min(length, room)
            current.append(piece)
            length -= piece
            room -= piece
            if room == 0:
                packs.append(current)
                current, room = [], seq_length
        if len(packs) == count:
            return packs
    raise ValueError("document stream ended early")


def _indexed_document_stream(prefix: str, rng: random.Random, tokens: int) -> list[int]:
    """Lengths of documents drawn at random from one Megatron indexed dataset until they
    hold ``tokens`` tokens (read while the index is open: its arrays are views of a
    memory map that closes with it)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    lengths = dataset.sequence_lengths
    drawn, total = [], 0
    while total < tokens:
        drawn.append(int(lengths[rng.randrange(len(lengths))]))
        total += drawn[-1]
    del dataset
    return drawn


def _readable(paths) -> bool:
    return bool(paths) and all(pathlib.Path(f"{p}.idx").is_file() and pathlib.Path(f"{p}.bin").is_file()
                               for p in paths)


def document_packs(recipe, seed: int = 0) -> DocumentPacks | None:
    """Simulated packs of ``recipe``'s data, or None (no masking, or no lengths known)."""
    d, seq = recipe.data, recipe.train.seq_length
    if not d.document_mask:
        return None
    rng = random.Random(seed)
    sources: list[tuple[list[list[int]], float]] = []
    share = 1.0 - (d.retrieval_fraction if d.source != "synthetic-retrieval" else 1.0)
    if share > 0 and d.source == "indexed" and _readable(d.paths):
        weights = d.weights or [1.0] * len(d.paths)
        total = sum(weights)
        for prefix, weight in zip(d.paths, weights):
            stream = _indexed_document_stream(prefix, rng, seq * SIMULATED_SEQUENCES)
            sources.append((_cut(stream, seq, SIMULATED_SEQUENCES), share * weight / total))
        described = f"the document index of {len(d.paths)} indexed dataset(s)"
    elif share > 0 and d.mean_document_length:
        n = d.mean_document_length
        first = rng.randrange(n) + 1  # the sample starts inside a document
        stream = iter([first] + [n] * (seq * SIMULATED_SEQUENCES // n + 2))
        sources.append((_cut(stream, seq, SIMULATED_SEQUENCES), share))
        described = f"data.mean_document_length={n}"
    elif share > 0:
        return None
    else:
        described = "the retrieval mix only"
    if share < 1.0:
        try:
            bare = longest_bare_case(make_tokenizer(d.tokenizer), d.retrieval_tasks, recipe.train.seed)
        except (OSError, ValueError):
            bare = ASSUMED_BARE_CASE
        case = retrieval_case_length(seq, True, bare)
        sources.append(([[case] * (seq // case)], 1.0 - share))
    packs, weights = [], []
    for source_packs, weight in sources:
        packs += source_packs
        weights += [weight / len(source_packs)] * len(source_packs)
    return DocumentPacks(described, packs, weights)
