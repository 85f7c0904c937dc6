"""The one error type for bad input to this package (docs/method.md 4): a `ValueError`, so code that catches those
keeps working; `star-dss` prints it as one line (what is wrong, how to fix it) and keeps the traceback of anything else."""


class STARDSSError(ValueError):
    """A setting, an argument or a dataset this package cannot use, with the fix in its message."""
