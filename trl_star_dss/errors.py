"""The one error type for bad input to this package (docs/method.md, "How the package is cut"): a `ValueError`, so
code that catches those keeps working; `star-dss` prints it as one line (what is wrong, how to fix it) and keeps the
traceback of anything else."""

from __future__ import annotations


class STARDSSError(ValueError):
    """A setting, an argument or a dataset this package cannot use, with the fix in its message.

    `arguments` names the Python arguments the message is about, as a caller of the raising function sets them
    (e.g. `("output_dir", "resume")`): a front end that sets them otherwise (the `star-dss` command line, with its
    flags) says which of its own options those are, without rewriting the message."""

    def __init__(self, message: str, *, arguments: tuple[str, ...] = ()):
        super().__init__(message)
        self.arguments = tuple(arguments)
