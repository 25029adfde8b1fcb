"""``rnope-eval``: evaluate a checkpoint.

    rnope-eval loss --checkpoint DIR --input-ids FILE [--json]

``loss``: mean next-token cross entropy of the token ids in FILE (``.npy`` or ``.json``,
shape [batch, seq]) under the checkpoint's model (TP=PP=1, portable backend; any saved
layout loads). ``--json`` prints ``{"loss": ..., "tokens": ...}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch


def read_ids(path) -> torch.Tensor:
    path = pathlib.Path(path)
    if not path.is_file():
        raise SystemExit(f"rnope-eval: {path} not found")
    if path.suffix == ".npy":
        import numpy

        ids = torch.from_numpy(numpy.load(path)).long()
    elif path.suffix == ".json":
        ids = torch.tensor(json.loads(path.read_text()), dtype=torch.long)
    else:
        raise SystemExit(f"rnope-eval: {path}: expected .npy or .json")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise SystemExit(f"rnope-eval: {path}: expected shape [batch, seq >= 2], got {list(ids.shape)}")
    return ids


def load_model(checkpoint):
    from megatron.core import dist_checkpointing

    from rnope_megatron.convert.megatron_io import build_tp1_model, model_config_of, resolve, single_process

    single_process()
    cfg = model_config_of(checkpoint)
    model = build_tp1_model(cfg)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(resolve(checkpoint)))
    model.load_state_dict(loaded["model"])
    return cfg, model.eval()


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor) -> tuple[float, int]:
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    per_token = model(tokens, positions, None, labels=labels)
    return per_token.double().mean().item(), labels.numel()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="rnope-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("loss")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input-ids", required=True)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    ids = read_ids(args.input_ids)
    from rnope_megatron.distributed import shutdown_parallel

    try:
        try:
            cfg, model = load_model(args.checkpoint)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"rnope-eval: {err}") from None
        if int(ids.max()) >= cfg.vocab_size:
            raise SystemExit(f"rnope-eval: token id {int(ids.max())} >= model.vocab_size={cfg.vocab_size}")
        loss, tokens = mean_loss(model, ids)
    finally:
        shutdown_parallel()
    result = {"loss": loss, "tokens": tokens}
    print(json.dumps(result) if args.json else f"loss {loss:.6f} over {tokens} tokens")
    return result


if __name__ == "__main__":
    main()
