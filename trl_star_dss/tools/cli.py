"""Moved to `trl_star_dss.cli` (one module per command); this name keeps `from trl_star_dss.tools.cli import main`
(and `load_dataset_arg`, which an example imported from here) and `python -m trl_star_dss.tools.cli` working for one
release."""

from ..cli import main
from .loading import load_dataset_arg


__all__ = ["load_dataset_arg", "main"]

if __name__ == "__main__":
    main()
