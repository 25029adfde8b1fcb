"""``rnope-eval``: evaluate a checkpoint (or an exported Hugging Face directory).

    rnope-eval passkey --checkpoint DIR --lengths 1k,2k,4k [--depths 0,0.25,0.5,0.75,1]
                       [--samples N] [--seed S] [--json [FILE]] [--png FILE]
    rnope-eval niah    (same options; real-text haystack, key-value needle)
    rnope-eval passkey --hf DIR ...        (an rnope-convert export, run by transformers)
    rnope-eval loss --checkpoint DIR (--input-ids FILE | --data FILE --length N [--samples N])
                    [--json [FILE]] [--png FILE]
    rnope-eval loss --checkpoint DIR --input-ids FILE --document-mask [--eod ID] --json
                    (packed documents that do not see each other, as document-masked training)

passkey / niah: accuracy per (length, depth) = share of samples whose greedy answer is
exactly the hidden key (see :mod:`rnope_megatron.eval.scoring`); lengths in tokens, ``k`` =
1024. ``--json`` without FILE prints the JSON instead of the table. Every failure a user
can cause ends in one line ``rnope-eval: ...`` and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from rnope_megatron.common.cli import finish_console_imports, one_line_errors, start_console_imports

# A console script's entry module: quiet the library notices no user can act on (Apex/TE
# missing on CPU, ...) before the imports below bring Megatron in and print them, and
# keep the garbage collector out of those imports (common/cli.py).
start_console_imports()

from rnope_megatron.common.output import check_file_target, check_output, staged_output, write_text  # noqa: E402
from rnope_megatron.eval import models, plots  # noqa: E402
from rnope_megatron.eval.lm_eval_tasks import TOOL as LM_EVAL_TASKS_TOOL  # noqa: E402
from rnope_megatron.eval.lm_eval_tasks import write_tasks  # noqa: E402
from rnope_megatron.eval.loss import loss_command, write_loss_outputs  # noqa: E402
from rnope_megatron.eval.memory import available_bytes, refuse_if_too_large
from rnope_megatron.eval.scoring import by_length, default_batch_size, evaluate_grid  # noqa: E402
from rnope_megatron.eval.tasks import build_grid, minimum_length  # noqa: E402
finish_console_imports()


def parse_lengths(text: str) -> list[int]:
    """``1k,2k,4096`` -> [1024, 2048, 4096] (k = 1024, as long-context evaluations count)."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            value = int(item[:-1]) * 1024 if item.endswith("k") else int(item)
        except ValueError:
            raise ValueError(f"--lengths: {item!r} is not a length (e.g. 512, 1k, 16k)") from None
        if value < 1:
            raise ValueError(f"--lengths: {item!r} must be positive")
        lengths.append(value)
    return lengths


def parse_depths(text: str) -> list[float]:
    depths = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--depths: {item!r} is not a number in [0, 1]") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--depths: {value} is outside [0, 1]")
        depths.append(value)
    return depths


def _write_json(result: dict, target) -> None:
    if target and target != "-":
        write_text(target, json.dumps(result, indent=2) + "\n", "--json")


def check_file_outputs(args, inputs=()) -> None:
    """Before any work: --json FILE and --png FILE can be written (folder exists and is
    writable, not a directory, not an input, not the same file)."""
    json_file = args.json if args.json not in (None, "-") else None
    if json_file:
        check_file_target(json_file, "--json", inputs)
    if args.png:
        check_file_target(args.png, "--png", inputs, others=[("--json", json_file)])


def retrieval_command(task: str, args) -> dict:
    """Build the grid, score it, write the outputs (see module docstring)."""
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    check_file_outputs(args, [path for path in (args.checkpoint, args.hf) if path])
    started = time.time()
    model = models.load(args.checkpoint, args.hf, args.threads)
    shortest = minimum_length(task, model.tokenizer)
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ValueError(f"--lengths: {too_short} too short for a {task} prompt (at least {shortest} tokens)")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    # before any prompt is built: a length that cannot fit is refused, not run out of memory
    refuse_if_too_large("--lengths", lengths, len(depths) * args.samples,
                        lambda n: args.batch_size or default_batch_size(n), *model.widths, model.vocab_size,
                        available_bytes())
    grid = build_grid(task, lengths, depths, args.samples, args.seed, model.tokenizer)

    def progress(row):
        if not args.quiet:
            print(f"  length {row['length']:6d}  depth {row['depth']:.2f}  accuracy {row['accuracy']:.2f}  "
                  f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    rows = []
    for length in lengths:
        batch = args.batch_size or default_batch_size(length)
        rows += evaluate_grid(model.logits, {k: v for k, v in grid.items() if k[0] == length}, batch, progress)
    result = {
        "task": task, "model": model.description, "lengths": lengths, "depths": depths,
        "samples": args.samples, "seed": args.seed,
        "scoring": "exact match of the greedy answer (teacher-forced argmax over every answer token)",
        "accuracy_by_length": {str(k): v for k, v in by_length(rows).items()},
        "token_accuracy_by_length": {str(k): v for k, v in by_length(rows, "token_accuracy").items()},
        "cells": rows, "seconds": round(time.time() - started, 2),
    }
    _write_json(result, args.json)
    if args.png:
        plots.heatmap(rows, f"{task}: {pathlib.Path(model.description['source']).name}", args.png)
    return result


def lm_eval_tasks_command(args) -> dict:
    """``rnope-eval lm-eval-tasks``: this package's cases as a harness task directory."""
    inputs = [args.tokenizer] if args.tokenizer != "bytes" else []
    check_output(args.out, inputs, args.force, LM_EVAL_TASKS_TOOL, label="--out")  # before any work
    tokenizer = models.tokenizer_of(args.tokenizer, "--tokenizer")
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    with staged_output(args.out, inputs, args.force, {"command": "lm-eval-tasks", "task": args.task},
                       LM_EVAL_TASKS_TOOL) as stage:
        names = write_tasks(stage, args.task, lengths, depths, args.samples, args.seed, tokenizer, args.out)
    return {"out": str(args.out), "tasks": names, "group": f"rnope_{args.task}"}


def _table(result: dict) -> str:
    depths, lengths = result["depths"], result["lengths"]
    cell = {(r["length"], r["depth"]): r["accuracy"] for r in result["cells"]}
    lines = [f"{result['task']} exact-match accuracy ({result['samples']} samples per cell)",
             "depth   " + "".join(f"{n:>8d}" for n in lengths)]
    for d in depths:
        lines.append(f"{d:<8.2f}" + "".join(f"{cell[(n, d)]:8.2f}" for n in lengths))
    lines.append("mean    " + "".join(f"{result['accuracy_by_length'][str(n)]:8.2f}" for n in lengths))
    return "\n".join(lines)


def loss_main(args) -> dict:
    check_file_outputs(args, [path for path in (args.checkpoint, args.input_ids, args.data) if path])
    if args.document_mask and not args.input_ids:
        raise ValueError("--document-mask needs --input-ids FILE (packed rows of documents, each ended by the EOD id)")
    if args.eod is not None and not args.document_mask:
        raise ValueError("--eod is used only with --document-mask")
    result = loss_command(args.checkpoint, args.input_ids, args.data, args.length, args.samples, args.seed,
                          args.document_mask, args.eod)
    write_loss_outputs(result, args.json if args.json not in (None, "-") else None, args.png,
                       f"per-position loss: {pathlib.Path(args.checkpoint).name}")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnope-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for task in ("passkey", "niah"):
        p = sub.add_parser(task, help=f"{task} retrieval accuracy per (length, depth)")
        p.add_argument("--checkpoint", help="rnope-train checkpoint (iter_N or its parent; any layout)")
        p.add_argument("--hf", help="Hugging Face directory written by rnope-convert to-hf")
        p.add_argument("--lengths", required=True, help="comma-separated, e.g. 1k,2k,4k (k = 1024 tokens)")
        p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
        p.add_argument("--samples", type=int, default=10, help="samples per (length, depth) cell")
        p.add_argument("--seed", type=int, default=0, help="seed of keys and haystack stretches")
        p.add_argument("--batch-size", type=int, default=None, help="rows per forward (default ~16k tokens)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--json", nargs="?", const="-", help="write JSON to FILE (no FILE: print it)")
        p.add_argument("--png", help="heatmap PNG")
        p.add_argument("--quiet", action="store_true", help="no per-cell progress on stderr")
    p = sub.add_parser("loss", help="mean and per-position next-token loss")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input-ids", help=".npy or .json token ids [batch, seq]")
    p.add_argument("--data", help="a recipe (file or shipped name: tiny-cpu) with a data: section, or the section alone")
    p.add_argument("--length", type=int, help="tokens per sample with --data")
    p.add_argument("--samples", type=int, default=8, help="samples with --data")
    p.add_argument("--seed", type=int, default=0, help="sample order with --data")
    p.add_argument("--json", nargs="?", const="-", help="write JSON to FILE (no FILE: print it)")
    p.add_argument("--png", help="per-position loss PNG")
    p.add_argument("--document-mask", action="store_true",
                   help="rows are packed documents (each ended by the EOD id): each sees only itself, positions "
                        "restart per document, the EOD's prediction of the next document is not counted")
    p.add_argument("--eod", type=int, help="end-of-document id with --document-mask (default: the checkpoint's tokenizer's)")
    p = sub.add_parser("lm-eval-tasks", help="the retrieval prompts as an lm-evaluation-harness task directory")
    p.add_argument("--out", required=True, help="directory for the task YAML and JSON-lines files")
    p.add_argument("--force", action="store_true", help="replace a previous lm-eval-tasks output (its files only)")
    p.add_argument("--task", choices=("passkey", "niah"), default="passkey")
    p.add_argument("--tokenizer", default="bytes",
                   help="'bytes' or a tokenizer.json (an export's own), as the model reads text")
    p.add_argument("--lengths", required=True, help="comma-separated, e.g. 1k,2k,4k (k = 1024 tokens)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=10, help="samples per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="seed of keys and haystack stretches")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    with one_line_errors("rnope-eval"):
        if args.command == "lm-eval-tasks":
            result = lm_eval_tasks_command(args)
            print(f"wrote {len(result['tasks'])} tasks to {result['out']}: lm_eval run --model hf "
                  f"--model_args pretrained=HF_DIR --include_path {result['out']} --tasks {result['group']}")
        elif args.command == "loss":
            result = loss_main(args)
            if args.json == "-":
                print(json.dumps(result))
            else:
                print(f"loss {result['loss']:.6f} over {result['tokens']} tokens")
        else:
            result = retrieval_command(args.command, args)
            print(json.dumps(result) if args.json == "-" else _table(result))
    return 0
