"""``rnope-eval loss``: next-token loss of a checkpoint, overall and per position.

Input is either token ids from a file (``--input-ids``: ``.npy`` or ``.json``, shape
[batch, seq], integers in [0, vocab)) or samples of a dataset described like the
trainer's ``data:`` section (``--data FILE``: a recipe holding a ``data:`` section, or
that section alone), cut at ``--length`` tokens. Per-position loss is averaged over the
batch and over octave bins of positions ([1, 2), [2, 4), ... [L/2, L)): a model that uses
its context keeps lowering the loss with position, also past the training length.
"""

from __future__ import annotations

import json
import math
import pathlib
import tempfile

import torch

from rnope_megatron.checkpoint.layout import resolve, saved_recipe
from rnope_megatron.checkpoint.reader import load_model
from rnope_megatron.common import safe_yaml
from rnope_megatron.common.distributed import ensure_single_process
from rnope_megatron.common.output import write_text
from rnope_megatron.common.typed import build_dataclass
from rnope_megatron.data.dataset import SampleShape, build_dataset
from rnope_megatron.data.tokenizers import make_tokenizer
from rnope_megatron.eval.models import quiet_checkpoint_reading
from rnope_megatron.eval.plots import loss_curve
from rnope_megatron.model.build import run_model
from rnope_megatron.recipe import catalog, read_yaml
from rnope_megatron.recipe.sections import DataSection


def _ids_from_json(path: pathlib.Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ValueError(f"{path}: expected a list of token-id lists [batch][seq]")
    if len({len(row) for row in rows}) > 1:
        raise ValueError(f"{path}: rows have different lengths {sorted({len(row) for row in rows})} (ragged)")
    for row in rows:
        for value in row:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path}: token ids must be integers, found {value!r}")
    return rows


def read_ids(path) -> torch.Tensor:
    """Token ids [batch, seq >= 2] from ``.npy`` or ``.json``; anything but non-negative
    integers of that shape is refused (floats and bools are not silently truncated)."""
    import numpy

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".npy":
        try:
            array = numpy.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path}: not a numpy .npy array ({err})") from None
        if array.dtype.kind not in "iu":
            raise ValueError(f"{path}: token ids must be integers, got dtype {array.dtype}")
        ids = torch.from_numpy(array.astype(numpy.int64))
    elif path.suffix == ".json":
        ids = torch.tensor(_ids_from_json(path), dtype=torch.long)
    else:
        raise ValueError(f"{path}: expected .npy or .json")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{path}: expected shape [batch >= 1, seq >= 2], got {list(ids.shape)}")
    if int(ids.min()) < 0:
        raise ValueError(f"{path}: token id {int(ids.min())} is negative")
    return ids


def per_position_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Loss of each predicted token, averaged over the batch: [seq - 1] (float64)."""
    with torch.no_grad():
        tokens, labels = ids[:, :-1], ids[:, 1:]

        return run_model(model, tokens, labels).double().mean(dim=0)


def eod_boundaries(row: torch.Tensor, eod: int) -> list[int]:
    """Document boundaries [0, e_1, ..., L] of one packed row: a document is its tokens
    followed by the end-of-document id, so each EOD (but a last one) ends one."""
    length = row.numel()
    ends = [int(p) + 1 for p in (row == eod).nonzero().flatten() if int(p) + 1 < length]
    return [0, *ends, length]


def document_masked_loss(model, ids: torch.Tensor, eod: int) -> tuple[torch.Tensor, float, int, int]:
    """Loss of packed rows whose documents do not see each other: every document attends
    to itself only, with positions from 0 (as document-masked training runs it), and the
    EOD's prediction of the next document is not counted. Returns the loss per position
    within a document (float64, averaged over the trained predictions at that position),
    the mean loss, the number of trained predictions and the number of documents."""
    tokens, labels = ids[:, :-1], ids[:, 1:]
    trained = tokens != eod
    if not trained.any():
        raise ValueError(f"--document-mask: every position of the input is an end-of-document id ({eod})")
    documents = [eod_boundaries(row, eod) for row in tokens]
    with torch.no_grad():
        per_token = run_model(model, tokens, labels, documents=documents).double()
    positions = torch.zeros_like(tokens)
    for row, bounds in enumerate(documents):
        for start, end in zip(bounds, bounds[1:]):
            positions[row, start:end] = torch.arange(end - start)
    sums = torch.zeros(tokens.shape[1], dtype=torch.float64).index_add_(0, positions[trained], per_token[trained])
    counts = torch.zeros(tokens.shape[1], dtype=torch.float64).index_add_(
        0, positions[trained], torch.ones_like(per_token[trained]))
    reached = int(counts.nonzero().max()) + 1  # the longest document's trained positions
    curve = sums[:reached] / counts[:reached]
    return curve, per_token[trained].mean().item(), int(trained.sum()), sum(len(b) - 1 for b in documents)


def octave_bins(curve: torch.Tensor) -> list[dict]:
    """Mean loss over positions [2^k, 2^(k+1)) (position p predicts token p + 1; the first
    bin also holds position 0)."""
    bins, start, end = [], 0, 2
    while start < curve.numel():
        stop = min(end, curve.numel())
        bins.append({"start": start, "end": stop, "loss": curve[start:stop].mean().item()})
        start, end = stop, end * 2
    return bins


def _data_section(path) -> dict:
    """The ``data:`` section of a recipe file or a shipped recipe's name (its base and
    section files resolved), or the file's mapping itself when it is a bare data section."""
    import yaml

    path = catalog.resolve(path, option="--data")
    try:
        raw = safe_yaml.load(path.read_text(encoding="utf-8"), f"--data {path}") or {}
    except safe_yaml.YAMLTooLarge:
        raise
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"--data {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--data {path}: expected a mapping (a recipe or its data: section)")
    if "data" in raw or "base" in raw:
        return read_yaml(path).get("data") or {}
    return raw


def dataset_ids(data_file, cfg, length: int, samples: int, seed: int) -> torch.Tensor:
    """``samples`` sequences of ``length`` tokens from the data section in ``data_file``,
    built by the trainer's own dataset code (same blend, tokenizer and retrieval mix)."""
    data = build_dataclass(DataSection, _data_section(data_file), "data")
    shape = SampleShape(seq_length=length - 1, seed=seed, vocab_size=cfg.vocab_size, planned_samples=samples)
    cache = pathlib.Path(data.cache_dir) if data.cache_dir else None
    with tempfile.TemporaryDirectory(prefix="rnope-eval-data-") as scratch:
        dataset = build_dataset(data, shape, cache or pathlib.Path(scratch), samples)
        # GPTDataset returns tokens/labels shifted by one: rebuild the length-token rows
        rows = [torch.cat([dataset[i]["tokens"][:1], dataset[i]["labels"]]) for i in range(samples)]
    return torch.stack(rows).long()


def checkpoint_eod(recipe: dict) -> int:
    """The end-of-document id of the tokenizer a checkpoint was trained with."""
    name = (recipe.get("data") or {}).get("tokenizer", "bytes")
    if name != "bytes" and not pathlib.Path(name).is_file():
        raise ValueError(f"--document-mask: the checkpoint's data.tokenizer {name} is not here "
                         f"(give --eod ID, the end-of-document id)")
    return make_tokenizer(name).eod


def loss_command(checkpoint, input_ids=None, data=None, length=None, samples=8, seed=0,
                 document_mask=False, eod=None) -> dict:
    """Mean loss and its per-position profile in octave bins (see module docstring).
    ``document_mask``: the rows are packed documents (each ended by the EOD id: ``eod``,
    default the checkpoint's tokenizer's) run as document-masked training runs them;
    ``loss`` and ``tokens`` count the trained predictions only and the profile is by
    position within a document."""
    if bool(input_ids) == bool(data):
        raise ValueError("give exactly one of --input-ids FILE or --data FILE")
    if data is not None and (length is None or length < 2):
        raise ValueError("--data needs --length N (N >= 2 tokens per sample)")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if data is not None:  # a file, or a shipped recipe's name; an unknown one fails before any work
        data = catalog.resolve(data, option="--data")
    ids = read_ids(input_ids) if input_ids else None
    source = resolve(checkpoint)
    trained = (saved_recipe(source).get("train") or {}).get("seq_length")
    ensure_single_process()
    with quiet_checkpoint_reading():
        cfg, model = load_model(source)
    if ids is None:
        ids = dataset_ids(data, cfg, length, samples, seed)
    if int(ids.max()) >= cfg.vocab_size:
        where = input_ids or f"--data {data}"
        raise ValueError(f"{where}: token id {int(ids.max())} >= model.vocab_size={cfg.vocab_size}")
    if document_mask:
        eod = checkpoint_eod(saved_recipe(source)) if eod is None else eod
        curve, mean, count, documents = document_masked_loss(model, ids, eod)
        result = {"loss": mean, "tokens": count, "document_mask": True, "eod": eod, "documents": documents}
    else:
        curve = per_position_loss(model, ids)
        result = {"loss": curve.mean().item(), "tokens": (ids.shape[1] - 1) * ids.shape[0]}
    result.update({"batch": ids.shape[0], "length": ids.shape[1], "trained_length": trained,
                   "per_position": octave_bins(curve)})
    if trained and ids.shape[1] - 1 > trained:
        result["loss_within_trained_length"] = curve[:trained].mean().item()
        result["loss_beyond_trained_length"] = curve[trained:].mean().item()
    return result


def write_loss_outputs(result: dict, json_path=None, png=None, title="") -> None:
    """The result as JSON at ``json_path`` and its per-position curve as a PNG."""
    if json_path:
        write_text(json_path, json.dumps(result, indent=2) + "\n", "--json")
    if png:
        bins = result["per_position"]
        # plot each bin at its geometric centre (log-scaled x axis)
        xs = [max(1, math.sqrt(max(b["start"], 1) * b["end"])) for b in bins]
        loss_curve(xs, [b["loss"] for b in bins], result["trained_length"], title, png)
