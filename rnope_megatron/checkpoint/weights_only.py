"""Weights-only checkpoints: a TP=1 model's tensors saved so that ``rnope-train`` loads
them with ``checkpoint.load=DIR checkpoint.reset_optimizer=true`` (any TP/PP)."""

from __future__ import annotations

import pathlib
import re

from rnope_megatron.checkpoint.layout import save_state
from rnope_megatron.model.build import build_single_rank_model
from rnope_megatron.model.config import RNoPEConfig


def _mismatches(torch_message: str) -> str:
    """torch's multi-line size-mismatch report as one compact line naming every tensor."""
    found = re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\(\[(.*?)\]\) from "
                       r"checkpoint, the shape in current model is torch.Size\(\[(.*?)\]\)", torch_message)
    if not found:
        return " ".join(torch_message.split())
    return "; ".join(f"{name} has shape [{got}] but the config makes it [{want}]" for name, got, want in found)


def write_weights_checkpoint(cfg: RNoPEConfig, state: dict, out_dir, recipe: dict) -> pathlib.Path:
    """Build a TP=1 model holding ``state`` (Megatron TP=PP=1 names) and save it as
    ``iter_0000000`` + ``latest``. ``recipe`` is stored with it (at least its ``model``
    section: tools rebuild the model from it)."""
    model = build_single_rank_model(cfg)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # torch lists every size mismatch, one per line
        raise ValueError(f"weights do not fit the model: {_mismatches(str(err))}") from None
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return save_state({"model": model.sharded_state_dict(), "recipe": recipe}, out_dir, 0, keep=1)
