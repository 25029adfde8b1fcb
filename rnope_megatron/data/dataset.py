"""The training dataset of a recipe, and the batch each rank reads at each iteration.

``build_dataset``: Megatron's GPTDataset (+ BlendedDataset) over the recipe's indexed
datasets, the embedded default corpus and the retrieval mix (built into the data cache on
first use). ``batch_for``: the micro-batch of one data-parallel rank at one iteration, a
pure function of the iteration (so a resumed run reads exactly the samples the killed run
would have).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sys
from typing import Iterable, Iterator

import numpy
import torch
import torch.distributed as dist

from rnope_megatron.common import faults
from rnope_megatron.common.dir_lock import DirectoryLock
from rnope_megatron.data.corpora import FILLER, retrieval_documents, stdlib_documents
from rnope_megatron.data.indexed import token_dtype, write_indexed
from rnope_megatron.data.tokenizers import make_tokenizer
from rnope_megatron.model.build import crossing_predictions

CACHE_LOCK_NAME = ".rnope-data.lock"


def documents_with_eod(texts: Iterable[str], tokenizer) -> Iterator[numpy.ndarray]:
    """Token arrays of ``texts``, each followed by the end-of-document id."""
    dtype = token_dtype(tokenizer.vocab_size)
    for text in texts:
        ids = tokenizer.tokenize_array(text)
        doc = numpy.empty(ids.size + 1, dtype=dtype)
        doc[:-1], doc[-1] = ids, tokenizer.eod
        yield doc


def retrieval_token_documents(documents, tokenizer, length: int, no_loss_offset: int = 0) -> Iterator[numpy.ndarray]:
    """Token arrays of retrieval cases of exactly ``length`` tokens each (see
    :func:`retrieval_case_length`), the last one the
    end-of-document id: haystack (the repeated filler) with the needle at the case's
    depth, question, answer and tail, the pieces tokenized apart as ``rnope-eval`` builds
    its prompts. Cases of a whole training sequence (``length = seq_length``) line up with
    Megatron's samples, one case per sample: no case is cut in two, and no earlier
    needle sits before the question as a distractor. A case that cannot fit (a very short
    ``seq_length``) is written without haystack. With a ``no_loss_offset``, every id but
    the answer's is stored plus that offset: the mark :class:`AnswerOnlyLoss` turns into a
    zero loss mask."""
    dtype = token_dtype(2 * no_loss_offset if no_loss_offset else tokenizer.vocab_size)
    # at least `length` characters: a token is at least one character
    filler = numpy.asarray(tokenizer.tokenize_array(FILLER * (length // len(FILLER) + 2)),
                           dtype=numpy.int64)
    for doc in documents:
        needle, question, answer, tail = (numpy.asarray(tokenizer.tokenize_array(part), dtype=numpy.int64)
                                          for part in (doc.needle, doc.question, doc.answer, doc.tail))
        room = max(0, length - 1 - needle.size - question.size - answer.size - tail.size)
        cut = round(doc.depth * room)
        prompt = numpy.concatenate([filler[:cut], needle, filler[cut:room], question])
        yield numpy.concatenate([prompt + no_loss_offset, answer, tail + no_loss_offset,
                                 [tokenizer.eod + no_loss_offset]]).astype(dtype)


def retrieval_case_length(seq_length: int, document_mask: bool, longest_bare_case: int) -> int:
    """Length of the retrieval mix's cases. Without document masking one case per sample
    (an earlier case's needle would be a distractor the question can see). With it, two
    cases of half a sample each, when a half holds at least as much haystack as the
    longest case has needle, question and answer (``longest_bare_case`` tokens): the mix
    then trains what document masking must get right (a second document that cannot see
    the first's needle). The halves are equal because Megatron shuffles documents before
    cutting samples: cases of one length stay aligned with samples in any order, so no
    case is cut (a case's tail without its needle would teach guessing)."""
    if not document_mask or seq_length % 2 or seq_length // 2 < 2 * longest_bare_case:
        return seq_length
    return seq_length // 2


def longest_bare_case(tokenizer, tasks, seed: int, probe: int = 64) -> int:
    """Tokens of the longest of the first ``probe`` retrieval cases without haystack."""
    return max(1 + sum(len(tokenizer.tokenize_array(part)) for part in (c.needle, c.question, c.answer, c.tail))
               for c in retrieval_documents(probe, seed, tuple(tasks)))


def no_loss_offset(vocab_size: int) -> int:
    """The mark of a no-loss token in the answers-only retrieval mix: the smallest power of
    two not below the model's vocabulary (real ids stay below it, marked ones above)."""
    return 1 << max(0, (vocab_size - 1).bit_length())


class AnswerOnlyLoss(torch.utils.data.Dataset):
    """A GPTDataset (or BlendedDataset) whose retrieval-mix tokens carry the no-loss mark
    (``data.retrieval_loss: answers``): samples come back with real ids and a loss mask
    that is zero where the label was marked, so the retrieval documents train only their
    answers while every other source keeps its full loss. Megatron's GPTDataset has no
    per-token mask of its own beyond EOD/padding; the mark travels inside the token
    stream, so blending, shuffling and the index caches stay Megatron's."""

    def __init__(self, dataset, offset: int):
        self.dataset, self.offset = dataset, offset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        marked = sample["labels"] >= self.offset
        sample["loss_mask"] = sample["loss_mask"] * (~marked).to(sample["loss_mask"].dtype)
        sample["tokens"] = sample["tokens"] % self.offset
        sample["labels"] = sample["labels"] % self.offset
        return sample


def _ensure(prefix: pathlib.Path, make_docs, tokenizer, to_tokens=None, vocab_size=None) -> str:
    if not pathlib.Path(str(prefix) + ".idx").exists():
        to_tokens = to_tokens or documents_with_eod
        write_indexed(prefix, to_tokens(make_docs(), tokenizer), vocab_size or tokenizer.vocab_size)
    return str(prefix)


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """What a dataset needs beyond the ``data:`` section: the sample length, the seed,
    the model's vocabulary and how many samples the run will draw."""

    seq_length: int
    """Tokens per sample (the labels are the next tokens: each row reads seq_length + 1)."""
    seed: int
    """Seed of the sample order and of the synthetic retrieval cases."""
    vocab_size: int
    """The model's vocabulary (the tokenizer must fit; answers-only markers sit above it)."""
    planned_samples: int
    """Samples the run draws (sizes the retrieval mix so a run rarely repeats a case)."""

    @classmethod
    def of(cls, recipe) -> "SampleShape":
        """The shape a training recipe asks for."""
        t = recipe.train
        return cls(t.seq_length, t.seed, recipe.model.vocab_size, t.iters * t.global_batch_size)


def dataset_prefixes(d, shape: SampleShape, cache_dir: pathlib.Path, tokenizer) -> tuple[list[str], list[float] | None]:
    """Indexed-dataset prefixes and blend weights for the ``data:`` section ``d`` (building
    the embedded corpora on first use; call on one rank, then barrier)."""
    # Cache names identify the tokenizer by content, not file name (tokenizer.json is common).
    tag = "bytes" if d.tokenizer == "bytes" else "hf-" + hashlib.sha256(
        pathlib.Path(d.tokenizer).read_bytes()).hexdigest()[:12]
    paths: list[str] = []
    weights: list[float] | None = None
    if d.source == "indexed":
        paths, weights = list(d.paths), (list(d.weights) if d.weights else None)
    elif d.source == "default":
        paths = [_ensure(cache_dir / f"stdlib-{tag}", stdlib_documents, tokenizer)]
    retrieval_needed = d.source == "synthetic-retrieval" or d.retrieval_fraction > 0
    if retrieval_needed:
        # One case per training sample (see retrieval_token_documents), and enough cases
        # that a run rarely sees one twice (a key seen again could be memorised instead
        # of retrieved): at least 2000, at most 200k.
        t = shape
        share = 1.0 if d.source == "synthetic-retrieval" else d.retrieval_fraction
        count = min(200_000, max(2000, int(shape.planned_samples * share * 1.1)))
        offset = no_loss_offset(shape.vocab_size) if d.retrieval_loss == "answers" else 0
        case = retrieval_case_length(t.seq_length, d.document_mask,
                                     longest_bare_case(tokenizer, d.retrieval_tasks, t.seed) if d.document_mask else 0)
        count *= t.seq_length // case  # cases per sample
        retrieval = _ensure(
            cache_dir / (f"retrieval-{tag}-{'+'.join(d.retrieval_tasks)}-{case}-{count}"
                         f"-seed{t.seed}" + (f"-answers{offset}" if offset else "")),
            lambda: retrieval_documents(count, t.seed, tuple(d.retrieval_tasks)),
            tokenizer,
            lambda docs, tok: retrieval_token_documents(docs, tok, case, offset),
            2 * offset if offset else None,
        )
        if d.source == "synthetic-retrieval":
            paths, weights = [retrieval], None
        else:
            base = weights or [1.0 / len(paths)] * len(paths)
            total = sum(base)
            weights = [(1 - d.retrieval_fraction) * w / total for w in base] + [d.retrieval_fraction]
            paths = paths + [retrieval]
    if weights is not None:
        # Megatron's BlendedDataset asserts every weight > 0: a source weighted 0
        # (data.weights, or data.retrieval_fraction: 1) is simply not drawn from
        kept = [(path, weight) for path, weight in zip(paths, weights) if weight > 0]
        paths, weights = [p for p, _ in kept], [w for _, w in kept]
        if len(paths) == 1:
            weights = None
    return paths, weights


def build_dataset(data, shape: SampleShape, cache_dir: pathlib.Path, num_samples: int):
    """The training GPTDataset (or BlendedDataset) of the ``data:`` section ``data`` with at
    least ``num_samples`` samples of ``shape``."""
    tokenizer = make_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > shape.vocab_size:
        raise ValueError(
            f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={shape.vocab_size}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    first = not dist.is_initialized() or dist.get_rank() == 0
    # Runs share a data cache (they read it together), but two building one file at once
    # write one .tmp name over each other and rename a mix into place; Megatron's index
    # cache is written in place. Rank 0 builds under the cache's lock, a second run waits.
    lock = DirectoryLock(cache_dir, CACHE_LOCK_NAME) if first else None
    if lock is not None:
        try:
            lock.acquire_waiting(lambda holder: print(
                f"data cache {cache_dir} is being built by {holder}: waiting for it", file=sys.stderr, flush=True))
        except PermissionError:
            lock = None  # a read-only shared cache: nobody builds there, reading needs no lock
    try:
        faults.point("building_data", 0)
        train = _build(data, shape, cache_dir, num_samples, tokenizer, first)
    finally:
        if lock is not None:
            lock.release()
    if data.retrieval_loss == "answers" and (data.retrieval_fraction > 0 or data.source == "synthetic-retrieval"):
        train = AnswerOnlyLoss(train, no_loss_offset(shape.vocab_size))
    return train


def batch_for(dataset, iteration: int, microbatch: int, train, dp_rank: int, dp_size: int) -> dict:
    """Micro-batch ``microbatch`` of data-parallel rank ``dp_rank`` at 0-based ``iteration``
    (batch sizes from the ``train:`` section): samples are laid out globally as
    [iteration][dp rank][micro-batch][row]. With document masking (samples carrying
    Megatron's ``cu_seqlens``) the batch also holds ``cu_seqlens`` [rows, L + 1] (padded
    with L, as Megatron pads it) and the loss mask drops each prediction across a
    document boundary (:func:`sample_documents`)."""
    t = train
    per_rank = t.global_batch_size // dp_size
    start = iteration * t.global_batch_size + dp_rank * per_rank + microbatch * t.micro_batch_size
    samples = [dataset[start + i] for i in range(t.micro_batch_size)]
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
    if "cu_seqlens" in samples[0]:
        batch["cu_seqlens"] = torch.stack([s["cu_seqlens"] for s in samples])
        for row, sample in enumerate(samples):
            crossing = crossing_predictions(sample_documents(sample["cu_seqlens"]), batch["tokens"].shape[1])
            batch["loss_mask"][row, crossing] = 0
    return batch


def sample_documents(cu_seqlens: torch.Tensor) -> list[int]:
    """One sample's document boundaries [0, e_1, ..., L] from Megatron's ``cu_seqlens``
    (``GPTDataset`` with ``inter_document_masking`` pads it to L + 1 entries with L)."""
    values = cu_seqlens.tolist()
    length = values[-1]
    return [v for v in values if v < length] + [length]


def _build(data, shape: SampleShape, cache_dir: pathlib.Path, num_samples: int, tokenizer, first: bool):
    """Rank 0 builds what the cache lacks, then every rank opens it (Megatron's builder
    does the same for its index cache: rank 0 first, the others after a barrier)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if first:
        prefixes, weights = dataset_prefixes(data, shape, cache_dir, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    if not first:
        prefixes, weights = dataset_prefixes(data, shape, cache_dir, tokenizer)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not pathlib.Path(prefix + suffix).exists():
                raise FileNotFoundError(f"data.paths: {prefix}{suffix} does not exist")
    config = GPTDatasetConfig(
        random_seed=shape.seed,
        sequence_length=shape.seq_length,
        blend=(prefixes, weights),
        split="100,0,0",
        path_to_cache=str(cache_dir / "index-cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,  # with documents, RoPE restarts per document in the layers
        reset_attention_mask=False,
        # Document masking: Megatron returns each sample's boundaries (cu_seqlens), and the
        # EOD's prediction of the next document's first token is not trained (what
        # eod_mask_loss masks; batch_for also drops boundaries of documents without an EOD).
        inter_document_masking=data.document_mask,
        eod_mask_loss=data.document_mask,
        create_attention_mask=False,  # causality is built into the attention kernels
        mid_level_dataset_surplus=0.05,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train
