"""Writing Megatron indexed datasets (``prefix.bin`` + ``prefix.idx``)."""

from __future__ import annotations

import os
import pathlib
from typing import Iterable

import numpy

from rnope_megatron.common import faults
from rnope_megatron.common.output import signals_clean_up, sweep_stale


def token_dtype(vocab_size: int):
    """The narrowest dtype Megatron's indexed datasets store ids of this vocabulary in."""
    return numpy.uint16 if vocab_size <= 65536 else numpy.int32


def write_indexed(prefix: str | pathlib.Path, documents: Iterable, vocab_size: int) -> int:
    """Write token documents (lists or numpy arrays of ids, each ending with the EOD id the
    caller added) as ``prefix.bin``/``prefix.idx``. Returns the token count.

    Both files are written under ``.NAME.partial-PID`` names beside them and renamed only
    when complete; on any failure (a bad document, a full disk, SIGTERM) the temporary
    files are removed and nothing appears under the final names. Leftovers of killed
    runs are swept first."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)  # may contain dots (data/web.v2): append, never replace, suffixes
    pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    final_bin, final_idx = pathlib.Path(prefix + ".bin"), pathlib.Path(prefix + ".idx")
    for final in (final_bin, final_idx):
        sweep_stale(final)
    tmp_bin, tmp_idx = (final.parent / f".{final.name}.partial-{os.getpid()}" for final in (final_bin, final_idx))
    tokens = 0
    with signals_clean_up():
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        try:
            for count, doc in enumerate(documents, start=1):
                array = numpy.asarray(doc, dtype=dtype)  # no copy when it already has the dtype
                builder.add_document(array, [array.size])
                tokens += array.size
                faults.point("mid_output", count)
            builder.finalize(str(tmp_idx))  # closes the .bin
            # The index goes last and an old index first: a crash between the renames leaves
            # no pair of a new .bin with an old .idx (a silently wrong dataset).
            final_idx.unlink(missing_ok=True)
            tmp_bin.replace(final_bin)
            tmp_idx.replace(final_idx)
        except OSError as err:
            builder.data_file.close()
            tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
            for attr in ("filename", "filename2"):  # name the file the user asked for
                name = str(getattr(err, attr, None) or "")
                for tmp, final in ((tmp_bin, final_bin), (tmp_idx, final_idx)):
                    if name == str(tmp):
                        setattr(err, attr, str(final))
            raise
        except BaseException:
            builder.data_file.close()
            tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
            raise
    return tokens
