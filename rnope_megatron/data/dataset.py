"""The training dataset of a recipe, and the batch each rank reads at each iteration.

``build_dataset``: Megatron's GPTDataset (+ BlendedDataset) over the recipe's indexed
datasets, the embedded default corpus and the retrieval mix (built into the data cache on
first use). ``batch_for``: the micro-batch of one data-parallel rank at one iteration, a
pure function of the iteration (so a resumed run reads exactly the samples the killed run
would have).
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Iterable, Iterator

import numpy
import torch

from rnope_megatron.data.corpora import retrieval_documents, stdlib_documents
from rnope_megatron.data.indexed import token_dtype, write_indexed
from rnope_megatron.data.tokenizers import make_tokenizer


def documents_with_eod(texts: Iterable[str], tokenizer) -> Iterator[numpy.ndarray]:
    """Token arrays of ``texts``, each followed by the end-of-document id."""
    dtype = token_dtype(tokenizer.vocab_size)
    for text in texts:
        ids = tokenizer.tokenize_array(text)
        doc = numpy.empty(ids.size + 1, dtype=dtype)
        doc[:-1], doc[-1] = ids, tokenizer.eod
        yield doc


def _ensure(prefix: pathlib.Path, make_docs, tokenizer) -> str:
    if not pathlib.Path(str(prefix) + ".idx").exists():
        write_indexed(prefix, documents_with_eod(make_docs(), tokenizer), tokenizer.vocab_size)
    return str(prefix)


def dataset_prefixes(recipe, cache_dir: pathlib.Path, tokenizer) -> tuple[list[str], list[float] | None]:
    """Indexed-dataset prefixes and blend weights for the recipe (building the embedded
    corpora on first use; call on one rank, then barrier)."""
    d = recipe.data
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
        # Documents of ~half a sequence (chars): samples are cut at a stride of seq_length
        # from the concatenated documents, so a whole-sequence document (needle, question
        # and answer) rarely lands in one sample (5% of samples at 128 tokens, 15% at 256,
        # bytes); at half a sequence 44% of samples at 256 hold a complete passkey case.
        length = recipe.train.seq_length // 2 * (1 if tag == "bytes" else 4)
        retrieval = _ensure(
            cache_dir / f"retrieval-{tag}-{length}-seed{recipe.train.seed}",
            lambda: retrieval_documents(2000, length, recipe.train.seed),
            tokenizer,
        )
        if d.source == "synthetic-retrieval":
            paths, weights = [retrieval], None
        else:
            base = weights or [1.0 / len(paths)] * len(paths)
            total = sum(base)
            weights = [(1 - d.retrieval_fraction) * w / total for w in base] + [d.retrieval_fraction]
            paths = paths + [retrieval]
    return paths, weights


def build_dataset(recipe, cache_dir: pathlib.Path, num_samples: int):
    """The training GPTDataset (or BlendedDataset) with at least ``num_samples`` samples."""
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = make_tokenizer(recipe.data.tokenizer)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ValueError(
            f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={recipe.model.vocab_size}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    first = not dist.is_initialized() or dist.get_rank() == 0
    if first:
        prefixes, weights = dataset_prefixes(recipe, cache_dir, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    if not first:
        prefixes, weights = dataset_prefixes(recipe, cache_dir, tokenizer)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not pathlib.Path(prefix + suffix).exists():
                raise FileNotFoundError(f"data.paths: {prefix}{suffix} does not exist")
    config = GPTDatasetConfig(
        random_seed=recipe.train.seed,
        sequence_length=recipe.train.seq_length,
        blend=(prefixes, weights),
        split="100,0,0",
        path_to_cache=str(cache_dir / "index-cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causality is built into the attention kernels
        mid_level_dataset_surplus=0.05,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def batch_for(dataset, iteration: int, microbatch: int, recipe, dp_rank: int, dp_size: int) -> dict:
    """Micro-batch ``microbatch`` of data-parallel rank ``dp_rank`` at 0-based ``iteration``:
    samples are laid out globally as [iteration][dp rank][micro-batch][row]."""
    t = recipe.train
    per_rank = t.global_batch_size // dp_size
    start = iteration * t.global_batch_size + dp_rank * per_rank + microbatch * t.micro_batch_size
    samples = [dataset[start + i] for i in range(t.micro_batch_size)]
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
