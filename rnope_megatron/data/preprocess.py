"""``rnope-preprocess``: text or JSONL files -> a Megatron indexed dataset (.bin/.idx).

    rnope-preprocess --input a.jsonl b.jsonl --output-prefix data/web [--json-key text]
                     [--tokenizer bytes|path/to/tokenizer.json] [--force]

``.jsonl`` files give one document per line (an object whose ``--json-key`` field is a
string); any other file is one document. Empty documents are skipped. Input must be UTF-8. Each document ends with the
tokenizer's end-of-document id. Documents are streamed (one line in memory at a time);
progress is printed every few seconds; the outputs appear only when complete (written to
temporary names, then renamed; removed on any error or SIGTERM). An input without a single
document is refused: it would make an unusable dataset. An existing dataset at the prefix
is replaced only with ``--force``; an input that is one of the outputs
(``PREFIX.bin``/``PREFIX.idx``) is refused, with or without it.
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

from rnope_megatron.common.output import check_file_target
from rnope_megatron.data.dataset import documents_with_eod  # noqa: E402
from rnope_megatron.data.indexed import write_indexed  # noqa: E402
from rnope_megatron.data.tokenizers import make_tokenizer  # noqa: E402
finish_console_imports()


def _decode(raw: bytes, path: pathlib.Path, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}{where}: not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r})") from None


def iter_texts(paths: list[str], json_key: str):
    """Documents of the inputs, one at a time (a JSONL file is read line by line)."""
    for name in paths:
        path = pathlib.Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"input not found: {path}")
        if path.suffix != ".jsonl":
            text = _decode(path.read_bytes(), path, "")
            if text:
                yield text
            continue
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, path, f":{number}")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                if json_key not in record:
                    raise ValueError(f"{path}:{number}: no key {json_key!r}")
                text = record[json_key]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{number}: {json_key!r} must be a string, got {type(text).__name__}")
                del record, line, raw  # only the text stays alive while it is tokenized
                if text:  # an empty document would be a lone EOD
                    yield text


def check_outputs(inputs: list[str], output_prefix: str, force: bool) -> None:
    """Before any work: the prefix's folder is writable, no input is an output, an existing
    dataset is replaced only with ``--force``."""
    outputs = [pathlib.Path(output_prefix + suffix) for suffix in (".bin", ".idx")]
    for out in outputs:
        check_file_target(out, "--output-prefix", inputs=[name for name in inputs if pathlib.Path(name).exists()],
                          create_parent=True)
    existing = [str(out) for out in outputs if out.exists()]
    if existing and not force:
        raise FileExistsError(f"--output-prefix {output_prefix}: {existing[0]} exists (use --force to replace it)")


def preprocess(inputs: list[str], output_prefix: str, tokenizer_spec: str = "bytes", json_key: str = "text",
               force: bool = False) -> dict:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx``; returns the counts."""
    check_outputs(inputs, output_prefix, force)
    tokenizer = make_tokenizer(tokenizer_spec)
    stats = {"documents": 0, "tokens": 0}
    last = [time.time()]

    def counted(docs):
        for doc in docs:
            stats["documents"] += 1
            stats["tokens"] += doc.size
            if time.time() - last[0] > 5:
                last[0] = time.time()
                print(f"  {stats['documents']:,} documents, {stats['tokens']:,} tokens", file=sys.stderr, flush=True)
            yield doc
        if stats["documents"] == 0:  # raised inside the writer: it removes its temporary files
            raise ValueError(f"no documents in {', '.join(inputs)} (empty input would make an unusable dataset)")

    write_indexed(output_prefix, counted(documents_with_eod(iter_texts(inputs, json_key), tokenizer)),
                  tokenizer.vocab_size)
    print(f"wrote {output_prefix}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"(vocab {tokenizer.vocab_size})")
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rnope-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset at the prefix")
    args = parser.parse_args(argv)
    with one_line_errors("rnope-preprocess"):
        preprocess(args.input, args.output_prefix, args.tokenizer, args.json_key, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
