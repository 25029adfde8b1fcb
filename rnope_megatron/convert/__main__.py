"""``rnope-convert``: Megatron checkpoints <-> Hugging Face model directories.

    rnope-convert to-hf CKPT_DIR OUT_DIR [--arch smollm3|cohere2] [--dtype bf16|fp32] [--force]
    rnope-convert from-hf HF_DIR OUT_DIR [--force]

to-hf streams: one layer's tensors are read from the checkpoint at a time and written out
shard by shard (safetensors + index), so memory stays near one shard. from-hf writes a
weights-only checkpoint plus ``model.yaml`` (the recipe's model section); continue
training with ``checkpoint.load=OUT_DIR checkpoint.reset_optimizer=true``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import torch
import yaml

from rnope_megatron.convert import hf_config, tables

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _prepare_out(out_dir: pathlib.Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise SystemExit(f"rnope-convert: {out_dir} is not empty (use --force to replace it)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


class _Progress:
    def __init__(self, total_tensors: int):
        self.total, self.done, self.bytes, self.start, self.last = total_tensors, 0, 0, time.time(), 0.0

    def add(self, tensor: torch.Tensor) -> None:
        self.done += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if time.time() - self.last > 2 or self.done == self.total:
            self.last = time.time()
            print(f"  {self.done}/{self.total} tensors, {self.bytes / 2**20:,.0f} MiB, "
                  f"{time.time() - self.start:.0f}s", file=sys.stderr, flush=True)


def _layer_groups(cfg, arch):
    """Megatron names grouped by layer (globals first), the unit of streaming."""
    groups: dict = {}
    for rule in tables.rules(arch, cfg.tie_embeddings):
        for hf_names, name in tables.expand(rule, cfg.num_layers):
            layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else -1
            groups.setdefault(layer, []).append((rule, hf_names, name))
    return [groups[k] for k in sorted(groups)]


def to_hf(ckpt: str, out: str, arch: str | None, dtype: str, force: bool, shard_mb: int = 2000) -> dict:
    from safetensors.torch import save_file

    from rnope_megatron.convert.megatron_io import CheckpointReader, model_config_of, recipe_of, single_process

    single_process()
    cfg = model_config_of(ckpt)
    arch = arch or ("cohere2" if cfg.block == "parallel" else "smollm3")
    hf_cfg = hf_config.to_hf(cfg, arch)  # refuses what the target cannot represent
    out_dir = pathlib.Path(out)
    _prepare_out(out_dir, force)
    reader = CheckpointReader(ckpt, cfg)
    groups = _layer_groups(cfg, arch)
    progress = _Progress(sum(len(g) for g in groups))
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    order = tables.rope_order(arch, cfg)
    for group in groups:
        loaded = reader.load([name for _, _, name in group])
        for rule, hf_names, name in group:
            _, to_hf_fn = tables.TRANSFORMS[rule.transform]
            for hf_name, tensor in zip(hf_names, to_hf_fn(cfg, loaded[name], order=order)):
                tensor = tensor.to(DTYPES[dtype]).contiguous()
                shard[hf_name] = tensor
                size = tensor.numel() * tensor.element_size()
                shard_bytes += size
                total += size
            progress.add(loaded[name])
        del loaded
        if shard_bytes >= shard_mb * 2**20:
            flush()
    flush()
    if len(files) == 1:
        (out_dir / files[0]).rename(out_dir / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_cfg["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    tokenizer = recipe_of(ckpt).get("data", {}).get("tokenizer", "bytes")
    eod = _end_of_document(tokenizer)
    if eod is not None and eod < cfg.vocab_size:
        hf_cfg.update(eos_token_id=eod, pad_token_id=eod, bos_token_id=None)
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
    if tokenizer != "bytes" and pathlib.Path(tokenizer).is_file():
        shutil.copy(tokenizer, out_dir / "tokenizer.json")
    print(f"wrote {out_dir} ({arch}, {len(files)} shard(s), {total / 2**20:,.1f} MiB)")
    return {"arch": arch, "shards": len(files), "bytes": total}


def _end_of_document(tokenizer: str):
    from rnope_megatron.train.data import make_tokenizer

    try:
        return make_tokenizer(tokenizer).eod
    except (OSError, ValueError):
        return None


def _read_hf_state(hf_dir: pathlib.Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise SystemExit(f"rnope-convert: {path} is missing")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise SystemExit(f"rnope-convert: {path} is not a readable safetensors file ({err})") from None
    return state


def from_hf(hf_dir: str, out: str, force: bool) -> dict:
    from rnope_megatron.convert.megatron_io import single_process, write_weights_checkpoint
    from rnope_megatron.train.recipe import Recipe

    hf_path = pathlib.Path(hf_dir)
    if not (hf_path / "config.json").is_file():
        raise SystemExit(f"rnope-convert: {hf_path}/config.json not found")
    hf = json.loads((hf_path / "config.json").read_text())
    cfg = hf_config.from_hf(hf)
    arch = hf_config.arch_of(hf)
    out_dir = pathlib.Path(out)
    _prepare_out(out_dir, force)
    state = tables.hf_to_megatron(arch, cfg, {k: v.float() for k, v in _read_hf_state(hf_path).items()})
    single_process()
    recipe = Recipe(model=cfg).to_dict()
    if (hf_path / "tokenizer.json").is_file():
        shutil.copy(hf_path / "tokenizer.json", out_dir / "tokenizer.json")
        recipe["data"]["tokenizer"] = str(out_dir / "tokenizer.json")
    write_weights_checkpoint(cfg, state, out_dir, recipe)
    (out_dir / "model.yaml").write_text(yaml.safe_dump({"model": recipe["model"]}, sort_keys=False))
    print(f"wrote {out_dir}: weights-only checkpoint + model.yaml ({arch}, pattern {cfg.pattern}); continue with "
          f"checkpoint.load={out_dir} checkpoint.reset_optimizer=true")
    return {"arch": arch, "pattern": cfg.pattern}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="rnope-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="Megatron checkpoint -> Hugging Face directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=hf_config.ARCHS)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shard-mb", type=int, default=2000)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("from-hf", help="Hugging Face directory -> weights-only Megatron checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    from rnope_megatron.distributed import shutdown_parallel

    try:
        if args.command == "to-hf":
            to_hf(args.checkpoint, args.out_dir, args.arch, args.dtype, args.force, args.shard_mb)
        else:
            from_hf(args.hf_dir, args.out_dir, args.force)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # e.g. weights whose shapes do not match config.json: one line, no traceback
        raise SystemExit(f"rnope-convert: {str(err).splitlines()[0]}") from None
    finally:
        shutdown_parallel()


if __name__ == "__main__":
    main()
