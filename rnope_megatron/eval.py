"""``rnope-eval``: evaluate a checkpoint.

    rnope-eval loss --checkpoint DIR --input-ids FILE [--json]

``loss``: mean next-token cross entropy of the token ids in FILE (``.npy`` or ``.json``,
shape [batch, seq], integers in [0, vocab)) under the checkpoint's model (TP=PP=1,
portable backend; any saved layout loads). ``--json`` prints ``{"loss": ..., "tokens": ...}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch


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


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor) -> tuple[float, int]:
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    per_token = model(tokens, positions, None, labels=labels)
    return per_token.double().mean().item(), labels.numel()


def loss_command(checkpoint, input_ids) -> dict:
    from rnope_megatron.checkpoint.reader import load_model
    from rnope_megatron.distributed import ensure_single_process

    ids = read_ids(input_ids)
    ensure_single_process()
    cfg, model = load_model(checkpoint)
    if int(ids.max()) >= cfg.vocab_size:
        raise ValueError(f"{input_ids}: token id {int(ids.max())} >= model.vocab_size={cfg.vocab_size}")
    loss, tokens = mean_loss(model, ids)
    return {"loss": loss, "tokens": tokens}


def main(argv=None) -> int:
    from rnope_megatron.cli import one_line_errors, quiet_known_warnings

    parser = argparse.ArgumentParser(prog="rnope-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("loss")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input-ids", required=True)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    quiet_known_warnings()
    with one_line_errors("rnope-eval"):
        result = loss_command(args.checkpoint, args.input_ids)
    print(json.dumps(result) if args.json else f"loss {result['loss']:.6f} over {result['tokens']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
