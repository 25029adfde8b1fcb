"""What every console script shares: errors as one line, known-harmless library warnings
kept out of the user's terminal, and process groups torn down on the way out.

Console scripts return 0 from ``main()`` (``console_scripts`` wrappers pass the return
value to ``sys.exit``: anything else, e.g. a dict, would exit 1 after printing it)."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import warnings

import torch.distributed as dist

from rnope_megatron.common import collector
from rnope_megatron.common.distributed import shutdown_parallel
from rnope_megatron.common.errors import UserError
from rnope_megatron.common.output import Interrupted

# (message prefix, module) of warnings megatron-core and torch print on every CPU run
# that no user can act on. Anything else still shows.
KNOWN_HARMLESS = [
    (r"Transformer Engine and Apex are not installed", r"megatron\..*"),
    (r"Apex is not installed", r"megatron\..*"),
    (r"MimoModelConfig is experimental", r"megatron\..*"),
    (r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config"),
    # megatron reads a checkpoint's common state with torch DCP's no_dist on purpose
    (r"torch.distributed is disabled, unavailable or uninitialized", r"torch\..*"),
]


# (message prefix, category) of warnings torch and modelopt raise on behalf of whatever
# module called them (so no module filter) that no user can act on: DCP's notices while
# megatron reads a checkpoint, modelopt's import-time notices.
KNOWN_HARMLESS_ANYWHERE = [
    (r"The argument order of load has been changed", UserWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (r"transformers \S+ is not tested with current version of modelopt", UserWarning),
]


# (logger, message prefix) of log lines of the same kind.
KNOWN_HARMLESS_LOGS = [
    # Megatron routes every synchronous torch_dist save through its deprecated async path.
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    # torch DCP logs (on the root logger, with tracebacks) each fallback it tries on a
    # damaged .metadata; the one-line error names the checkpoint and its first error.
    ("", "Global metadata is not found"),
    ("", "Rank local metadata is not found"),
]


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# torch logs "No CUDA runtime is found" on it when Megatron imports cpp_extension on a CPU.
CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"


def _quiet() -> list:
    """Add the warning filters and the log filters; returns the (logger, filter) pairs."""
    for message, module in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    for message, category in KNOWN_HARMLESS_ANYWHERE:
        warnings.filterwarnings("ignore", message=message, category=category)
    added = [(logging.getLogger(logger or None), _DropMessages(prefix)) for logger, prefix in KNOWN_HARMLESS_LOGS]
    for logger, drop in added:
        logger.addFilter(drop)
    return added


def quiet_known_warnings() -> None:
    """Silence :data:`KNOWN_HARMLESS` and :data:`KNOWN_HARMLESS_ANYWHERE` warnings,
    :data:`KNOWN_HARMLESS_LOGS` and torch's
    "No CUDA runtime is found" log line (printed when megatron imports
    ``torch.utils.cpp_extension`` on a CPU machine)."""
    _quiet()
    logging.getLogger(CPP_EXTENSION_LOGGER).setLevel(logging.ERROR)


@contextlib.contextmanager
def known_warnings_quiet():
    """:func:`quiet_known_warnings` for the block only: the package's ``__init__`` imports
    Megatron inside it on a CPU-only machine (:mod:`rnope_megatron.compat.megatron_import`),
    before any console script could quiet Megatron's import-time notices itself."""
    cpp_extension = logging.getLogger(CPP_EXTENSION_LOGGER)
    level = cpp_extension.level
    with warnings.catch_warnings():
        added = _quiet()
        cpp_extension.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, drop in added:
                logger.removeFilter(drop)
            cpp_extension.setLevel(level)


_collector_was_enabled = True


def start_console_imports() -> None:
    """The first line of a console script's entry module, before the imports that bring
    Megatron in: quiet the known-harmless notices they print, and pause the cyclic garbage
    collector while they load (:mod:`rnope_megatron.common.collector` says why).
    :func:`finish_console_imports` ends the pause."""
    global _collector_was_enabled
    quiet_known_warnings()
    _collector_was_enabled = collector.pause()


def finish_console_imports() -> None:
    """After the entry module's imports: freeze what they loaded (modules, classes,
    functions: they live until exit anyway) so that no later collection traverses it, and
    resume collecting."""
    collector.resume(_collector_was_enabled, freeze=True)


def one_line(err: BaseException) -> str:
    """An exception as one line (multi-line details such as torch's size mismatches are
    joined, not cut)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on device writing {err.filename or 'output'}"
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 2000 else text[:1997] + "..."


# What a user's input or machine causes: our UserErrors (bad recipe, file, checkpoint,
# busy run directory, missing extra), bad values and OS errors (missing files, a full
# disk). Anything else is a bug: it keeps its traceback.
USER_ERRORS = (UserError, ValueError, OSError)


@contextlib.contextmanager
def one_line_errors(prog: str):
    """Turn the errors a user can cause into ``prog: <one line>`` and exit status 1, and a
    SIGTERM / SIGINT that unwound a staged writer (:mod:`rnope_megatron.common.output`) into one
    line and the status a shell gives a signal (128 + its number); tear down the process
    groups the command created either way (a ``main()`` called from Python code that has
    its own groups up leaves them up)."""
    groups_were_up = dist.is_initialized()
    try:
        yield
    except USER_ERRORS as err:
        raise SystemExit(f"{prog}: {one_line(err)}") from None
    except Interrupted as stop:
        print(f"{prog}: stopped by {stop}; partial output removed, previous output (if any) kept",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None
    finally:
        if not groups_were_up:
            shutdown_parallel()
