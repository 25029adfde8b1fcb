"""``rnope-convert``: Megatron checkpoints <-> Hugging Face model directories.

    rnope-convert to-hf CKPT_DIR OUT_DIR [--arch smollm3|cohere2|llama|qwen3] [--dtype bf16|fp32|fp16] [--force]
    rnope-convert from-hf HF_DIR OUT_DIR [--pattern SSSG --window W] [--force]

to-hf streams: one layer's tensors are read from the checkpoint at a time and written out
shard by shard (safetensors + index), so memory stays near one shard. from-hf writes a
weights-only checkpoint plus ``model.yaml`` (the recipe's model section); continue
training with ``checkpoint.load=OUT_DIR checkpoint.reset_optimizer=true``. ``--pattern`` /
``--window`` retrofit the import into another layer pattern (e.g. a Llama into RNoPE-SWA):
the weights carry over one to one, layers that become G stop using RoPE, S layers get the
window; one line per layer says what changed.

to-hf exports in the checkpoint's own precision (what it was trained or imported in)
unless --dtype says otherwise.

The output is written beside OUT_DIR and moved into place when complete. An OUT_DIR that
is, contains or lies inside the input is refused; ``--force`` replaces only the files a
previous rnope-convert wrote (its manifest lists them) and keeps the user's own
(e.g. a README.md model card).
"""

from __future__ import annotations

import argparse

from rnope_megatron.common.cli import finish_console_imports, one_line_errors, start_console_imports

# A console script's entry module: quiet the library notices no user can act on (Apex/TE
# missing on CPU, ...) before the imports below bring Megatron in and print them, and
# keep the garbage collector out of those imports (common/cli.py).
start_console_imports()

from rnope_megatron.convert import commands  # noqa: E402
from rnope_megatron.convert.commands import EXPORT_DTYPES  # noqa: E402
from rnope_megatron.convert.targets import target_names  # noqa: E402
finish_console_imports()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rnope-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="Megatron checkpoint -> Hugging Face directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=target_names())
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                   help="default: the checkpoint's own precision (what it was trained or imported in)")
    p.add_argument("--shard-mb", type=int, default=2000)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("from-hf", help="Hugging Face directory -> weights-only Megatron checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--pattern", help="retrofit into this layer pattern (e.g. SSSG); its length must divide the layers")
    p.add_argument("--window", type=int, help="sliding window of the S layers (tokens, >= 1)")
    p.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    with one_line_errors("rnope-convert"):  # SIGTERM in a staged write: removed, one line
        if args.command == "to-hf":
            commands.to_hf(args.checkpoint, args.out_dir, args.arch, args.dtype, args.force, args.shard_mb)
        else:
            commands.from_hf(args.hf_dir, args.out_dir, args.force, args.pattern, args.window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
