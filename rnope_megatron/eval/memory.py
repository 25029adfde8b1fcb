"""Whether an evaluation fits in memory, decided before any work.

``rnope-eval passkey --lengths 1000000`` or an eval gate with ``eval.lengths: [1000000]``
used to start (load, build every prompt, even train for hours) and then run out of
memory. The peak of one evaluation is estimated from the model's shape and refused, in one
line naming the field, when it exceeds the memory this process can have.

The estimate, per forward of ``rows`` prompts of ``length`` tokens, in float32 (4 bytes)
and under ``torch.no_grad`` (one layer's activations alive at a time):

* logits ``[rows, length, vocab]`` twice (the model's and the float copy scoring reads),
* a layer's working set: hidden state, attention input and output and Q/K/V (about four
  ``hidden``-wide tensors) and the MLP's gate, up and product (three ``ffn``-wide ones),

plus the prompts themselves (``length`` 8-byte references per case, all lengths built
up front). Attention memory is linear in the length (sliding windows; the global layers
use blocked kernels). Measured on CPU with the tiny recipe's model (hidden 128, ffn 384,
vocab 512): 9.3 KB per token from 16k to 64k tokens, against 10.7 KB estimated: the
estimate errs on the large side by ~15%, and anything it refuses would not have fit.
"""

from __future__ import annotations

import torch

FLOAT_BYTES = 4
REFERENCE_BYTES = 8  # one element of a Python tuple of token ids


def forward_bytes(rows: int, length: int, hidden: int, ffn: int, vocab: int) -> int:
    """Peak bytes of one no-grad forward (see the module docstring)."""
    return rows * length * FLOAT_BYTES * (2 * vocab + 4 * hidden + 3 * ffn)


def evaluation_bytes(lengths, cases_per_length: int, rows_for, hidden: int, ffn: int, vocab: int) -> int:
    """Peak bytes of evaluating ``cases_per_length`` prompts at each length: the prompts
    (built up front) plus the largest forward (``rows_for(length)`` rows)."""
    prompts = sum(cases_per_length * n * REFERENCE_BYTES for n in lengths)
    return prompts + max(forward_bytes(rows_for(n), n, hidden, ffn, vocab) for n in lengths)


def available_bytes(device=None) -> int:
    """Memory this process can still take: free memory of its CUDA device, else the host's
    available memory (shared by the local ranks of a multi-process CPU run)."""
    import os

    import psutil

    if torch.cuda.is_available() and (device is None or str(device) != "cpu"):
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return int(psutil.virtual_memory().available) // local_ranks


def refuse_if_too_large(field: str, lengths, cases_per_length: int, rows_for, hidden: int, ffn: int, vocab: int,
                        available: int) -> None:
    """A ValueError naming ``field`` when the evaluation cannot fit in ``available`` bytes."""
    need = evaluation_bytes(lengths, cases_per_length, rows_for, hidden, ffn, vocab)
    if need > available:
        longest = max(lengths)
        raise ValueError(
            f"{field}: evaluating {longest:,} tokens needs about {need / 2**30:,.1f} GiB (logits of {vocab} ids "
            f"and activations of one forward of {rows_for(longest)} row(s), {cases_per_length} prompts per length), "
            f"{available / 2**30:,.1f} GiB available: use shorter lengths")
