"""`STARDSSAxolotlTrainer`: Axolotl's `AxolotlTrainer` with the STAR-DSS loss of `trl_star_dss` (one copy of the
maths: `STARLossMixin` and `trl_star_dss.loss`)."""

from __future__ import annotations

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_star_dss.collator import TOKEN_COLUMNS
from trl_star_dss.config import REFERENCE_SHAPINGS, SCORED_SHAPINGS, STARSettings
from trl_star_dss.errors import STARDSSError
from trl_star_dss.loss_mixin import STARLossMixin
from trl_star_dss.weights import rejection_report

from .data import LOG, rejection_counts


class STARDSSAxolotlTrainer(STARLossMixin, AxolotlTrainer):
    """Trains with `shaping` from the `star_dss_*` keys: STAR-DSS or Deep Token through `STARLossMixin.star_loss`,
    rejection sampling and SFT through Axolotl's own cross-entropy (rejected examples were dropped in the data)."""

    tag_names = ["axolotl", "star-dss"]

    def post_set_axolotl_cfg(self):
        super().post_set_axolotl_cfg()
        # The settings came as training arguments (`StarDSSPlugin.get_training_args`, into the dataclass of
        # `get_training_args_mixin`).
        self.star_settings = STARSettings.of(self.args)
        shaping = self.args.shaping
        if shaping == "rejection_sampling":  # counted while the data was prepared (`data.STARWrapping`)
            counts, said = rejection_counts(self.axolotl_cfg, self.processing_class.name_or_path)
            if counts is not None:
                message, metrics = rejection_report(*counts, self.args.rejection_threshold)
                if not said:  # prepared by an earlier `axolotl preprocess`: say it in this run's log too
                    LOG.info(message)
                # Floats: Axolotl averages stored values with `torch.mean`, which refuses integers.
                self.store_metrics({key: float(value) for key, value in metrics.items()}, train_eval="train")
        if (
            shaping in SCORED_SHAPINGS
            and self.train_dataset is not None
            and ("star_weights" not in self.train_dataset.column_names)
        ):
            raise STARDSSError(
                "The training dataset has no `star_weights` column, so STAR-DSS has nothing to shape the loss "
                "with: it was loaded already tokenized, or its dataset type is not `chat_template` / `alpaca` "
                "(`star_dss.chat_template` / `star_dss.alpaca`). Prepare the raw data with star_dss on "
                "(`axolotl preprocess` or `axolotl train`); a dataset prepared without it is cached under another "
                "hash and is not reused."
            )
        if shaping not in REFERENCE_SHAPINGS:
            return
        # Per-token log-probs without full logits: TRL's fused LM head, on the model under any PEFT wrapper, with the
        # fields SFTTrainer logs (entropy, top-1 accuracy).
        add_fused_lm_head(self._inner_model(self.model), outputs=("log_probs", "entropy", "is_top1"))
        self._init_reference()
        if self.args.precompute_ref_log_probs:
            self.train_dataset = self._ref_logps_column(self.train_dataset, self.args.per_device_eval_batch_size)
            if self.eval_dataset is not None:
                self.eval_dataset = self._ref_logps_column(self.eval_dataset, self.args.per_device_eval_batch_size)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.shaping not in REFERENCE_SHAPINGS:
            # Rejection sampling and SFT train Axolotl's own cross-entropy with Axolotl's own collator
            # (`StarDSSPlugin.get_collator_cls_and_kwargs` gives none): the per-token columns are not read.
            self._signature_columns = [c for c in self._signature_columns if c not in TOKEN_COLUMNS]

    def star_loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        if self.args.include_tkps and model.training:  # Axolotl's tokens/s metric, as its own compute_loss does
            self._accumulate_token_counts(inputs)
        return super().star_loss(model, inputs, num_items_in_batch)

    def _store_star_metrics(self, metrics: dict[str, float], mode: str, inputs: dict) -> None:
        # Axolotl logs what is stored for "eval" under the stored names, beside its own `eval_loss`: evaluation
        # metrics get the evaluation's prefix here (`eval_`, or `eval_<name>` for a named eval set), as the TRL
        # trainer logs them.
        if mode == "eval":
            metrics = {self.eval_metric_name(key): value for key, value in metrics.items()}
        self.store_metrics(metrics, train_eval=mode)
