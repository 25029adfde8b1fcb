"""Writing Megatron indexed datasets (``prefix.bin`` + ``prefix.idx``)."""

from __future__ import annotations

import pathlib
from typing import Iterable

import numpy


def token_dtype(vocab_size: int):
    """The narrowest dtype Megatron's indexed datasets store ids of this vocabulary in."""
    return numpy.uint16 if vocab_size <= 65536 else numpy.int32


def write_indexed(prefix: str | pathlib.Path, documents: Iterable, vocab_size: int) -> int:
    """Write token documents (lists or numpy arrays of ids, each ending with the EOD id the
    caller added) as ``prefix.bin``/``prefix.idx``. Returns the token count.

    Both files are written under ``.tmp`` names and renamed only when complete; on any
    failure (a bad document, a full disk) the temporary files are removed and nothing
    appears under the final names."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)  # may contain dots (data/web.v2): append, never replace, suffixes
    pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp_bin, tmp_idx = pathlib.Path(prefix + ".bin.tmp"), pathlib.Path(prefix + ".idx.tmp")
    tokens = 0
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        for doc in documents:
            array = numpy.asarray(doc, dtype=dtype)  # no copy when it already has the dtype
            builder.add_document(array, [array.size])
            tokens += array.size
        builder.finalize(str(tmp_idx))  # closes the .bin
    except BaseException:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    # The index goes last and an old index first: a crash between the renames leaves no
    # pair of a new .bin with an old .idx (which would read as a silently wrong dataset).
    pathlib.Path(prefix + ".idx").unlink(missing_ok=True)
    tmp_bin.replace(prefix + ".bin")
    tmp_idx.replace(prefix + ".idx")
    return tokens
