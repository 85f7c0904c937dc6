"""`type: star_dss.chat_template`: Axolotl's `chat_template` dataset type with STAR weights (a config that says
`type: chat_template` with `star_dss` on is pointed here by `StarDSSPlugin.register`)."""

from axolotl.prompt_strategies.chat_template import load as chat_template

from .data import STARWrapping


def load(tokenizer, cfg, ds_cfg=None, processor=None):
    """Axolotl calls this (`axolotl.prompt_strategies.load`) for the dataset entry `ds_cfg`."""
    return STARWrapping(chat_template(tokenizer, cfg, ds_cfg, processor), cfg, ds_cfg)
