"""`STARDSSTrainer`: TRL's `SFTTrainer` with the STAR-weighted loss and the paper's baselines (docs/method.md 1.2, 1.3).

Data flows one way: scored dataset (`star` column) -> TRL tokenization -> per-token `star_weights` (and, optionally,
precomputed `ref_logps`) -> truncation / packing / collation, aligned with `labels` -> the loss in `loss.py`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, fields

import torch
from transformers import AutoTokenizer
from trl import SFTTrainer
from trl.data_utils import pack_dataset
from trl.trainer.utils import add_fused_lm_head

from .choices import REFERENCE_SHAPINGS, SCORED_SHAPINGS
from .collator import TOKEN_COLUMNS, DataCollatorForSTAR
from .config import STARDSSConfig, check_sharding
from .errors import STARDSSError
from .formats import STAR_COLUMN, check_star_dataset, dataset_format, example_columns
from .heads import add_hidden_state_output, check_output_head, output_head
from .loss import deep_token_loss, full_kl, star_dss_loss, token_kl
from .reference import ref_logps_column
from .special_tokens import content_special_token_rule
from .weights import rejected, rejection_report, response_mask, token_weights


logger = logging.getLogger(__name__)


def _is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def example_star_weights(
    example: dict, tokenizer, chat_template: str | None = None, lookahead: int = 0
) -> tuple[list[int], list[float]]:
    """The token ids and STAR weights of one scored example, rendered and tokenized as TRL's `SFTTrainer` does
    (the chat template for conversations; prompt + completion + EOS for plain text); `weights.token_weights` places
    the weights. Returns the full (untruncated) sequence."""
    text, encoded, messages, first_turn = _render(example, tokenizer, chat_template)
    # Each scored turn, by its index in the rendered message list (the completion follows the prompt).
    records = [{**record, "turn": first_turn + record["turn"]} for record in example[STAR_COLUMN]]
    return encoded["input_ids"], token_weights(text, encoded["offset_mapping"], messages, records, lookahead=lookahead)


def example_response_mask(example: dict, tokenizer, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """The token ids of one conversational example and 1 for each token of its trained assistant turns (every
    assistant message not marked `"train": False`), 0 elsewhere (`weights.response_mask`)."""
    text, encoded, messages, _ = _render(example, tokenizer, chat_template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True) is not False]
    # Special tokens: the named ones and every added token marked special (Llama 3's <|eot_id|> is only the latter).
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special = [i in specials for i in encoded["input_ids"]]
    return encoded["input_ids"], response_mask(text, encoded["offset_mapping"], messages, turns, special)


def _render(example: dict, tokenizer, chat_template: str | None):
    """(text, its tokens with offsets, the messages rendered, where the completion starts among them), as TRL's
    `SFTTrainer` renders and tokenizes the example."""
    if "messages" in example:
        messages, first_turn = example["messages"], 0
    elif isinstance(example["prompt"], list):
        messages, first_turn = example["prompt"] + example["completion"], len(example["prompt"])
    else:
        completion = example["completion"]
        if not completion.endswith(tokenizer.eos_token or "\0"):
            completion += tokenizer.eos_token or ""
        messages, first_turn = (
            [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": completion}],
            1,
        )
    if "messages" in example or isinstance(example["prompt"], list):
        tools = example.get("tools")  # TRL reads a JSON string as its list of tools (trl 1.16 `tokenize_fn`)
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=chat_template,
            tools=json.loads(tools) if isinstance(tools, str) else tools,
        )
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:  # standard prompt/completion: TRL tokenizes prompt + completion (+ EOS) as plain text
        text = messages[0]["content"] + messages[1]["content"]
        encoded = tokenizer(text=text, return_offsets_mapping=True)
    return text, encoded, messages, first_turn


@dataclass(frozen=True)
class STARSettings:
    """What `STARLossMixin` reads of its host's configuration (`STARDSSConfig` fields of the same names)."""

    shaping: str = "star_dss"
    kl_coef: float = 0.5
    kl_estimator: str = "k2"
    full_kl_chunk_size: int = 1024
    precompute_ref_log_probs: bool = False

    @classmethod
    def of(cls, values) -> STARSettings:
        """From a `STARDSSConfig` (or any object with these attributes) or a dict with these keys."""
        get = values.get if isinstance(values, dict) else functools.partial(getattr, values)
        return cls(**{f.name: get(f.name) for f in fields(cls)})


class STARLossMixin:
    """The STAR-DSS and Deep Token losses for a `transformers.Trainer` subclass: the reference model, optional
    precomputed reference log-probs, the loss and its metrics. `STARDSSTrainer` and the Axolotl plugin's trainer
    both use it, so the training maths are written once (on top of `loss.py`).

    The contract with the host: it sets `self.star_settings` (a `STARSettings`), gives its model TRL's fused LM head
    (`add_fused_lm_head` with `entropy` and `is_top1`), calls `_init_reference` after `Trainer.__init__` and
    implements `_store_star_metrics`. `compute_loss` sends STAR-DSS and Deep Token to `star_loss` and the other
    shapings to the host's own cross-entropy.
    """

    star_settings: STARSettings | None = None

    @staticmethod
    def _inner_model(model):
        return model.get_base_model() if _is_peft_model(model) else model

    def _init_reference(self, ref_model=None) -> None:
        """pi_ref (docs/method.md 1.2), in order: precomputed log-probs (of `ref_model` when given, else of the model
        with its adapters disabled; nothing held while training), `ref_model`, the model with its PEFT adapters
        disabled, or a frozen copy of the model taken now, before any update."""
        settings = self.star_settings
        self.ref_model = None
        self._precompute_reference = None  # the explicit reference of the precompute pass, dropped after it
        needs_reference = settings.shaping in REFERENCE_SHAPINGS
        full = settings.shaping == "star_dss" and settings.kl_estimator == "full"
        if full:
            add_hidden_state_output(self._inner_model(self.model))
            check_output_head(self._inner_model(self.model), "policy")
        from transformers.integrations import is_deepspeed_zero3_enabled

        check_sharding(
            asdict(settings),
            sharded=self.is_fsdp_enabled or is_deepspeed_zero3_enabled(),
            has_reference=ref_model is not None or _is_peft_model(self.model),
        )
        if not needs_reference:
            return
        if settings.precompute_ref_log_probs:
            if ref_model is not None:
                add_fused_lm_head(ref_model)
                self._precompute_reference = self.accelerator.prepare_model(
                    ref_model.requires_grad_(False).eval(), evaluation_mode=True
                )
            return
        if ref_model is None and not _is_peft_model(self.model):
            ref_model = copy.deepcopy(self._inner_model(self.model))
            # The copy would keep the forward that TRL patched onto the original (bound to its closure).
            ref_model.__dict__.pop("forward", None)
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            add_fused_lm_head(ref_model)
            if full:
                add_hidden_state_output(ref_model)
                check_output_head(ref_model, "reference")
            if self.is_deepspeed_enabled:
                # ZeRO-3 partitions a reference loaded under it, and nothing would gather its weights for a forward:
                # TRL's inference engine does, layer by layer (docs/training.md, "DeepSpeed ZeRO-3 and FSDP").
                from trl.models.utils import prepare_deepspeed

                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TOKEN_COLUMNS]))

    def _ref_logps_column(self, dataset, batch_size: int):
        """`ref_logps` of every token of a tokenized dataset from one pass of the reference before any update: the
        explicit `ref_model`, else the model with its PEFT adapters disabled (docs/method.md 1.2); cached in
        `<output_dir>/ref_logps/` (`reference.ref_logps_column`)."""
        reference = self._precompute_reference or self.accelerator.unwrap_model(self.model)
        # The policy itself serves as pi_ref with its PEFT adapters disabled (docs/method.md 1.2).
        disable_adapters = self._precompute_reference is None and _is_peft_model(
            self.accelerator.unwrap_model(reference)
        )
        return ref_logps_column(
            self.accelerator,
            reference,
            dataset,
            batch_size,
            disable_adapters,
            os.path.join(self.args.output_dir, "ref_logps"),
            progress=not self.args.disable_tqdm,
        )

    def _reference(self, model):
        """A context in which `ref(**inputs, ...)` runs pi_ref: the explicit/frozen reference or disabled adapters."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        return model, self.accelerator.unwrap_model(model).disable_adapter()

    def token_mean(self, total: torch.Tensor, mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """A summed per-token loss as a token mean, normalised as SFTTrainer normalises its cross-entropy (trl 1.16
        `SFTTrainer.compute_loss`; `test_all_safe_star_dss_equals_trl_sft` holds the two together): over
        `num_items_in_batch` (every rank's trained tokens, so gradient accumulation is exact), times the data-parallel
        size when `average_tokens_across_devices` (DDP averages the gradients; tensor-parallel ranks share a batch)."""
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def star_loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The STAR-DSS (or Deep Token) loss of one batch, normalised like the Trainer's cross-entropy, with the MoE
        load-balancing loss where the model has one (as SFTTrainer adds it)."""
        settings = self.star_settings
        star_weights = inputs.pop("star_weights", None)
        ref_logps = inputs.pop("ref_logps", None)
        inputs["use_cache"] = False
        aux_enabled = getattr(self, "aux_loss_enabled", False)
        if aux_enabled:
            inputs["output_router_logits"] = True
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        kl = aux_loss = None
        if settings.kl_estimator == "full" and settings.shaping == "star_dss":
            if aux_enabled:
                raise STARDSSError(
                    "kl_estimator='full' reads hidden states, without the router logits of this Mixture-of-Experts "
                    "model, so its load-balancing loss would be lost. Use kl_estimator='k2', or set "
                    "router_aux_loss_coef=0.0."
                )
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            ref, context = self._reference(model)
            with torch.no_grad(), context:
                ref_hidden = ref(**model_inputs, star_hidden_states=True)[:, :-1]
            hidden = model(**model_inputs, star_hidden_states=True)[:, :-1]
            kl, logps, entropy, top1 = full_kl(
                hidden,
                output_head(self.accelerator.unwrap_model(model)),
                ref_hidden,
                output_head(self.accelerator.unwrap_model(ref)),
                labels.clamp(min=0),
                mask,
                settings.full_kl_chunk_size,
                return_metrics=True,
            )
            ref_logps = None
        else:
            if ref_logps is None:
                ref, context = self._reference(model)
                with torch.no_grad(), context:
                    ref_logps = ref(**inputs, fused_lm_head=True).log_probs
            else:
                ref_logps = ref_logps[:, 1:]
            outputs = model(**inputs, fused_lm_head=True)
            logps, entropy, top1, aux_loss = outputs.log_probs, outputs.entropy, outputs.is_top1, outputs.aux_loss
        if settings.shaping == "star_dss":
            weights = star_weights[:, 1:].to(logps.dtype)
            per_token = star_dss_loss(
                logps, ref_logps, weights, mask, settings.kl_coef, settings.kl_estimator, "none", kl=kl
            )
        else:
            per_token = deep_token_loss(logps, ref_logps, mask, "none")
        loss = self.token_mean(per_token.sum(), mask, num_items_in_batch)
        if aux_loss is not None:
            # A per-micro-batch mean: with `num_items_in_batch` the Trainer leaves accumulation to the loss.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
        metrics = self._star_metrics(logps, ref_logps, kl, star_weights, mask)
        metrics |= self._sft_metrics(entropy, top1, aux_loss, mask)
        self._store_star_metrics(metrics, "train" if self.model.training else "eval", inputs)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.star_settings.shaping not in REFERENCE_SHAPINGS:
            # The host's own cross-entropy; rejection sampling already dropped the rejected examples in the data.
            for key in TOKEN_COLUMNS:
                inputs.pop(key, None)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.star_loss(model, inputs, num_items_in_batch)
        if not return_outputs:
            return loss
        # `predict` / `compute_metrics` want logits, which the fused forwards never build: one more forward, as
        # SFTTrainer does.
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k not in ("labels", "output_router_logits")})
        return loss, outputs

    def _store_star_metrics(self, metrics: dict[str, float], mode: str, inputs: dict) -> None:
        raise NotImplementedError("A trainer using STARLossMixin says where its metrics go.")

    _eval_prefix = "eval"  # the `metric_key_prefix` of the evaluation running now

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # The Trainer evaluates each of a dict of eval datasets under `eval_<name>` (its `eval_<name>_loss`): the
        # STAR metrics of that pass carry the same prefix (`eval_metric_name`), so named sets do not overwrite each
        # other's in trackers (issue 33).
        previous, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        finally:
            self._eval_prefix = previous

    def eval_metric_name(self, key: str) -> str:
        """The logged name of an evaluation metric: `eval_kl`, or `eval_<name>_kl` for the eval set `<name>`."""
        return f"{self._eval_prefix}_{key}"

    @torch.no_grad()
    def _sft_metrics(self, entropy, top1, aux_loss, mask) -> dict[str, float]:
        """What SFTTrainer logs of its forward: `entropy` and `mean_token_accuracy` over trained tokens, `aux_loss`."""
        gather = self.accelerator.gather_for_metrics
        n = gather(mask.sum()).sum()
        metrics = {}
        if entropy is not None:
            metrics["entropy"] = (gather(entropy.detach().float().sum()).sum() / n).item() if n > 0 else 0.0
        if top1 is not None:
            metrics["mean_token_accuracy"] = (gather(top1.float().sum()).sum() / n).item() if n > 0 else 0.0
        if aux_loss is not None:
            metrics["aux_loss"] = gather(aux_loss.detach()).mean().item()
        return metrics

    @torch.no_grad()
    def _star_metrics(self, logps, ref_logps, kl, star_weights, mask) -> dict[str, float]:
        settings = self.star_settings
        gather = self.accelerator.gather_for_metrics
        mask_f = mask.float()
        n = gather(mask_f.sum()).sum().clamp(min=1)

        def mean(values):
            return (gather((values.float() * mask_f).sum()).sum() / n).item()

        if kl is None:  # what the loss used; Deep Token logs the configured token estimator for comparison
            kl = token_kl(
                logps.float(), ref_logps.float(), "k2" if settings.kl_estimator == "full" else settings.kl_estimator
            )
        metrics = {"kl": mean(kl)}
        if star_weights is not None and settings.shaping == "star_dss":
            weights = star_weights[:, 1:]
            metrics["star/weight_mean"] = mean(weights)
            metrics["star/kl_share"] = mean(weights < 0.5)
            metrics["loss/ce"] = mean(weights * -logps)
            metrics["loss/kl"] = mean((1 - weights) * settings.kl_coef * kl)
        return metrics


class STARDSSTrainer(STARLossMixin, SFTTrainer):
    """Finetune with STAR-DSS: `SFTTrainer`'s signature plus `ref_model`.

    The train dataset is either scored already (`star-dss score`, a `star` column) or scored at start-up with
    `args.guardrail`. The reference pi_ref is, in order: precomputed log-probs (`args.precompute_ref_log_probs`),
    an explicit `ref_model`, the same model with its PEFT adapters disabled, or a frozen copy of the model taken
    before training.
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
        model,
        args: STARDSSConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        ref_model=None,
        **kwargs,
    ):
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
        uses_scores = args.shaping in SCORED_SHAPINGS
        columns = train_dataset.column_names if train_dataset is not None else []
        if uses_scores and STAR_COLUMN not in columns and "star_weights" not in columns and train_dataset is not None:
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
        if uses_scores and train_dataset is not None and STAR_COLUMN in train_dataset.column_names:
            check_star_dataset(train_dataset)  # the column is input: checked before anything reads it (issue 25)
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
            **kwargs,
        )
        for mode, counts in self._rejection_metrics.items():
            self._metrics[mode].update({key: [value] for key, value in counts.items()})
        if data_collator is None:  # carry star_weights / ref_logps through TRL's own collation choices
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

    # -- data ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _write_star_report(dataset, directory: str) -> None:
        from accelerate import PartialState

        from .scoring.startup import write_star_report  # the core's one way into scoring (docs/method.md 4)

        if PartialState().is_main_process:
            write_star_report(dataset, directory)

    @staticmethod
    def _score_at_start(dataset, tokenizer, args: STARDSSConfig):
        from accelerate import PartialState

        # The core's one way into scoring (docs/method.md 4): loaded only when a dataset needs scores.
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
        if tokenized and args.shaping == "rejection_sampling":
            raise STARDSSError(
                f"shaping='rejection_sampling' needs each response's whole-response score, which a tokenized "
                f"{dataset_name} dataset no longer has. Pass the untokenized scored dataset (its `{STAR_COLUMN}` column)."
            )
        if tokenized and uses_scores and "star_weights" not in columns:
            raise STARDSSError(
                f"The {dataset_name} dataset is already tokenized but has no `star_weights` column. Pass the "
                f"untokenized scored dataset (with its `{STAR_COLUMN}` column) and let the trainer tokenize it."
            )
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
        if not tokenized and uses_scores and dataset_name != "train":  # the train dataset was checked in __init__
            check_star_dataset(dataset)
        if not tokenized:
            dataset = self._apply_content_rule(dataset, processing_class, args, dataset_name)
        if args.shaping == "rejection_sampling":
            dataset = self._reject(dataset, args, dataset_name)
        # Tokenize (unless done), build labels and truncate with TRL; pack later, once the per-token columns exist.
        prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
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
        """Rejection sampling (docs/method.md 1.3): examples with a response scored below the threshold are dropped
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
        """`content_special_tokens` (docs/method.md 2.1): message content that holds the policy tokenizer's
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
