"""Training data: Megatron indexed datasets through ``megatron.core.datasets``.

* tokenizers: a built-in byte-level one (ids 0..255 = bytes, 256 = EOD) or a Hugging Face
  ``tokenizer.json`` (needs the ``tokenizers`` package, installed with transformers);
* ``write_indexed``: documents -> ``.bin``/``.idx`` (what ``rnope-preprocess`` calls);
* the embedded default corpus: the Python standard library's sources (real text on
  every machine, no download), written once into the data cache;
* a synthetic long-context retrieval mix (passkey and key-value lookups), blendable;
* ``build_dataset``: GPTDataset (+ BlendedDataset) for the recipe, and ``batch_for``:
  the micro-batch of one data-parallel rank at one iteration, a pure function of the
  iteration (so a resumed run reads exactly the samples the killed run would have).
"""

from __future__ import annotations

import hashlib
import pathlib
import random
import sysconfig
from typing import Iterable, Iterator

import numpy
import torch

EOD_BYTES = 256


class ByteTokenizer:
    """Bytes as tokens: id = byte value, 256 = end of document. Vocab 257."""

    vocab_size = 257
    eod = EOD_BYTES
    pad = EOD_BYTES
    # Megatron's dataset cache key includes the tokenizer's identity.
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 257}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (fast tokenizers library)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        vocab = self._tok.get_vocab()
        candidates = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<EOS_TOKEN>")
        eod = next((vocab[t] for t in candidates if t in vocab), None)
        if eod is None:
            raise ValueError(f"{path}: no end-of-document token found (looked for {', '.join(candidates)})")
        self.eod = self.pad = eod
        self.unique_identifiers = {"class": "HFTokenizer", "path": str(path), "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def make_tokenizer(spec: str):
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)


def write_indexed(prefix: str | pathlib.Path, documents: Iterable[list[int]], vocab_size: int) -> int:
    """Write token documents as a Megatron indexed dataset ``prefix.bin``/``prefix.idx``
    (each document ends with EOD, added by the caller). Returns the token count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)  # may contain dots (data/web.v2): append, never replace, suffixes
    pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = numpy.uint16 if vocab_size <= 65536 else numpy.int32
    tmp_bin, tmp_idx = pathlib.Path(prefix + ".bin.tmp"), pathlib.Path(prefix + ".idx.tmp")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    tokens = 0
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
        tokens += len(doc)
    builder.finalize(str(tmp_idx))
    # rename last: a crash mid-write never leaves a readable half dataset
    tmp_bin.replace(prefix + ".bin")
    tmp_idx.replace(prefix + ".idx")
    return tokens


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


def _ensure(prefix: pathlib.Path, make_docs, tokenizer) -> str:
    if not pathlib.Path(str(prefix) + ".idx").exists():
        docs = ([*tokenizer.tokenize(text), tokenizer.eod] for text in make_docs())
        write_indexed(prefix, docs, tokenizer.vocab_size)
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
        length = recipe.train.seq_length * (1 if tag == "bytes" else 4)  # chars, ~one sequence
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
