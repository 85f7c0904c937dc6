"""STAR-DSS for Axolotl (arXiv 2505.17196). Turn it on with `star_dss: true` and a `star_dss_guardrail` (or
`star_dss_scores_path`); see `star_dss.args` for every key and `star_dss.plugin` for the Axolotl hooks used."""

from .args import StarDSSArgs, star_dss_enabled
from .plugin import StarDSSPlugin


__all__ = ["StarDSSArgs", "StarDSSPlugin", "star_dss_enabled"]
