"""What every console script shares: errors as one line, known-harmless library warnings
kept out of the user's terminal, and process groups torn down on the way out.

Console scripts return 0 from ``main()`` (``console_scripts`` wrappers pass the return
value to ``sys.exit``: anything else, e.g. a dict, would exit 1 after printing it)."""

from __future__ import annotations

import contextlib
import errno
import logging
import warnings

# (message prefix, module) of warnings megatron-core and torch print on every CPU run
# that no user can act on. Anything else still shows.
KNOWN_HARMLESS = [
    (r"Transformer Engine and Apex are not installed", r"megatron\..*"),
    (r"Apex is not installed", r"megatron\..*"),
    (r"MimoModelConfig is experimental", r"megatron\..*"),
    (r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config"),
]


# (logger, message prefix) of log lines of the same kind.
KNOWN_HARMLESS_LOGS = [
    # Megatron routes every synchronous torch_dist save through its deprecated async path.
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
]


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Silence :data:`KNOWN_HARMLESS` warnings, :data:`KNOWN_HARMLESS_LOGS` and torch's
    "No CUDA runtime is found" log line (printed when megatron imports
    ``torch.utils.cpp_extension`` on a CPU machine)."""
    for message, module in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    for logger, prefix in KNOWN_HARMLESS_LOGS:
        logging.getLogger(logger).addFilter(_DropMessages(prefix))
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


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
    return text if len(text) <= 600 else text[:597] + "..."


def user_errors() -> tuple:
    """The exception types a user's input or machine causes (bad recipe, file, checkpoint,
    value, a full disk, a busy run directory). Anything else is a bug: it keeps its
    traceback."""
    from rnope_megatron.attention.native_cpu import KernelBuildError
    from rnope_megatron.checkpoint.layout import CheckpointError
    from rnope_megatron.train.run_lock import RunDirectoryBusy
    from rnope_megatron.typed import ConfigError

    return ConfigError, CheckpointError, RunDirectoryBusy, KernelBuildError, ValueError, OSError


@contextlib.contextmanager
def one_line_errors(prog: str):
    """Turn the errors a user can cause into ``prog: <one line>`` and exit status 1;
    tear down process groups either way."""
    try:
        yield
    except user_errors() as err:
        raise SystemExit(f"{prog}: {one_line(err)}") from None
    finally:
        from rnope_megatron.distributed import shutdown_parallel

        shutdown_parallel()
