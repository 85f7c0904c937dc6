"""`STARLossMixin`: the STAR-DSS and Deep Token losses for a `transformers.Trainer` subclass (the reference model,
optional precomputed reference log-probs, the loss and its metrics), and what it reads of its host's configuration
(`config.STARSettings`). `STARDSSTrainer` (TRL) and the Axolotl plugin's trainer both use it, so the training maths
are written once; the plugin imports it from here, without TRL's `SFTTrainer` subclass.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict

import torch
from trl.trainer.utils import add_fused_lm_head

from .choices import REFERENCE_SHAPINGS
from .collator import TOKEN_COLUMNS
from .config import STARSettings, check_sharding
from .errors import STARDSSError
from .heads import add_hidden_state_output, check_output_head, output_head
from .loss import deep_token_loss, full_kl, star_dss_loss, token_kl
from .reference import ref_logps_column


def _is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


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
        """pi_ref (docs/method.md, "The loss and the reference"), in order: precomputed log-probs (of `ref_model` when given, else of the model
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
        explicit `ref_model`, else the model with its PEFT adapters disabled (docs/method.md, "The loss and the reference"); cached in
        `<output_dir>/ref_logps/` (`reference.ref_logps_column`)."""
        reference = self._precompute_reference or self.accelerator.unwrap_model(self.model)
        # The policy itself serves as pi_ref with its PEFT adapters disabled (docs/method.md, "The loss and the reference").
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
            # The last positions: PEFT's virtual tokens (prompt tuning, p-tuning) come before the sequence.
            positions = slice(-labels.size(1) - 1, -1)
            with torch.no_grad(), context:
                ref_hidden = ref(**model_inputs, star_hidden_states=True)[:, positions]
            hidden = model(**model_inputs, star_hidden_states=True)[:, positions]
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
            # PEFT's virtual tokens (prompt tuning, p-tuning) are prepended to the policy's sequence, never to the
            # reference's (its adapters are off): the label positions are the last ones.
            logps, entropy, top1 = (
                None if x is None else x[:, -labels.size(1) :]
                for x in (outputs.log_probs, outputs.entropy, outputs.is_top1)
            )
            aux_loss = outputs.aux_loss
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
