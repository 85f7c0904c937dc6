"""Axolotl's collators with `star_weights` / `ref_logps` laid out exactly where each collator put each example's
tokens; `collator_for(cfg, is_eval)` answers Axolotl's `get_collator_cls_and_kwargs` hook with one of them."""

from __future__ import annotations

import torch
from axolotl.utils.collators import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)
from transformers import DataCollatorWithFlattening

from trl_star_dss.collator import TOKEN_COLUMNS
from trl_star_dss.errors import STARDSSError


class STARColumns:
    """First in the MRO of an Axolotl collator: takes the per-token columns out of the features, lets the collator
    lay out the rest (padding, multipack concatenation, flattening), then puts the columns beside their tokens.

    It must come before the collator: the batch-sampler collators concatenate every key of a bin, and after
    Axolotl's truncation (`excess_length_strategy: truncate`, which cuts `input_ids`/`labels` only) ours are longer.
    Each output row holds whole examples in order (one, a multipack bin, or everything when flattened), padded on
    the tokenizer's side; where each example landed is checked against the collated `input_ids`.
    """

    def __call__(self, features, return_tensors=None):
        groups = features if isinstance(features[0], list) else [[row] for row in features]
        columns = [key for key in TOKEN_COLUMNS if key in groups[0][0]]
        # Keep the head that Axolotl's truncation kept of input_ids.
        values = {key: [[row[key][: len(row["input_ids"])] for row in group] for group in groups] for key in columns}
        ids = [[list(row["input_ids"]) for row in group] for group in groups]
        stripped = [[{k: v for k, v in row.items() if k not in TOKEN_COLUMNS} for row in group] for group in groups]
        batch = super().__call__(
            stripped if isinstance(features[0], list) else [g[0] for g in stripped], return_tensors
        )
        rows = batch["input_ids"]
        ids, values = [sum(g, []) for g in ids], {k: [sum(g, []) for g in v] for k, v in values.items()}
        if rows.shape[0] == 1 and len(groups) > 1:  # flattened: every example in one row
            ids, values = [sum(ids, [])], {k: [sum(v, [])] for k, v in values.items()}
        length = rows.shape[1]
        padding_side = getattr(getattr(self, "tokenizer", None), "padding_side", "right")
        for key in columns:
            out = torch.full((rows.shape[0], length), TOKEN_COLUMNS[key], dtype=torch.float32)
            for b, (row_ids, row_values) in enumerate(zip(ids, values[key])):
                start = 0 if padding_side == "right" else length - len(row_ids)
                if rows[b, start : start + len(row_ids)].tolist() != row_ids:
                    raise STARDSSError(
                        f"Could not find the examples' tokens where {type(self).__name__} put them, so `{key}` "
                        "cannot be aligned. Please report this with your collator settings."
                    )
                out[b, start : start + len(row_ids)] = torch.tensor(row_values, dtype=torch.float32)
            batch[key] = out
        return batch


class STARDataCollatorForSeq2Seq(STARColumns, DataCollatorForSeq2Seq):
    pass


class STARBatchSamplerDataCollatorForSeq2Seq(STARColumns, BatchSamplerDataCollatorForSeq2Seq):
    pass


class STARV2BatchSamplerDataCollatorForSeq2Seq(STARColumns, V2BatchSamplerDataCollatorForSeq2Seq):
    pass


class STARDataCollatorWithFlattening(STARColumns, DataCollatorWithFlattening):
    def __init__(self, tokenizer=None, padding=None, pad_to_multiple_of=None, **kwargs):
        # Axolotl builds a hook's collator as `cls(tokenizer, padding=..., pad_to_multiple_of=..., ...)`; the
        # flattening collator takes none of these (Axolotl drops them for its own, core/builders/causal.py).
        super().__init__(**kwargs)


def collator_for(cfg, is_eval: bool = False):
    """The STAR collator class for the layout Axolotl's builder would choose (`HFCausalTrainerBuilder.build_collator`
    in 0.21: batch-sampler V1/V2 when packing, flattening with `batch_flattening`, else padding)."""
    packed = cfg.get("eval_sample_packing") if is_eval else cfg.get("sample_packing")
    if packed:
        # Read-only use of Axolotl's list of model types with multipack support, the builder's own V2 condition.
        from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

        attention, model_type = cfg.get("attn_implementation"), cfg.get("model_config_type")
        if (
            attention == "flex_attention"
            or model_type in SUPPORTED_MULTIPACK_MODEL_TYPES
            or (model_type == "llama" and attention != "flash_attention_2")
        ):
            return STARV2BatchSamplerDataCollatorForSeq2Seq
        return STARBatchSamplerDataCollatorForSeq2Seq
    if cfg.get("batch_flattening"):
        return STARDataCollatorWithFlattening
    return STARDataCollatorForSeq2Seq
