"""The one base class of errors a user causes (not bugs), so every CLI can tell them apart."""


class UserError(Exception):
    """A problem with the user's input or machine: a bad recipe, file or checkpoint, a busy
    run directory, a missing extra. The command-line tools print its message as one line
    (:mod:`rnope_megatron.common.cli`); anything else keeps its traceback."""


class MissingDependency(UserError, RuntimeError):
    """An optional extra this command needs is not installed; the message says which."""
