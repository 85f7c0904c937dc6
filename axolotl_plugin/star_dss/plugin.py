"""`StarDSSPlugin`: STAR-DSS in Axolotl with one YAML line (`star_dss: true`).

Registered in the `axolotl.plugins` entry-point group, so Axolotl loads it in every run; each hook returns at once
unless the config turns STAR-DSS on (`star_dss_enabled`), so installing the package changes no one else's run.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from .args import check_keys, star_dss_enabled


class StarDSSPlugin(BasePlugin):
    """Scores the training data with a guardrail (or reads `star_dss_scores_path`), attaches per-token STAR weights
    while Axolotl tokenizes, and trains with `STARDSSAxolotlTrainer`."""

    def register(self, cfg: dict):
        # Axolotl hands plugins the raw config here, before validation drops the keys no model declares: the one
        # place a misspelled `star_dss_*` key can still be seen (and refused before any data or model loads).
        if star_dss_enabled(cfg):
            check_keys(cfg)

    def get_input_args(self) -> str:
        return "star_dss.args.StarDSSArgs"

    def load_datasets(self, cfg, preprocess: bool = False):
        if not star_dss_enabled(cfg):
            return None
        from .data import load_star_datasets

        return load_star_datasets(cfg, preprocess)

    def get_trainer_cls(self, cfg):
        if not star_dss_enabled(cfg):
            return None
        from .trainer import STARDSSAxolotlTrainer

        return STARDSSAxolotlTrainer
