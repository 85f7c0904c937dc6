"""A causal LM's output layer as its forward applies it, read from the model (docs/method.md, "The loss and the reference"): what the
full-vocabulary KL (`loss.full_kl`) and the guards' label rows read. Model introspection lives here, apart from the
pure losses of `loss.py`."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from .errors import STARDSSError


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as its forward applies it (docs/method.md, "The loss and the reference"):
    `logits = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`, the softcap only where set.

    `logit_scale` and `softcap` cover Cohere's `logit_scale`, Granite's `logits_scaling` (as its inverse), output
    multipliers and Gemma-2's `final_logit_softcapping`; `output_head` reads them from a model's config and
    `output_head_matches` checks the result against the model's own logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` hidden states -> `[N, V]` float32 logits. The product is accumulated and kept in float32, never
        rounded to bf16 first (autocast off), as TRL's fused head does: bf16 logits shift every log-prob."""
        with torch.autocast(hidden.device.type, enabled=False):
            if hidden.device.type == "cuda" and self.weight.dtype in (torch.bfloat16, torch.float16):
                logits = torch.mm(hidden.to(self.weight.dtype), self.weight.T, out_dtype=torch.float32)
            else:
                logits = hidden.float() @ self.weight.float().T
        if self.bias is not None:
            logits = logits + self.bias.float()
        logits = logits * self.logit_scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def output_head(model) -> OutputHead:
    """`model`'s output layer with the logit post-processing its forward applies, read from its config as TRL's
    fused LM head reads it (trl 1.16, `trainer/utils.py`, `add_fused_lm_head`, which exposes no function for it):
    `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier` (Falcon-H1), `logits_scaling` (Granite and
    MiniCPM3 divide by it, HyperCLOVA X multiplies), then `final_logit_softcapping` (Gemma-2). `output_head_matches`
    verifies the result against the model's own logits."""
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    head = model.get_output_embeddings()
    return OutputHead(
        head.weight,
        head.bias,
        1.0 if scale is None else float(scale),
        getattr(config, "final_logit_softcapping", None),
    )


def text_backbone(model):
    """The module of `model` that returns the last hidden states the output layer reads: the base model of a causal
    LM, the text model inside a multimodal one (Llama 4's `language_model` is itself a causal LM: its `.model`)."""
    module = model.base_model
    language_model = getattr(module, "language_model", None)
    if language_model is not None:
        module = getattr(language_model, "model", language_model)
    return module


@torch.no_grad()
def output_head_matches(model, hidden_states=None) -> tuple[bool, float]:
    """Whether `output_head(model)` applied to the backbone's last hidden states gives `model`'s own logits on a few
    tokens, and the largest difference. `hidden_states(ids)` returns those states (default: `text_backbone(model)`)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(1, 9, device=model.device) * 7919 % vocab)[None]
    theirs = model(input_ids=ids, use_cache=False).logits[0].float()
    hidden = hidden_states(ids) if hidden_states else text_backbone(model)(input_ids=ids).last_hidden_state
    ours = output_head(model).logits(hidden[0])
    tolerance = 1e-4 if theirs.dtype == ours.dtype == torch.float32 and model.dtype == torch.float32 else 3e-2
    difference = (ours - theirs).abs().max().item()
    return difference <= tolerance * max(1.0, theirs.abs().max().item()), difference


def add_hidden_state_output(model) -> None:
    """Let `model(..., star_hidden_states=True)` return the backbone's last hidden states `[B, T, H]` instead of
    logits, for the full-vocabulary KL. Patched on the instance like TRL's fused LM head, so DDP/PEFT wrappers that
    call `forward` pass the flag through."""
    inner_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, star_hidden_states=False, **kwargs):
        if not star_hidden_states:
            return inner_forward(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)


def check_output_head(model, role: str) -> None:
    """Refuse `kl_estimator='full'` for a model whose logits `output_head` does not reproduce: its family
    post-processes them in a way this project does not know, and the KL would be silently wrong."""
    was_training = model.training
    model.eval()
    try:
        matches, difference = output_head_matches(model, lambda ids: model(input_ids=ids, star_hidden_states=True))
    finally:
        model.train(was_training)
    if not matches:
        raise STARDSSError(
            f"kl_estimator='full' computes the {role}'s logits from its output layer, but for "
            f"{type(model).__name__} (model_type={model.config.model_type!r}) those logits differ from the model's "
            f"own by up to {difference:.3g}: its forward post-processes them in a way this project does not know. "
            "Use kl_estimator='k2' (it reads the model's own log-probs), or report the model family."
        )
