"""Moved to `trl_star_dss.demo` (a package, one file per job). This name keeps working for one release: it
re-exports the package's public names."""

from ..demo import *  # noqa: F403
from ..demo import __all__  # noqa: F401
