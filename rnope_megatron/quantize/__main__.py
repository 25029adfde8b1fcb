"""``rnope-quantize``: post-training quantization of an rnope checkpoint with NVIDIA Model
Optimizer (the ``quant`` extra), for serving and for quantization-aware training.

    rnope-quantize CKPT_DIR OUT_DIR --format fp8|nvfp4|int4_awq|int8_sq
        [--calib-samples N] [--calib-seq-length L] [--eval-samples N]
        [--hf HF_DIR [--arch smollm3|cohere2]] [--force]

Calibrates the model (TP=PP=1, portable backend, this machine's device) on samples of its
recipe's data, reports the eval loss before and after, and writes OUT_DIR: a checkpoint
with weights and quantizers that ``rnope-train RECIPE checkpoint.load=OUT_DIR`` continues
as quantization-aware training. ``--hf`` also writes a quantized Hugging Face directory
(modelopt's format: hf_quant_config.json, quantization_config in config.json) for serving
stacks. nvfp4 needs a GPU (modelopt has no CPU kernel for it).
"""

from __future__ import annotations

import argparse

from rnope_megatron.common.cli import finish_console_imports, one_line_errors, start_console_imports

# A console script's entry module: quiet the library notices no user can act on (Apex/TE
# missing on CPU, ...) before the imports below bring Megatron in and print them, and
# keep the garbage collector out of those imports (common/cli.py).
start_console_imports()

from rnope_megatron.quantize.command import quantize  # noqa: E402
finish_console_imports()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rnope-quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    # validated by the command (an unknown one is a one-line error, not argparse's usage)
    parser.add_argument("--format", help="fp8, nvfp4, int4_awq or int8_sq (optional for a quantized checkpoint)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-length", type=int, default=None, help="default: the recipe's train.seq_length")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--hf", metavar="HF_DIR", help="also write a quantized Hugging Face directory")
    parser.add_argument("--arch", help="Hugging Face target (default: cohere2 for the parallel block, else smollm3)")
    parser.add_argument("--force", action="store_true", help="replace previous outputs of this command")
    args = parser.parse_args(argv)
    with one_line_errors("rnope-quantize"):
        quantize(args.checkpoint, args.out_dir, args.format, args.calib_samples, args.calib_seq_length,
                 args.eval_samples, args.hf, args.arch, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
