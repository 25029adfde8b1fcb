"""What ``rnope-eval`` evaluates: a Megatron checkpoint or an exported Hugging Face
directory, each as a logits function plus the tokenizer its prompts are built with.

No model code lives here. A checkpoint is loaded by the loader conversion uses
(:func:`rnope_megatron.checkpoint.reader.load_model`: any saved TP/PP/VPP layout, into the
TP=PP=1 model that :func:`rnope_megatron.model.build.build_model` builds for training); an HF
directory is loaded by transformers' own classes (SmolLM3 / Cohere2, as rnope-convert
exports them). The training-time gate wraps the training model itself
(:mod:`rnope_megatron.eval.gate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import warnings
from typing import Optional

import torch

from rnope_megatron.checkpoint.layout import resolve, saved_recipe
from rnope_megatron.checkpoint.reader import load_model
from rnope_megatron.common.distributed import ensure_single_process
from rnope_megatron.convert.hf_dir import read_config, require_hf_extra
from rnope_megatron.data.tokenizers import make_tokenizer
from rnope_megatron.eval import hf_quantized
from rnope_megatron.eval.scoring import LogitsFn
from rnope_megatron.model.build import run_model


@dataclasses.dataclass
class Evaluated:
    """A model ready to score: ``logits`` maps ids [b, L] to logits [b, L, V]."""

    logits: LogitsFn
    tokenizer: object
    vocab_size: int
    description: dict
    """What was loaded (source, pattern, window, trained length), written into the JSON."""
    trained_length: Optional[int] = None
    """``train.seq_length`` of the recipe saved with the checkpoint, when known."""
    widths: tuple = (0, 0)
    """(hidden size, MLP hidden size): what one forward's memory grows with (eval.memory)."""


@contextlib.contextmanager
def quiet_checkpoint_reading():
    """torch DCP warns on every single-process load (argument order, ShardedTensor
    deprecation) about Megatron's calls, which no user can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The argument order of load has been changed")
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        yield


def megatron_logits(model) -> LogitsFn:
    """Logits of a Megatron GPTModel (TP=1), positions 0..L-1 as in training."""

    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return run_model(model, ids)

    return logits


def tokenizer_of(spec: str, where: str):
    try:
        return make_tokenizer(spec)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: tokenizer {spec!r}: {err}") from None


def from_checkpoint(path, threads: Optional[int] = None) -> Evaluated:
    """A checkpoint rnope-train or rnope-convert wrote (``iter_N`` or its parent)."""
    source = resolve(path)
    recipe = saved_recipe(source)
    tokenizer = tokenizer_of((recipe.get("data") or {}).get("tokenizer", "bytes"), f"checkpoint {source}")
    if threads:
        torch.set_num_threads(threads)
    ensure_single_process()
    with quiet_checkpoint_reading():
        cfg, model = load_model(source)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"checkpoint {source}: tokenizer has {tokenizer.vocab_size} ids > model.vocab_size "
                         f"{cfg.vocab_size}")
    trained = (recipe.get("train") or {}).get("seq_length")
    description = {"source": str(source), "kind": "megatron", "pattern": cfg.pattern, "window": cfg.window,
                   "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "trained_length": trained}
    return Evaluated(megatron_logits(model), tokenizer, cfg.vocab_size, description, trained,
                     (cfg.hidden_size, cfg.ffn_hidden_size))


def _hf_tokenizer(directory: pathlib.Path, vocab_size: int):
    """The export's own tokenizer.json (rnope-convert writes one for byte models too): a
    folder without one is refused, not scored with a guessed tokenizer."""
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{directory}: no tokenizer.json, so the prompts cannot be tokenized as the model "
                         f"reads text (rnope-convert to-hf writes it, the byte tokenizer's included): copy "
                         f"the model's tokenizer.json there")
    tokenizer = tokenizer_of(str(tok_file), f"{directory}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{directory}: tokenizer.json has {tokenizer.vocab_size} ids > config.json vocab_size "
                         f"{vocab_size}: not this model's tokenizer")
    return tokenizer


def from_hf(path, threads: Optional[int] = None) -> Evaluated:
    """An exported Hugging Face directory, run by transformers (float32, eager on CPU: the
    reference implementation, not a fast one). A quantized export (``rnope-quantize
    --hf``) is computed from its dequantized weights (:mod:`.hf_quantized`)."""
    require_hf_extra()
    directory = pathlib.Path(path)
    hf = read_config(directory)
    vocab_size = hf.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{directory / 'config.json'}: vocab_size {vocab_size!r} is not a positive integer")
    tokenizer = _hf_tokenizer(directory, vocab_size)  # before the (long) model load
    algo = hf_quantized.quant_algo(directory, hf)
    fmt = hf_quantized.format_of(directory, algo) if algo else None
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    try:
        if fmt:
            model, _ = hf_quantized.load_dequantized(directory, fmt)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{directory}: transformers cannot load it ({' '.join(str(err).split())[:300]})") from None

    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    description = {"source": str(directory), "kind": "hf", "model_type": hf.get("model_type"),
                   "layer_types": hf.get("layer_types"), "sliding_window": hf.get("sliding_window"),
                   "quantization": algo}
    widths = (int(hf.get("hidden_size") or 0), int(hf.get("intermediate_size") or 0))
    return Evaluated(logits, tokenizer, vocab_size, description, widths=widths)


def load(checkpoint: Optional[str], hf: Optional[str], threads: Optional[int] = None) -> Evaluated:
    """Exactly one of ``--checkpoint`` / ``--hf``."""
    if bool(checkpoint) == bool(hf):
        raise ValueError("give exactly one of --checkpoint DIR or --hf DIR")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads} must be >= 1")
    return from_checkpoint(checkpoint, threads) if checkpoint else from_hf(hf, threads)
