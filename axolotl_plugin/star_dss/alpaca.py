"""`type: star_dss.alpaca`: Axolotl's `alpaca` dataset type with STAR weights (a config that says `type: alpaca`
with `star_dss` on is pointed here by `StarDSSPlugin.register`)."""

from axolotl.prompt_tokenizers import AlpacaPromptTokenizingStrategy
from axolotl.prompters import AlpacaPrompter

from .data import STARWrapping


def load(tokenizer, cfg, ds_cfg=None):
    """Axolotl calls this (`axolotl.prompt_strategies.load`) for the dataset entry `ds_cfg`.

    Axolotl 0.21 builds `alpaca` in `axolotl.utils.data.wrappers._handle_alpaca_dataset`, not through a `load`
    function this module could call: the strategy below is built from the same public classes with the same
    arguments (the default prompt style; `alpaca:<style>` cannot be written after `star_dss.`, since Axolotl splits
    dataset types at the colon)."""
    strategy = AlpacaPromptTokenizingStrategy(AlpacaPrompter(None), tokenizer, cfg.train_on_inputs, cfg.sequence_len)
    return STARWrapping(strategy, cfg, ds_cfg)
