"""Per-token STAR columns through padding and padding-free collation (where they land on tokens: `weights.py`).

A tokenized example carries `star_weights` (one float per token, aligned with `input_ids` and `labels`) and, when
the reference is precomputed, `ref_logps` (log pi_ref of each token given the ones before it; 0 for the first).
Both are plain per-token lists, so TRL's truncation and packing carry them exactly like `labels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad


# Per-token columns and their padding values (padded positions are never trained, the values are placeholders).
TOKEN_COLUMNS = {"star_weights": 1.0, "ref_logps": 0.0}


@dataclass
class DataCollatorForSTAR(DataCollatorForLanguageModeling):
    """TRL's language-modeling collator that also pads (or, padding-free, concatenates) `star_weights` and
    `ref_logps` exactly like `labels`, so they stay aligned with the tokens in every batch layout."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        for key, padding_value in TOKEN_COLUMNS.items():
            if key not in examples[0]:
                continue
            values = [torch.tensor(example[key], dtype=torch.float32) for example in examples]
            if self.padding_free:
                values = [torch.cat(values)]
            batch[key] = pad(
                values, padding_value=padding_value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )
        return batch
