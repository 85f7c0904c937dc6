"""The `star-dss` command line: `main` parses the command and runs it. One module per command in `commands/`;
the options several commands share and the flags that set a STAR-DSS setting in `options.py`; the rules between
flags in `rules.py`. Importing this package loads no torch, transformers, datasets or TRL."""

from .main import main


__all__ = ["main"]
