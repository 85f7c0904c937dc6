"""`python -m trl_star_dss.cli ...` (e.g. under `accelerate launch -m trl_star_dss.cli score ...`)."""

from .main import main


main()
