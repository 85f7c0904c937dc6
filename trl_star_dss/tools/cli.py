"""Moved to `trl_star_dss.cli` (one module per command); this name keeps `from trl_star_dss.tools.cli import main`
and `python -m trl_star_dss.tools.cli` working for one release."""

from ..cli import main


__all__ = ["main"]

if __name__ == "__main__":
    main()
