"""Precomputed reference log-probs (docs/method.md, "The loss and the reference", "Precomputed"): one pass of pi_ref over the tokenized dataset
before training stores `log pi_ref(y_t)` of every dataset token, so training with a token-level KL estimator holds no
reference model. The pass is split across processes and cached by what it depends on."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os

import numpy as np
import torch
from tqdm.auto import tqdm
from trl.trainer.utils import pad

from .storage import save_dataset_atomic


logger = logging.getLogger(__name__)


def reference_key(reference, dataset, disable_adapters: bool) -> str:
    """What the precomputed reference log-probs depend on: the reference (class, config, a sample of every weight;
    PEFT adapters on or off) and the dataset's token ids (its exact content, not `datasets`' fingerprint, which is
    random for functions it cannot hash)."""
    digest = hashlib.sha256()
    model = reference.module if hasattr(reference, "module") else reference
    digest.update(f"{type(model).__name__}|{model.config.to_json_string()}|{disable_adapters}".encode())
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}|{tuple(parameter.shape)}|{parameter.dtype}".encode() + sample.tobytes())
    for batch in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=4096):
        column = batch.column(0).combine_chunks()
        digest.update(
            np.asarray(column.value_lengths()).tobytes() + np.asarray(column.flatten()).astype(np.int64).tobytes()
        )
    return digest.hexdigest()[:20]


@torch.no_grad()
def ref_logps_column(
    accelerator, reference, dataset, batch_size: int, disable_adapters: bool, cache_dir: str, progress: bool = True
):
    """`dataset` with a `ref_logps` column: log pi_ref of every token (0 for the first), from `reference` (with its
    PEFT adapters disabled when `disable_adapters`: the policy before any update).

    Every process computes its share of the examples and the shares are gathered. The result is cached in
    `cache_dir`, keyed by `reference_key`, so a second identical run runs no reference forward and any change
    computes it anew."""
    from accelerate.utils import gather_object
    from datasets import Dataset, load_from_disk

    with _whole_weights(reference):  # the key samples every weight, and the pass reads them all
        path = os.path.join(cache_dir, reference_key(reference, dataset, disable_adapters))
        cached = os.path.exists(path)
        rows = None if cached else _rows(accelerator, reference, dataset, batch_size, disable_adapters, progress)
    if not cached:
        column = [None] * len(dataset)
        for index, values in gather_object(rows):
            column[index] = values
        if accelerator.is_main_process:
            save_dataset_atomic(Dataset.from_dict({"ref_logps": column}), path)
        accelerator.wait_for_everyone()
    else:
        logger.info(f"Reference log-probs of {len(dataset)} examples read from the cache {path}")
    return dataset.add_column("ref_logps", load_from_disk(path)["ref_logps"])


def _whole_weights(model):
    """A context in which a model whose weights DeepSpeed ZeRO-3 partitioned across processes holds them whole.

    The pass runs while the trainer is built, before the DeepSpeed engine that fetches each layer's weights for its
    forward exists: its forward would read empty partitions, and `reference_key` would sample none of the weights (so
    two references of one architecture would share a cache entry). Gathering them costs the full weights on every
    process for the pass (no gradients, no optimizer state). Nothing to do for an unsharded model, or for FSDP, whose
    sharding starts when training does."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_status")]  # set by ZeRO-3 only
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    return deepspeed.zero.GatheredParameters(partitioned, enabled=bool(partitioned))


def _rows(
    accelerator, reference, dataset, batch_size: int, disable_adapters: bool, progress: bool
) -> list[tuple[int, list[float]]]:
    """This process's share of the reference pass, as `(example index, ref_logps)`. Shares are padded to the same
    length, so sharded models run the same number of forwards on every process."""
    device = accelerator.device
    disabled = accelerator.unwrap_model(reference).disable_adapter() if disable_adapters else contextlib.nullcontext()
    was_training = reference.training
    reference.eval()
    rows = []
    with accelerator.split_between_processes(list(range(len(dataset))), apply_padding=True) as mine, disabled:
        bar = tqdm(
            total=len(mine),
            desc="Precomputing reference log-probs",
            unit="ex",
            disable=not progress or not accelerator.is_local_main_process,
        )
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            sequences = dataset.select(indices)["input_ids"]
            lengths = [len(ids) for ids in sequences]
            input_ids = pad([torch.tensor(ids) for ids in sequences], padding_value=0, padding_side="right")
            attention_mask = pad(
                [torch.ones(n, dtype=torch.long) for n in lengths], padding_value=0, padding_side="right"
            )
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            logps = (
                reference(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    labels=labels.to(device),
                    fused_lm_head=True,
                )
                .log_probs.float()
                .cpu()
            )
            rows += [(i, [0.0] + logps[r, : n - 1].tolist()) for r, (i, n) in enumerate(zip(indices, lengths))]
            bar.update(len(indices))
        bar.close()
    reference.train(was_training)
    return list(dict(rows).items())  # the padding repeats the last example: once is enough
