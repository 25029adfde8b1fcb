"""``rnope-preprocess``: text or JSONL files -> a Megatron indexed dataset (.bin/.idx).

    rnope-preprocess --input a.jsonl b.jsonl --output-prefix data/web [--json-key text]
                     [--tokenizer bytes|path/to/tokenizer.json]

``.jsonl`` files give one document per line (the ``--json-key`` field); any other file is
one document. Each document ends with the tokenizer's end-of-document id. Progress is
printed every few seconds; the outputs appear only when complete (written to temporary
names, then renamed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from rnope_megatron.train.data import make_tokenizer, write_indexed


def iter_texts(paths: list[str], json_key: str):
    for name in paths:
        path = pathlib.Path(name)
        if not path.is_file():
            raise SystemExit(f"rnope-preprocess: input not found: {path}")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SystemExit(f"rnope-preprocess: {path}:{number}: not JSON ({err.msg})") from None
                    if json_key not in record:
                        raise SystemExit(f"rnope-preprocess: {path}:{number}: no key {json_key!r}")
                    yield record[json_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="rnope-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    tokenizer = make_tokenizer(args.tokenizer)
    stats = {"documents": 0, "tokens": 0}
    last = [time.time()]

    def documents():
        for text in iter_texts(args.input, args.json_key):
            ids = tokenizer.tokenize(text) + [tokenizer.eod]
            stats["documents"] += 1
            stats["tokens"] += len(ids)
            if time.time() - last[0] > 5:
                last[0] = time.time()
                print(f"  {stats['documents']:,} documents, {stats['tokens']:,} tokens", file=sys.stderr, flush=True)
            yield ids

    write_indexed(args.output_prefix, documents(), tokenizer.vocab_size)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"(vocab {tokenizer.vocab_size})")
    return stats


if __name__ == "__main__":
    main()
