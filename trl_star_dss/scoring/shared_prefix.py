"""Exact shared-prefix attention for the fast scorer: closing suffixes read their trunk as stored once.

The fast scorer (docs/method.md, "The scoring engine") runs each response's trunk (template, context and response) once, keeps its keys
and values, then runs every prefix's closing suffix as a row that may see the trunk before its cut and itself
causally. Here a row's attention is split in two parts, each a plain softmax attention with its log-sum-exp:

    trunk part:   all rows' queries of one example against that example's trunk (stored once, never copied),
                  each row masked to its cut;
    suffix part:  each row against its own keys, causally;

and merged exactly (the cascade decomposition, docs/method.md, "The scoring engine"):

    out = (exp(lse_t) * out_t + exp(lse_s) * out_s) / (exp(lse_t) + exp(lse_s))

So memory is the trunks once plus the suffix rows, and the arithmetic is that of the rows alone.

`shared_prefix_attention` registers `attention` in transformers' `AttentionInterface` under `ATTENTION_NAME` the
first time a fast scorer needs it, switches the guard to it for one forward, and gives the forward the trunks as a
keyword argument (`star_shared_prefix`), which transformers passes down to every attention layer: no module state.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface


ATTENTION_NAME = "star_dss_shared_prefix"


# PyTorch's fused CPU kernel that also returns the log-sum-exp: a private op, so where a torch build lacks it the
# explicit float32 path below is taken (slower, as exact).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(query, key, value, mask, scale: float, softcap: float | None = None, seen=None):
    """Softmax attention that also returns the log-sum-exp of each query's scores: (out, lse), lse in float32.

    `mask` is additive (0 or -inf), broadcast over batch and heads; `seen` (optional, computed from `mask` if not
    given) says which queries see at least one key. A query that sees no key gets lse = -inf and a zero output. On CPU
    (no soft-capping) this is PyTorch's fused flash kernel, which returns the log-sum-exp; elsewhere the scores are
    formed explicitly in float32."""
    if seen is None:
        seen = (mask == 0).any(-1)
    if query.device.type == "cpu" and softcap is None and _CPU_FLASH is not None:
        # aten::_scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, *, attn_mask,
        # scale) -> (output, logsumexp), in torch 2.13; it writes out = 0, lse = 0 for a fully masked query.
        out, lse = _CPU_FLASH(
            query,
            key.expand(query.shape[0], -1, -1, -1),
            value.expand(query.shape[0], -1, -1, -1),
            attn_mask=mask.to(query.dtype),
            scale=scale,
        )
        return out, lse.masked_fill(~seen, float("-inf"))
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if softcap is not None:  # Gemma-2 style: softcap * tanh(scores / softcap), before the mask
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask.float()
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.masked_fill(~seen, 0.0)[..., None])
    return (weights @ value.float()).to(query.dtype), lse


def merge(out_a, lse_a, out_b, lse_b):
    """Exact softmax attention over the union of two key sets, from each set's (out, lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return (out_a.float() * weight_a + out_b.float() * weight_b).to(out_a.dtype)


def _additive(allowed):
    """(additive mask, which queries see a key) of a boolean mask: built once per forward, read by every layer."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf")), allowed.any(-1)


@dataclass
class SharedPrefix:
    """What the suffix rows of one forward read beside themselves.

    Args:
        cache: the trunks' keys and values, one batch row per example (right padded), from one causal forward.
        spans: `(example, first_row, end_row)` for every example with rows in this forward (rows grouped by example).
        starts: each row's cut: it sees trunk tokens `[0, start)`; its own tokens sit at positions `start, start+1, ...`
        width: tokens per row (right padded).
    """

    cache: object
    spans: list[tuple[int, int, int]]
    starts: torch.Tensor
    width: int
    _masks: dict = field(default_factory=dict, repr=False)

    def trunk_parts(self):
        """`(example, first_row, end_row, keys)` for every example with rows here: its trunk is read up to `keys`, its
        rows' largest cut (the trunk's padding and anything after the last cut are never given to the kernel)."""
        for example, first, end in self.spans:
            keys = int(self.starts[first:end].max())
            if keys > 0:
                yield example, first, end, keys

    def trunk_mask(self, first: int, end: int, keys: int, window: int | None):
        """((1, 1, rows * width, keys) additive mask, seen) of these rows' queries over the first `keys` tokens of
        their trunk."""
        key = ("trunk", first, end, window)
        if key not in self._masks:
            starts = self.starts[first:end, None, None]
            trunk = torch.arange(keys, device=starts.device)[None, None]
            allowed = (trunk < starts).expand(-1, self.width, -1)
            if window is not None:  # sliding-window layers: a query at position p sees keys after p - window
                allowed = allowed & (
                    (starts + torch.arange(self.width, device=starts.device)[None, :, None]) - trunk < window
                )
            self._masks[key] = _additive(allowed.reshape(1, 1, -1, keys))
        return self._masks[key]

    def suffix_mask(self, groups: int, window: int | None):
        """((1, 1, groups * width, width) additive causal mask, seen) of a row over itself, tiled for `groups` query
        heads per key head (right padding lies after every real token, so causality hides it)."""
        key = ("suffix", groups, window)
        if key not in self._masks:
            i = torch.arange(self.width, device=self.starts.device)[:, None]
            j = i.T
            allowed = j <= i
            if window is not None:
                allowed &= i - j < window
            self._masks[key] = _additive(allowed.repeat(groups, 1)[None, None])
        return self._masks[key]


def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """An `AttentionInterface` function: rows of closing suffixes over their shared trunks (see the module doc).

    query: (rows, heads, width, dim); key/value: (rows, kv_heads, width, dim), the rows' own. The trunks are those
    given by `shared_prefix_attention` as `star_shared_prefix`; `attention_mask` (the rows' causal mask) is not needed."""
    shared = kwargs.get("star_shared_prefix")
    if shared is None:
        raise RuntimeError(
            f"{ATTENTION_NAME} attention ran without its trunks: the model did not pass `star_shared_prefix` down to its "
            "attention layers. Score this guard with method='naive', and report its model class."
        )
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads  # query head h reads key head h // groups (transformers' repeat_kv order)
    # Suffix part, every row at once: a key head's query heads laid end to end along the query axis.
    query = query.reshape(rows, kv_heads, groups * width, dim)
    mask, seen = shared.suffix_mask(groups, window)
    out, lse = attend(query, key, value, mask, scaling, softcap, seen)
    layer = shared.cache.layers[module.layer_idx]
    for example, first, end, keys in shared.trunk_parts():
        # Trunk part: this example's rows as one long query against its trunk, query head groups in the batch axis
        # so the trunk's keys are shared by broadcasting, never repeated.
        n = end - first
        part = query[first:end].reshape(n, kv_heads, groups, width, dim).permute(2, 1, 0, 3, 4)
        part = part.reshape(groups, kv_heads, n * width, dim)
        trunk_keys = layer.keys[example : example + 1, :, :keys]
        trunk_values = layer.values[example : example + 1, :, :keys]
        mask, seen = shared.trunk_mask(first, end, keys, window)
        out_t, lse_t = attend(part, trunk_keys, trunk_values, mask, scaling, softcap, seen)
        out_t = out_t.reshape(groups, kv_heads, n, width, dim).permute(2, 1, 0, 3, 4)
        lse_t = lse_t.reshape(groups, kv_heads, n, width).permute(2, 1, 0, 3)
        out[first:end] = merge(
            out[first:end],
            lse[first:end],
            out_t.reshape(n, kv_heads, groups * width, dim),
            lse_t.reshape(n, kv_heads, groups * width),
        )
    # transformers' attention functions return (batch, length, heads, dim) and no weights.
    return out.reshape(rows, heads, width, dim).transpose(1, 2).contiguous(), None


@contextmanager
def shared_prefix_attention(model, shared: SharedPrefix):
    """Inside the block, `model`'s attention layers run `attention`; the block gives the keyword arguments that carry
    `shared`'s trunks to them (pass them to the model's forward). Then the model's own attention is restored.

    The switch writes the config's attention implementation because transformers 5's attention layers read it there at
    every forward; `set_attn_implementation` would walk every module of the guard at every forward."""
    AttentionInterface.register(ATTENTION_NAME, attention)  # idempotent: registered when a fast scorer first runs
    saved = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    try:
        yield {"star_shared_prefix": shared}
    finally:
        model.config._attn_implementation = saved
