"""`STARDSSTrainer`: TRL's `SFTTrainer` with the STAR-weighted loss and the paper's baselines (docs/method.md, "The loss and the reference", 1.3).

Data flows one way: scored dataset (`star` column) -> TRL tokenization -> per-token `star_weights` (and, optionally,
precomputed `ref_logps`) -> truncation / packing / collation, aligned with `labels` -> the loss in `loss.py`.

The `SFTConfig` options each shaping honours or refuses: `contract.py`. The members of `SFTTrainer` that are not
public API and are read or overridden here, each with why: docs/training.md, "Where the trainer touches TRL's
internals".
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer
from trl import SFTTrainer
from trl.data_utils import pack_dataset

from .choices import REFERENCE_SHAPINGS, SCORED_SHAPINGS
from .collator import TOKEN_COLUMNS, DataCollatorForSTAR
from .config import STARDSSConfig, STARSettings
from .contract import check_context_parallel, check_loss_options, check_peft_method
from .errors import STARDSSError
from .formats import STAR_COLUMN, check_star_dataset, dataset_format, example_columns
from .loss_mixin import STARLossMixin, _is_peft_model
from .special_tokens import content_special_token_rule
from .tokenized import (  # noqa: F401 (example_star_weights and star_weights_column: importable from here too)
    check_star_weights_column,
    example_response_mask,
    example_star_weights,
    star_weights_column,
)
from .weights import rejected, rejection_report


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from peft import PeftConfig, PeftModel
    from transformers import (
        BitsAndBytesConfig,
        DataCollator,
        EvalPrediction,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        ProcessorMixin,
        TrainerCallback,
    )


logger = logging.getLogger(__name__)


class STARDSSTrainer(STARLossMixin, SFTTrainer):
    """Trainer for STAR-DSS, safety-shaped supervised finetuning (`SFTTrainer` plus a reference model).

    For details on STAR-DSS, see the paper: [Shape it Up! Restoring LLM Safety during
    Finetuning](https://huggingface.co/papers/2505.17196), and docs/method.md. The paper's baselines (plain SFT,
    rejection sampling, Deep Token) are `args.shaping` values of the same trainer.

    Args:
        model ([`~transformers.PreTrainedModel`] or `str`):
            Model to be trained, or the string identifier of the model to be instantiated from a pretrained model.
        args ([`STARDSSConfig`], *optional*):
            Training arguments: `SFTConfig`'s and the STAR-DSS settings. The `SFTConfig` options a shaping cannot
            honour are refused when the trainer is built (docs/training.md).
        data_collator ([`~transformers.DataCollator`], *optional*):
            Data collator to batch samples from the dataset. It defaults to a [`DataCollatorForSTAR`]: TRL's
            language-modeling collator with the same choices (padding-free, pad token) that also carries the
            per-token `star_weights` and `ref_logps`. A collator of your own must carry them too.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Dataset for training: scored (a `star` column from `star-dss score`), unscored with `args.guardrail` set
            (scored at start-up), or tokenized with a `star_weights` column ([`star_weights_column`]).
        eval_dataset ([`~datasets.Dataset`] or `dict` of [`~datasets.Dataset`], *optional*):
            Dataset for evaluation, in the same forms as `train_dataset` (scored already: it is not scored here).
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or [`~transformers.ProcessorMixin`], *optional*):
            Class to process the data. Required for a model built in code (it has no name to load one from).
        compute_loss_func (`Callable`, *optional*):
            As in `SFTTrainer` (deprecated there); refused with the `star_dss` and `deep_token` shapings, which train
            their own loss.
        compute_metrics (`Callable`, *optional*):
            Function to compute metrics at evaluation. Must take in an [`~transformers.EvalPrediction`] and return a
            dictionary string to float.
        callbacks (`list` of [`~transformers.TrainerCallback`], *optional*):
            Callbacks to use during training.
        optimizers (`tuple` of `torch.optim.Optimizer` and `torch.optim.lr_scheduler.LambdaLR`, *optional*, defaults to `(None, None)`):
            Tuple containing the optimizer and the learning rate scheduler to use for training.
        optimizer_cls_and_kwargs (`tuple[type[torch.optim.Optimizer], dict[str, Any]]`, *optional*):
            Optimizer class and its keyword arguments, instead of `optimizers`.
        preprocess_logits_for_metrics (`Callable`, *optional*):
            Function to preprocess the logits before computing the metrics. Must take in the `logits` and `labels` and
            return the logits to be used for metrics computation.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization of a model given by name (QLoRA).
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration. An adapter method (LoRA, ...) gives the reference for free: the same model with its
            adapters disabled. Prompt tuning and p-tuning work too; prefix tuning is refused (docs/training.md).
        formatting_func (`Callable`, *optional*):
            Function to format the dataset. Must take in an example and return an example.
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            The reference pi_ref. Without it the reference is, in order: precomputed log-probs
            (`args.precompute_ref_log_probs`, of `ref_model` when given), the same model with its PEFT adapters
            disabled, or a frozen copy of the model taken before training.
    """

    _tag_names = ["trl", "sft", "star-dss"]
    _name = "STAR-DSS"
    # Read by TRL's model card (as its own trainers' `_paper`).
    _paper = {
        "title": "Shape it Up! Restoring LLM Safety during Finetuning",
        "id": "2505.17196",
        "citation": (
            "@inproceedings{peng2025shape,\n"
            "    title        = {{Shape it Up! Restoring LLM Safety during Finetuning}},\n"
            "    author       = {ShengYun Peng and Pin-Yu Chen and Jianfeng Chi and Seongmin Lee and Duen Horng Chau},\n"
            "    booktitle    = {Advances in Neural Information Processing Systems},\n"
            "    year         = 2025,\n"
            "    eprint       = {arXiv:2505.17196},\n"
            "}"
        ),
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        args: STARDSSConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        ref_model: PreTrainedModel | None = None,
    ):
        args = self._check_arguments(model, args, processing_class, compute_loss_func, peft_config)
        uses_scores = args.shaping in SCORED_SHAPINGS
        columns = (train_dataset.column_names or []) if train_dataset is not None else []
        if uses_scores and "input_ids" not in columns and STAR_COLUMN not in columns and train_dataset is not None:
            if not args.guardrail:
                raise STARDSSError(
                    f"shaping={args.shaping!r} needs STAR scores, but the train dataset has no `{STAR_COLUMN}` column "
                    "and `guardrail` is not set. Score it first (`star-dss score ... --output DIR`, then "
                    "`datasets.load_from_disk('DIR/dataset')`), or set `guardrail=` to score it at start-up."
                )
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(
                    model if isinstance(model, str) else model.config._name_or_path
                )
            train_dataset = self._score_at_start(train_dataset, processing_class, args)
        # The eval datasets are checked as TRL prepares them (`_prepare_dataset`), unless it skips that.
        named_eval = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset} if eval_dataset else {}
        skip_prepare = (args.dataset_kwargs or {}).get("skip_prepare_dataset", False)
        for name, dataset in {"train": train_dataset, **(named_eval if skip_prepare else {})}.items():
            self._check_dataset(dataset, args, name)
        if args.star_report and train_dataset is not None and STAR_COLUMN in train_dataset.column_names:
            self._write_star_report(train_dataset, os.path.join(args.output_dir, "star_report"))
        # With precomputed reference log-probs, packing waits until they exist (the reference runs on whole examples).
        self._defer_packing = args.precompute_ref_log_probs and args.shaping in REFERENCE_SHAPINGS
        self._deferred_packing: dict[str, bool] = {}
        self._rejection_metrics: dict[str, dict[str, int]] = {}  # `_reject`'s counts, for the first logged step
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        check_context_parallel(args.shaping, self.accelerator.parallelism_config)
        for mode, counts in self._rejection_metrics.items():
            self._metrics[mode].update({key: [value] for key, value in counts.items()})
        if data_collator is None:
            # TRL's own collator, with its choices (padding-free, pad token, multiple), that also carries
            # star_weights / ref_logps. Made here, after `SFTTrainer.__init__`, because TRL 1.16 refuses any collator
            # passed in when padding-free (and BFD packing is padding-free): "Passing a custom data collator is not
            # supported when using padding-free."
            self.data_collator = DataCollatorForSTAR(**asdict(self.data_collator))

        self.star_settings = STARSettings.of(args)
        self._init_reference(ref_model)
        if self._defer_packing:
            self.train_dataset = self._with_ref_logps(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._with_ref_logps(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._with_ref_logps(self.eval_dataset, "eval")
            self._precompute_reference = None  # not held during training

    @staticmethod
    def _check_arguments(model, args, processing_class, compute_loss_func, peft_config) -> STARDSSConfig:
        """The arguments checked before anything is loaded: a tokenizer to read, a `STARDSSConfig` (made when None),
        and the host options and PEFT method this shaping cannot honour (`contract.py`)."""
        named = isinstance(model, str) or getattr(getattr(model, "config", None), "_name_or_path", "")
        if processing_class is None and not named:
            # TRL would load the tokenizer from the model's name, which a model built in code does not have, and fail
            # with an error about hub repository ids.
            raise STARDSSError(
                f"processing_class is None and the model (a {type(model).__name__} built in code) has no name or path "
                "to load its tokenizer from. Pass the tokenizer: STARDSSTrainer(model, ..., processing_class=tokenizer)."
            )
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = STARDSSConfig(f"{os.path.basename(str(name))}-STAR-DSS")
        if not isinstance(args, STARDSSConfig):
            raise TypeError(
                f"args is a {type(args).__name__}; STARDSSTrainer needs a STARDSSConfig. Build one with the same "
                "fields: STARDSSConfig(**your_config.to_dict()) plus the STAR-DSS fields."
            )
        check_loss_options(
            args.shaping, args.loss_type, args.label_smoothing_factor, args.neftune_noise_alpha, compute_loss_func
        )
        check_context_parallel(args.shaping, args.parallelism_config)
        if peft_config is not None:
            peft_type = peft_config.peft_type
        elif _is_peft_model(model):
            peft_type = model.peft_config[model.active_adapter].peft_type
        else:
            peft_type = None
        check_peft_method(args.shaping, getattr(peft_type, "value", peft_type))
        return args

    @staticmethod
    def _check_dataset(dataset, args: STARDSSConfig, dataset_name: str) -> None:
        """What a shaping needs of a dataset, checked before anything reads it (issue 25): the `star` column of a scored
        dataset, the `star_weights` column of a tokenized one (`tokenized.check_star_weights_column`)."""
        if dataset is None or args.shaping not in SCORED_SHAPINGS:
            return
        columns = dataset.column_names or []
        if "input_ids" in columns and args.shaping == "rejection_sampling":
            raise STARDSSError(
                f"shaping='rejection_sampling' needs each response's whole-response score, which a tokenized "
                f"{dataset_name} dataset no longer has. Pass the untokenized scored dataset (its `{STAR_COLUMN}` column)."
            )
        if "input_ids" in columns:
            check_star_weights_column(dataset, dataset_name)
        elif STAR_COLUMN in columns:
            check_star_dataset(dataset)

    # -- data ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _write_star_report(dataset, directory: str) -> None:
        from accelerate import PartialState

        from .scoring.startup import (
            write_star_report,  # the core's one way into scoring (docs/method.md, "How the package is cut")
        )

        if PartialState().is_main_process:
            write_star_report(dataset, directory)

    @staticmethod
    def _score_at_start(dataset, tokenizer, args: STARDSSConfig):
        from accelerate import PartialState

        # The core's one way into scoring (docs/method.md, "How the package is cut"): loaded only when a dataset needs scores.
        from .scoring.startup import score_for_training

        scored, _ = score_for_training(
            dataset,
            tokenizer,
            args,
            output_dir=args.star_scores_dir or os.path.join(args.output_dir, "star_scores"),
            output_name="star_scores_dir",
            log=PartialState().is_main_process,
        )
        return scored

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = dataset.column_names
        uses_scores = args.shaping in SCORED_SHAPINGS
        tokenized = "input_ids" in columns
        if not tokenized and uses_scores and STAR_COLUMN not in columns:
            # Start-up scoring (`guardrail=`) scores the train dataset only (issue 33): an eval set is scored apart.
            fix = (
                "Score it with `star-dss score` first (or set `guardrail=` to score the train dataset at start-up)."
                if dataset_name == "train"
                else "`guardrail=` scores the train dataset only: score this one too (`star-dss score --output DIR`, "
                "or `score_dataset` in Python) and pass the scored dataset (`datasets.load_from_disk('DIR/dataset')`) "
                "as eval_dataset."
            )
            raise STARDSSError(
                f"The {dataset_name} dataset has no `{STAR_COLUMN}` column, so shaping={args.shaping!r} has no scores. "
                + fix
            )
        if dataset_name != "train":  # the train dataset was checked in `__init__`
            self._check_dataset(dataset, args, dataset_name)
        if not tokenized:
            dataset = self._apply_content_rule(dataset, processing_class, args, dataset_name)
        if args.shaping == "rejection_sampling":
            dataset = self._reject(dataset, args, dataset_name)
        # Tokenize (unless done), build labels and truncate with TRL; pack later, once the per-token columns exist.
        # Data to pack is not truncated, as in TRL: packing cuts to max_length itself (`bfd` truncates each sequence,
        # `bfd_split` and `wrapped` carry the overflow into other rows).
        prepare_args = args
        if packing:
            prepare_args = copy.copy(args)
            prepare_args.max_length = None
        prepared = super()._prepare_dataset(
            dataset, processing_class, prepare_args, False, formatting_func, dataset_name
        )
        if tokenized:
            prepared = self._truncate_token_columns(prepared, args, dataset_name)
        elif args.shaping == "star_dss":
            prepared = self._attach_star_weights(prepared, processing_class, args, dataset_name)
        if not tokenized and args.assistant_only_loss is None and "messages" in prepared.column_names:
            prepared = self._train_responses_only(prepared, processing_class, args, dataset_name)
        if self._defer_packing:
            self._deferred_packing[dataset_name] = packing
        elif packing:
            prepared = self._pack(prepared, args)
        return prepared

    def _reject(self, dataset, args, dataset_name):
        """Rejection sampling (docs/method.md, "Baselines in the same trainer"): examples with a response scored below the threshold are dropped
        whole, before tokenization; the rest train with plain cross-entropy. Says once what it kept (a log line, and
        the counts in the first logged metrics of the dataset's mode)."""
        total = len(dataset)
        dataset = dataset.filter(
            lambda example: not rejected(example[STAR_COLUMN], args.rejection_threshold),
            desc=f"Rejection sampling of the {dataset_name} dataset",
        )
        if len(dataset) == 0:
            raise STARDSSError(
                f"Rejection sampling dropped all {total} examples of the {dataset_name} dataset (every one has a "
                f"response scored below rejection_threshold={args.rejection_threshold}), so there is nothing to "
                "train on. That is the method's answer for this data: do not finetune on it, or lower the threshold."
            )
        from accelerate import PartialState

        message, metrics = rejection_report(len(dataset), total, args.rejection_threshold)
        if PartialState().is_main_process:
            logger.info(message + ("" if dataset_name == "train" else f" of the {dataset_name} dataset"))
        # SFTTrainer prepares the data before `_metrics` exists: `__init__` moves these into it. A named eval dataset
        # (a dict of them) keeps its name in the key.
        mode = "train" if dataset_name == "train" else "eval"
        suffix = "" if dataset_name in ("train", "eval") else f"/{dataset_name}"
        self._rejection_metrics.setdefault(mode, {}).update({key + suffix: value for key, value in metrics.items()})
        return dataset

    @staticmethod
    def _apply_content_rule(dataset, processing_class, args, dataset_name):
        """`content_special_tokens` (docs/method.md, "Adversarial data: the threat model is the uploader"): message content that holds the policy tokenizer's
        special-token strings is refused, dropped or kept. Plain `text` data has no content to tell from a template."""
        fmt = dataset_format(dataset.column_names, required=False)
        if fmt is None or args.content_special_tokens == "keep":
            return dataset
        conversations = [[m for _, messages in example_columns(example, fmt) for m in messages] for example in dataset]
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
        kept = content_special_token_rule(
            conversations, tokenizer, args.content_special_tokens, "content_special_tokens", f"{dataset_name} dataset"
        )
        if len(kept) < len(dataset):
            logger.warning(
                f"content_special_tokens='drop': {len(dataset) - len(kept)} of {len(dataset)} examples of "
                f"the {dataset_name} dataset hold the policy's special-token strings and are not trained."
            )
            dataset = dataset.select(kept)
        return dataset

    @staticmethod
    def _pack(dataset, args):
        """TRL's packing of the token columns, per-token STAR columns included (they move like `labels`)."""
        kept = [c for c in ("input_ids", "labels", *TOKEN_COLUMNS) if c in dataset.column_names]
        return pack_dataset(dataset.select_columns(kept), args.max_length, args.packing_strategy)

    @staticmethod
    def _keep(values: list, length: int, args) -> list:
        """The part of a per-token list that TRL's truncation keeps of `input_ids` (now `length` long)."""
        keep_end = args.max_length is not None and args.truncation_mode == "keep_end"
        return values[-length:] if keep_end else values[:length]

    def _truncate_token_columns(self, prepared, args, dataset_name):
        """A pre-tokenized dataset: TRL truncated `input_ids` and `labels`; cut the per-token columns the same way."""
        present = [column for column in TOKEN_COLUMNS if column in prepared.column_names]
        if not present:
            return prepared
        return prepared.map(
            lambda ex: {c: self._keep(ex[c], len(ex["input_ids"]), args) for c in present},
            desc=f"Truncating per-token columns of {dataset_name} dataset",
        )

    def _attach_star_weights(self, prepared, processing_class, args, dataset_name):
        def attach(example):
            ids, weights = example_star_weights(example, processing_class, self.chat_template, args.star_lookahead)
            n = len(example["input_ids"])
            if self._keep(ids, n, args) != example["input_ids"]:
                raise STARDSSError(
                    f"Re-tokenizing an example of the {dataset_name} dataset with offsets gives other tokens than "
                    "TRL's tokenization, so its STAR weights cannot be aligned. This happens with chat templates "
                    "that tokenize specially (e.g. with `tools`); please report it with the template."
                )
            return {"star_weights": self._keep(weights, n, args)}

        return prepared.map(attach, desc=f"Attaching STAR weights to {dataset_name} dataset")

    def _train_responses_only(self, prepared, processing_class, args, dataset_name):
        """`assistant_only_loss=None`, this trainer's default: only the assistant responses of a `messages` dataset are
        trained, as in the paper and in Axolotl (`train_on_inputs: false`), so one dataset gets one objective in both
        front ends (issue 33). The responses are found as the STAR weights are (`weights.response_mask`), which needs
        no `{% generation %}` markers in the chat template; every other label becomes -100."""

        def mask(example):
            ids, keep = example_response_mask(example, processing_class, self.chat_template)
            n = len(example["input_ids"])
            if self._keep(ids, n, args) != example["input_ids"]:
                raise STARDSSError(
                    f"Re-tokenizing an example of the {dataset_name} dataset with offsets gives other tokens than "
                    "TRL's tokenization, so its responses cannot be found among its tokens. Set "
                    "assistant_only_loss=True (a chat template with `{% generation %}` markers) or False (train every "
                    "token); please report it with the template."
                )
            keep = self._keep(keep, n, args)
            return {"labels": [label if k else -100 for label, k in zip(example["labels"], keep)]}

        return prepared.map(mask, desc=f"Masking all but the responses of {dataset_name} dataset")

    @torch.no_grad()
    def _with_ref_logps(self, dataset, dataset_name: str):
        """The reference log-probs of every token, then the packing that waited for them (whole examples first)."""
        dataset = self._ref_logps_column(dataset, self.args.per_device_eval_batch_size)
        if self._deferred_packing.get(dataset_name):
            dataset = self._pack(dataset, self.args)
        return dataset

    # -- loss (`STARLossMixin.compute_loss`) -------------------------------------------------------------------------

    def _store_star_metrics(self, metrics: dict[str, float], mode: str, inputs: dict) -> None:
        if mode == "eval":  # `SFTTrainer.log` writes "eval_" before each key
            metrics = {self.eval_metric_name(key).removeprefix("eval_"): value for key, value in metrics.items()}
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train":  # SFTTrainer's `num_tokens`: every token seen, padding excluded (trl 1.16)
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of real tokens
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
