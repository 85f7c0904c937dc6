"""`STARDSSAxolotlTrainer`: Axolotl's `AxolotlTrainer` with the STAR-DSS loss of `trl_star_dss` (one copy of the
maths: `STARLossMixin` and `trl_star_dss.loss`)."""

from __future__ import annotations

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_star_dss.collator import TOKEN_COLUMNS
from trl_star_dss.config import REFERENCE_SHAPINGS, SCORED_SHAPINGS
from trl_star_dss.trainer import STARLossMixin, STARSettings
from trl_star_dss.weights import rejection_report

from .args import settings
from .data import REJECTION_CFG_KEY


class STARCollator:
    """Wraps whichever collator Axolotl chose (padding, multipack concatenation, flattening) and lays out
    `star_weights` / `ref_logps` exactly where that collator put each example's tokens.

    Each output row holds whole examples in order (one, a multipack bin, or everything when flattened), padded on
    the tokenizer's side; where each example landed is checked against the collated `input_ids`.
    """

    def __init__(self, inner, padding_side: str):
        self.inner, self.padding_side = inner, padding_side

    def __getattr__(self, name):  # everything else is the wrapped object's
        if name == "inner":  # not set yet (unpickling in a worker process): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, features, return_tensors=None):
        groups = features if isinstance(features[0], list) else [[row] for row in features]
        columns = [key for key in TOKEN_COLUMNS if key in groups[0][0]]
        # Axolotl's truncation (`excess_length_strategy: truncate`) cuts input_ids/labels only: keep the same head.
        values = {key: [[row[key][: len(row["input_ids"])] for row in group] for group in groups] for key in columns}
        ids = [[list(row["input_ids"]) for row in group] for group in groups]
        stripped = [[{k: v for k, v in row.items() if k not in TOKEN_COLUMNS} for row in group] for group in groups]
        batch = self.inner(stripped if isinstance(features[0], list) else [g[0] for g in stripped], return_tensors)
        rows = batch["input_ids"]
        ids, values = [sum(g, []) for g in ids], {k: [sum(g, []) for g in v] for k, v in values.items()}
        if rows.shape[0] == 1 and len(groups) > 1:  # flattened: every example in one row
            ids, values = [sum(ids, [])], {k: [sum(v, [])] for k, v in values.items()}
        length = rows.shape[1]
        for key in columns:
            out = torch.full((rows.shape[0], length), TOKEN_COLUMNS[key], dtype=torch.float32)
            for b, (row_ids, row_values) in enumerate(zip(ids, values[key])):
                start = 0 if self.padding_side == "right" else length - len(row_ids)
                if rows[b, start : start + len(row_ids)].tolist() != row_ids:
                    raise ValueError(
                        f"Could not find the examples' tokens where {type(self.inner).__name__} put them, so "
                        f"`{key}` cannot be aligned. Please report this with your collator settings."
                    )
                out[b, start : start + len(row_ids)] = torch.tensor(row_values, dtype=torch.float32)
            batch[key] = out
        return batch


class STARDSSAxolotlTrainer(STARLossMixin, AxolotlTrainer):
    """Trains with `shaping` from the `star_dss_*` keys: STAR-DSS or Deep Token through `STARLossMixin.star_loss`,
    rejection sampling and SFT through Axolotl's own cross-entropy (rejected examples were dropped in the data)."""

    tag_names = ["axolotl", "star-dss"]

    def post_set_axolotl_cfg(self):
        super().post_set_axolotl_cfg()
        values = settings(self.axolotl_cfg)
        self.star_settings = STARSettings.of(values)
        rejection = (self.axolotl_cfg.get(REJECTION_CFG_KEY) or {}).get("train")
        if values["shaping"] == "rejection_sampling" and rejection:  # counted by `load_star_datasets`
            _, counts = rejection_report(*rejection, values["rejection_threshold"])
            # Floats: Axolotl averages stored values with `torch.mean`, which refuses integers.
            self.store_metrics({key: float(value) for key, value in counts.items()}, train_eval="train")
        if values["shaping"] in SCORED_SHAPINGS and self.train_dataset is not None:
            if "star_weights" not in self.train_dataset.column_names:
                raise ValueError(
                    "The training dataset has no `star_weights` column, so STAR-DSS has nothing to shape the loss "
                    "with. Prepare the data with star_dss on (`axolotl preprocess` or `axolotl train`); a dataset "
                    "prepared without it is cached under another hash and is not reused."
                )
        padding_side = getattr(self.processing_class, "padding_side", "right")
        self.data_collator = STARCollator(self.data_collator, padding_side)
        self.train_data_collator = self.data_collator
        if self.eval_data_collator is not None:
            self.eval_data_collator = STARCollator(self.eval_data_collator, padding_side)
        if values["shaping"] not in REFERENCE_SHAPINGS:
            return
        # Per-token log-probs without full logits: TRL's fused LM head, on the model under any PEFT wrapper, with the
        # fields SFTTrainer logs (entropy, top-1 accuracy).
        add_fused_lm_head(self._inner_model(self.model), outputs=("log_probs", "entropy", "is_top1"))
        self._init_reference()
        if values["precompute_ref_log_probs"]:
            self.train_dataset = self._ref_logps_column(self.train_dataset, self.args.per_device_eval_batch_size)
            if self.eval_dataset is not None:
                self.eval_dataset = self._ref_logps_column(self.eval_dataset, self.args.per_device_eval_batch_size)

    def _get_train_sampler(self, *args, **kwargs):
        # Axolotl's label balancing checks the collator's exact type (`type(collator) in (...)`): show it the
        # collator STARCollator wraps, which is the one that lays out the batch.
        wrapped = self.data_collator
        self.data_collator = getattr(wrapped, "inner", wrapped)
        try:
            return super()._get_train_sampler(*args, **kwargs)
        finally:
            self.data_collator = wrapped

    def star_loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        if self.args.include_tkps and model.training:  # Axolotl's tokens/s metric, as its own compute_loss does
            self._accumulate_token_counts(inputs)
        return super().star_loss(model, inputs, num_items_in_batch)

    def _store_star_metrics(self, metrics: dict[str, float], mode: str, inputs: dict) -> None:
        # Axolotl logs what is stored for "eval" under the stored names, beside its own `eval_loss`: evaluation
        # metrics get the `eval_` prefix here, the rule of TRL's `SFTTrainer.log` that the TRL trainer logs by.
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        self.store_metrics(metrics, train_eval=mode)


