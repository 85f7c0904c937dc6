"""The losses of STAR-DSS and its baselines, as pure functions over tensors (docs/method.md, "The loss and the reference", 1.3).

Shapes: `B` batch rows, `T` label positions, `H` hidden size, `V` vocabulary. Every per-token input is already
aligned with its label: `logps[b, t]` is log pi_theta of the label token at position t, `ref_logps[b, t]` the same
under the reference model, `mask[b, t]` whether that label is trained.

    star_dss:            l_t = w_t * CE_t + (1 - w_t) * kl_coef * KL_t
    deep_token (Qi et al. 2025):  l_t = -(2 / beta_t) * log sigmoid(beta_t * (logp_t - ref_logp_t))
    sft / rejection sampling:     l_t = CE_t    (rejection sampling drops whole examples through the mask)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .choices import KL_ESTIMATORS
from .errors import STARDSSError
from .heads import OutputHead


REDUCTIONS = ("none", "sum", "mean")


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        # 0, not NaN, for a batch without trained tokens (a fully masked micro-batch)
        return per_token.sum() / mask.sum().clamp(min=1)
    raise STARDSSError(f"reduction={reduction!r} is not known. Use one of {REDUCTIONS}.")


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, kl_estimator: str = "k2") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the dataset token, `r = ref_logps - logps`:
    `k1 = -r`, `k2 = r**2 / 2` (the paper authors' code), `k3 = exp(r) - r - 1`. Shapes `[B, T]` -> `[B, T]`."""
    r = ref_logps - logps
    if kl_estimator == "k1":
        return -r
    if kl_estimator == "k2":
        return 0.5 * r.pow(2)
    if kl_estimator == "k3":
        return torch.expm1(r) - r
    if kl_estimator == "full":
        raise STARDSSError("kl_estimator='full' needs the whole vocabulary: compute it with `full_kl` and pass `kl=`.")
    raise STARDSSError(f"kl_estimator={kl_estimator!r} is not known. Use one of {KL_ESTIMATORS}.")


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the trained labels: `-logps` where `mask`. Shapes `[B, T]`."""
    return _reduce(-logps, mask, reduction)


def star_dss_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    star_weights: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.5,
    kl_estimator: str = "k2",
    reduction: str = "mean",
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The STAR-weighted loss: cross-entropy on safe spans, KL to the reference on unsafe spans.

    Args:
        logps: `[B, T]` log pi_theta of each label token.
        ref_logps: `[B, T]` log pi_ref of each label token (unused when `kl` is given).
        star_weights: `[B, T]` STAR weight w_t in [0, 1] of each label token.
        mask: `[B, T]` bool, the trained labels.
        kl_coef: lambda, the weight of the KL term (the paper: 0.5).
        kl_estimator: `k1`, `k2` (default) or `k3` from the dataset token; `full` needs `kl`.
        reduction: `none` (`[B, T]`, 0 where not trained), `sum`, or `mean` over trained tokens.
        kl: `[B, T]` per-token KL computed elsewhere (`full_kl`), which overrides `kl_estimator`.
    """
    if kl is None:
        kl = token_kl(logps, ref_logps, kl_estimator)
    per_token = star_weights * -logps + (1.0 - star_weights) * kl_coef * kl
    return _reduce(per_token, mask, reduction)


def deep_token_betas(mask: torch.Tensor) -> torch.Tensor:
    """beta_t of Deep Token for each position, `t` counted from the first token of each contiguous run of `True`
    in `mask` (each response segment restarts): beta_1 = 0.5, beta_2..5 = 2, beta_t = 0.1 after. `[B, T]`."""
    count = mask.long().cumsum(dim=1)
    before_run = torch.cummax(torch.where(mask, torch.zeros_like(count), count), dim=1).values
    t = count - before_run  # 1-based position inside the run (0 outside)
    betas = torch.full(mask.shape, 0.1, device=mask.device)
    betas[t == 1] = 0.5
    betas[(t >= 2) & (t <= 5)] = 2.0
    return betas


def deep_token_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Deep Token (Qi et al., ICLR 2025, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep"):
    `-(2 / beta_t) * log sigmoid(beta_t * (logps - ref_logps))`, with beta_t from `deep_token_betas`. `[B, T]`."""
    betas = deep_token_betas(mask).to(logps.dtype)
    per_token = -(2.0 / betas) * F.logsigmoid(betas * (logps - ref_logps))
    return _reduce(per_token, mask, reduction)


def _full_kl_chunk(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, head, ref_head):
    # The tensors are arguments (not read from the heads) so that activation checkpointing sees them.
    logp = F.log_softmax(OutputHead(weight, bias, head.logit_scale, head.softcap).logits(hidden), dim=-1)
    with torch.no_grad():
        ref_logp = F.log_softmax(
            OutputHead(ref_weight, ref_bias, ref_head.logit_scale, ref_head.softcap).logits(ref_hidden), dim=-1
        )
    p = logp.exp()
    kl = (p * (logp - ref_logp)).sum(-1)
    with torch.no_grad():  # for the metrics SFTTrainer logs: entropy and whether the label is the top-1 token
        entropy = -(p * logp).sum(-1)
        top1 = (logp.argmax(-1) == labels).float()
    return kl, logp.gather(-1, labels[:, None]).squeeze(-1), entropy, top1


def full_kl(
    hidden: torch.Tensor,
    head: OutputHead | torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_head: OutputHead | torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
    return_metrics: bool = False,
):
    """Reverse KL over the whole vocabulary, `sum_v pi_theta(v) * (log pi_theta(v) - log pi_ref(v))`, and the
    label log-probs `log pi_theta(y_t)`, per position, from hidden states and output layers.

    Args:
        hidden / ref_hidden: `[B, T, H]` last hidden states of the policy and the reference at the label positions.
        head / ref_head: their output layers as `OutputHead`s (with the model's logit post-processing), or bare
            `[V, H]` weights for models that apply none.
        labels: `[B, T]` label token ids (any value where `mask` is False).
        mask: `[B, T]` bool; only these positions are computed.
        chunk_size: positions per chunk. Each chunk's `chunk_size x V` logits are recomputed in the backward pass
            (activation checkpointing), so `B x T x V` logits are never held, for either model.
        return_metrics: also return the policy's per-position entropy and top-1 hit (no gradient).

    Returns `(kl, logps)` (and `(entropy, top1)` with `return_metrics`), each `[B, T]` float32 and 0 where `mask` is
    False; gradients flow to `hidden` and the policy head's weight and bias.
    """
    head = head if isinstance(head, OutputHead) else OutputHead(head)
    ref_head = ref_head if isinstance(ref_head, OutputHead) else OutputHead(ref_head)
    # In the output layers' dtypes: mixed precision may hand back float32 hidden states next to bf16 weights.
    rows, ref_rows, row_labels = hidden[mask], ref_hidden[mask], labels[mask]
    parts = [[], [], [], []]
    for start in range(0, rows.size(0), chunk_size):
        chunk = slice(start, start + chunk_size)
        values = checkpoint(
            _full_kl_chunk,
            rows[chunk],
            head.weight,
            head.bias,
            ref_rows[chunk],
            ref_head.weight,
            ref_head.bias,
            row_labels[chunk],
            head,
            ref_head,
            use_reentrant=False,
        )
        for part, value in zip(parts, values):
            part.append(value)
    zeros = hidden.new_zeros(mask.shape, dtype=torch.float32)
    if not parts[0]:  # keep the graph connected for a micro-batch without trained tokens
        outputs = [zeros + 0 * hidden.sum() for _ in parts]
    else:
        outputs = [zeros.masked_scatter(mask, torch.cat(part)) for part in parts]
    return tuple(outputs) if return_metrics else tuple(outputs[:2])
