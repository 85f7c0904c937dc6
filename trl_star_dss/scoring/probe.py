"""STAR from one guard forward: a probe on a generative guard's hidden states, fitted on the guard's own exact prefix
scores (docs/method.md, "The scoring engine", "Probe"; issue 38).

The exact engine runs the guard's closing instructions once per chunk of a response. A `ProbeGuardrail` instead
runs the guard once over the conversation up to the end of the response (the guard's own rendering, content as text,
render check included: `TemplatedGuardrail.encode_with_offsets`) and reads P(safe) of every prefix from the hidden
states at the prefix's last guard token (one layer's, or several layers' side by side: chosen on held-out data),
through a logistic regression fitted to the exact P(safe) of every prefix of a sample of the dataset. It is only as
good as its measured agreement with exact scoring on held-out responses of that sample (MAE, AUROC of flagged,
first-flag positions): `fit_probe` measures it and refuses a probe below the floor unless the user allows it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from ..arguments import STARArguments, check_star_settings
from ..errors import STARDSSError
from ..formats import Conversation, dataset_format, response_turns
from .chunks import chunk_ends
from .guardrail import Guardrail, PrefixQuery, PrefixScores, _check_method
from .template import TemplatedGuardrail
from .token_level import TokenLevelGuardrail


PROBE_FILE = "probe.json"  # the agreement figures, saved with the scores (`score_dataset`)
# What the probe is fitted and judged on: shares of the sample's responses (docs/method.md, "Probe").
FIT_SHARE, SELECT_SHARE = 0.5, 0.25  # the rest (a quarter) is held out for the agreement figures
# Ridge strengths tried on the standardized features (chosen with the layers): a little keeps the fit finite where
# the features separate the sample; on the demo's guard the weaker one fitted held-out responses better.
L2 = (1e-5, 1e-3)
MAX_CANDIDATE_LAYERS = 8


def _default(name: str):
    """A setting's default, as `STARArguments` declares it (written once)."""
    return next(f.default for f in fields(STARArguments) if f.name == name)


@dataclass
class ProbeSettings:
    """How a probe is fitted and what agreement it must reach (the `star_probe_*` fields of `STARArguments`).

    `sample`: examples of the dataset scored exactly to fit and judge the probe. `min_auroc` / `max_mae`: the floor
    on held-out responses (docs/method.md, "Probe": why 0.95 and 0.1). `allow_disagreement`: use a probe below the
    floor anyway. `names`: how the caller's user spells each setting, for errors (default: the `STARArguments`
    field, `star_probe_sample`; the Axolotl plugin's keys `star_dss_probe_sample`)."""

    sample: int = _default("star_probe_sample")
    min_auroc: float = _default("star_probe_min_auroc")
    max_mae: float = _default("star_probe_max_mae")
    allow_disagreement: bool = _default("star_probe_allow_disagreement")
    seed: int = 0
    names: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        keys = ("sample", "min_auroc", "max_mae", "allow_disagreement")
        check_star_settings(
            {f"star_probe_{k}": getattr(self, k) for k in keys}, names={f"star_probe_{k}": self.name(k) for k in keys}
        )

    def name(self, setting: str) -> str:
        return self.names.get(setting, f"star_probe_{setting}")

    def id_fields(self) -> dict:
        """What changes the fitted probe, hence its scores (the floor and the override do not)."""
        return {"sample": self.sample, "seed": self.seed, "fit": [FIT_SHARE, SELECT_SHARE, *L2, MAX_CANDIDATE_LAYERS]}


def probe_id(guard_id: str, settings: ProbeSettings) -> str:
    """The cache id of a probe's scores: the guard's own id (what the guard is: `families.guardrail_id`) with the
    probe's fit settings added, so never an exact guard's id (issue 38), and a hub guard's id completed on download
    completes it too (`fingerprint.completes_id`). An id that is not a JSON object (set by hand) is wrapped."""
    try:
        fields = json.loads(guard_id)
    except (TypeError, ValueError):
        fields = None
    if not isinstance(fields, dict):
        fields = {"guard": guard_id}
    return json.dumps({**fields, "probe": settings.id_fields()}, sort_keys=True)


# -- pure maths --------------------------------------------------------------------------------------------------


def fit_logistic(features, targets, l2: float = L2[0], max_iter: int = 500):
    """Logistic regression with soft targets: `(weight [d], bias [])` minimizing the mean binary cross-entropy of
    sigmoid(features @ weight + bias) against `targets` [n] in [0, 1], plus `l2` * |w|^2 on standardized features
    (`features` [n, d]); the returned weights apply to the raw features."""
    import torch

    features, targets = features.float(), targets.float()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros((), device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, targets) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight = (w / std).detach()
    return weight.cpu(), (b - (mean * weight).sum()).detach().cpu()


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """The area under the ROC curve of `scores` (higher: more likely positive) for the labels `positives` (the
    Mann-Whitney statistic, ties counted half); None when one class is absent."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    n_pos = sum(map(bool, positives))
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = sum(rank for rank, positive in zip(ranks, positives) if positive)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def first_flag(scores: Sequence[float]) -> int | None:
    """The first chunk whose STAR is below 0.5 (flagged), or None."""
    return next((k for k, score in enumerate(scores) if score < 0.5), None)


def agreement(probe: Sequence[Sequence[float]], exact: Sequence[Sequence[float]]) -> dict:
    """How probe scores follow exact ones, per response a list of chunk scores: MAE of P(safe) over every prefix,
    AUROC of flagged (exact STAR < 0.5, ranked by 1 - probe), the share of prefixes on the same side of 0.5, and the
    first flagged chunk: mean |difference| over responses both flag, and responses only one of them flags."""
    pairs = [(p, e) for ps, es in zip(probe, exact) for p, e in zip(ps, es)]
    firsts = [(first_flag(ps), first_flag(es)) for ps, es in zip(probe, exact)]
    both = [abs(a - b) for a, b in firsts if a is not None and b is not None]
    return {
        "responses": len(exact),
        "prefixes": len(pairs),
        "flagged_prefixes": sum(e < 0.5 for _, e in pairs),
        "mae": sum(abs(p - e) for p, e in pairs) / max(len(pairs), 1),
        "auroc": auroc([1 - p for p, _ in pairs], [e < 0.5 for _, e in pairs]),
        "same_side": sum((p < 0.5) == (e < 0.5) for p, e in pairs) / max(len(pairs), 1),
        "first_flag_mean_abs_chunks": sum(both) / len(both) if both else None,
        "first_flag_mismatched_responses": sum((a is None) != (b is None) for a, b in firsts),
    }


def format_agreement(figures: dict) -> str:
    def show(value, spec):
        return "n/a" if value is None else format(value, spec)

    return (
        f"probe agreement on {figures['responses']} held-out responses ({figures['prefixes']} prefixes, "
        f"{figures['flagged_prefixes']} flagged exactly): AUROC of flagged {show(figures['auroc'], '.4f')}, "
        f"MAE {figures['mae']:.4f}, same side of 0.5 {100 * figures['same_side']:.1f}%, first flag off by "
        f"{show(figures['first_flag_mean_abs_chunks'], '.2f')} chunks on average, flagged by one side only: "
        f"{figures['first_flag_mismatched_responses']} responses; layers {figures.get('layers')}"
    )


# -- reading the guard -------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the last hook needed: the layers above it never run."""


def layer_states(model, input_ids, attention_mask, layers: Sequence[int]) -> dict:
    """The residual stream after each of `layers` (0: the embeddings; i: decoder layer i's output), `[batch, tokens,
    hidden]` each, from one forward of `model`'s text backbone that stops after the deepest one."""
    import torch

    from ..heads import text_backbone

    backbone = text_backbone(model)
    captured, deepest, handles = {}, max(layers), []

    def keep(index):
        def hook(module, args, output):
            captured[index] = (output[0] if isinstance(output, tuple) else output).float()
            if index == deepest:
                raise _Stop

        return hook

    for index in sorted(set(layers)):
        module = backbone.embed_tokens if index == 0 else backbone.layers[index - 1]
        handles.append(module.register_forward_hook(keep(index)))
    try:
        with torch.no_grad():
            backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@dataclass
class _Reading:
    """One response as the probe reads it: the guard tokens up to the end of the response, and per prefix end the
    position read."""

    ids: list[int]
    positions: list[int]
    context_cut: bool


def _check_guard(guard) -> None:
    if isinstance(guard, TokenLevelGuardrail):
        raise STARDSSError(
            f"Guard {guard.name!r} is a token-level guard: it already gives STAR at every token from one forward. "
            "Score it without a probe (drop --probe / star_probe)."
        )
    if not isinstance(guard, TemplatedGuardrail):
        raise STARDSSError(
            f"A probe reads the hidden states of one generative guard, but got {guard!r} (a Python rule or an "
            "ensemble). Use one model guard (a hub id or path, e.g. meta-llama/Llama-Guard-3-1B) with the probe."
        )
    if not guard.tokenizer.is_fast:
        raise STARDSSError(
            f"A probe on guard {guard.name!r} needs a fast tokenizer: it maps the policy's chunk ends to guard tokens "
            "by their character offsets. Load the guard's fast tokenizer (tokenizer.json)."
        )


def read_responses(guard: TemplatedGuardrail, queries: Sequence[PrefixQuery], ends=None) -> list[_Reading]:
    """Each query rendered by the guard as the exact engine renders its whole response (oldest context cut to fit,
    content as text, render checked), cut after the response's last token, with the position read for each end
    (`ends[q]`, default the query's own)."""
    readings = []
    for q, query in enumerate(queries):
        context, cut = guard.fit_context(query)
        conversation = context + [{"role": "assistant", "content": query.response}]
        [(text, ids, offsets)] = guard.encode_with_offsets([conversation])
        wanted = query.ends if ends is None else ends[q]
        positions = guard.response_positions(text, offsets, conversation, [len(query.response), *wanted])
        readings.append(_Reading(ids[: positions[0] + 1], positions[1:], cut))
    return readings


def response_token_ends(guard: TemplatedGuardrail, query: PrefixQuery) -> list[int]:
    """The prefixes of the query's response that its guard tokens close (the probe's fitting targets)."""
    context, _ = guard.fit_context(query)
    conversation = context + [{"role": "assistant", "content": query.response}]
    [(text, _, offsets)] = guard.encode_with_offsets([conversation])
    return guard.response_token_ends(text, offsets, conversation) or [len(query.response)]


def states_at(guard: TemplatedGuardrail, readings: Sequence[_Reading], layers: Sequence[int]) -> list:
    """Per reading, `[len(layers), positions, hidden]`: the states read, several responses per forward (up to the
    guard's `max_tokens_per_forward`)."""
    import torch

    budget = getattr(guard, "max_tokens_per_forward", 4096)
    order = sorted(range(len(readings)), key=lambda r: len(readings[r].ids))
    out: list = [None] * len(readings)
    first = 0
    while first < len(order):
        last = first + 1
        while last < len(order) and (last + 1 - first) * len(readings[order[last]].ids) <= budget:
            last += 1
        batch = order[first:last]
        input_ids, ends = guard._right_padded([readings[r].ids for r in batch])
        mask = (torch.arange(input_ids.size(1))[None] <= ends[:, None]).long()
        device = guard.model.device
        captured = layer_states(guard.model, input_ids.to(device), mask.to(device), layers)
        for row, r in enumerate(batch):
            positions = torch.tensor(readings[r].positions, device=device)
            out[r] = torch.stack([captured[layer][row, positions] for layer in layers]).cpu()
        first = last
    return out


# -- the guardrail -----------------------------------------------------------------------------------------------


class ProbeGuardrail(Guardrail):
    """P(safe) of every prefix of a response from one forward of `guard`: sigmoid(h @ weight + bias), with h the
    residual stream after each of `layers`, side by side, at the prefix's last guard token
    (`TemplatedGuardrail.response_positions`). Built by `fit_probe`, which measures its `agreement` with `guard`'s
    exact scores. `method` is accepted for the interface and changes nothing: every prefix is read from the one
    forward."""

    def __init__(
        self, guard: TemplatedGuardrail, layers: Sequence[int], weight, bias, agreement: dict, settings: ProbeSettings
    ):
        _check_guard(guard)
        self.guard, self.layers, self.weight, self.bias = guard, list(layers), weight, bias
        self.agreement, self.settings = agreement, settings
        self.name = f"probe({guard.name})"
        self.id = probe_id(guard.id, settings)

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        queries = [PrefixQuery(c[:-1], c[-1]["content"], [len(c[-1]["content"])]) for c in conversations]
        return [result.scores[0] for result in self.score_prefixes(queries)]

    def score_prefixes(self, queries: Sequence[PrefixQuery], method: str = "fast") -> list[PrefixScores]:
        import torch

        _check_method(method)
        readings = read_responses(self.guard, queries)
        results = []
        for reading, states in zip(readings, states_at(self.guard, readings, self.layers)):
            scores = torch.sigmoid(torch.cat(list(states), -1) @ self.weight + self.bias).tolist()
            results.append(PrefixScores(scores, context_cut=reading.context_cut, guard_tokens=len(reading.ids)))
        return results

    def audit_sources(self):
        return self.guard.audit_sources()


def candidate_layers(model) -> list[int]:
    """The layers a probe may read: the embeddings and every decoder layer's output, or `MAX_CANDIDATE_LAYERS` decoder
    layers evenly spaced over the upper half of a deeper guard (its verdict forms late; and all of them side by side
    must fit in memory for the sample's every token)."""
    from ..heads import text_backbone

    count = len(text_backbone(model).layers)
    if count <= MAX_CANDIDATE_LAYERS:
        return list(range(count + 1))
    low = count // 2
    return sorted({round(low + (count - low) * (i + 1) / MAX_CANDIDATE_LAYERS) for i in range(MAX_CANDIDATE_LAYERS)})


def _split(count: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    fit, select = round(FIT_SHARE * count), round((FIT_SHARE + SELECT_SHARE) * count)
    return order[:fit], order[fit:select], order[select:]


def fit_probe(
    guard: TemplatedGuardrail, queries: Sequence[PrefixQuery], settings: ProbeSettings | None = None, method="fast"
) -> ProbeGuardrail:
    """Fit a probe on `guard` from the sample `queries` (their `ends` are the chunk ends scoring will use) and
    measure it, or refuse it below the floor (docs/method.md, "Probe").

    The queries are split by response: half fit the probe, a quarter choose what it reads (one candidate layer, or
    all of them side by side) and its ridge strength (lowest MAE), a quarter are held out. Targets are the exact
    P(safe) (`guard.score_prefixes(method=method)`) of the prefix each guard token of the response closes. The choice
    is fitted again on the first three quarters; the held-out quarter's chunks, scored exactly, give the agreement
    figures."""
    import torch

    settings = settings or ProbeSettings()
    _check_guard(guard)
    fit, select, held_out = _split(len(queries), settings.seed)
    if len(select) < 1 or len(held_out) < 2:
        raise STARDSSError(
            f"{settings.name('sample')}={settings.sample} gave {len(queries)} responses, too few to fit a probe, "
            f"choose what it reads and hold out at least 2 responses. Use at least 8 (e.g. 200).",
            arguments=(settings.name("sample"),),
        )
    layers = candidate_layers(guard.model)
    train = [queries[i] for i in fit + select]
    token_ends = [response_token_ends(guard, query) for query in train]
    exact = guard.score_prefixes(
        [PrefixQuery(q.context, q.response, ends, q.label) for q, ends in zip(train, token_ends)], method=method
    )
    states = states_at(guard, read_responses(guard, train, token_ends), layers)
    targets = [torch.tensor(result.scores) for result in exact]

    # What the probe may read: each candidate layer alone, or all of them side by side; with each ridge strength.
    reads = [(i,) for i in range(len(layers))] + [tuple(range(len(layers)))]
    options = [(chosen, l2) for chosen in reads for l2 in L2]

    def stacked(rows, chosen):  # fitted on the guard's device (states are kept on the CPU: memory)
        features = torch.cat([torch.cat([states[r][i] for i in chosen], -1) for r in rows])
        return features.to(guard.model.device), torch.cat([targets[r] for r in rows]).to(guard.model.device)

    fit_rows, select_rows = range(len(fit)), range(len(fit), len(train))
    errors = []
    for chosen, l2 in options:
        weight, bias = fit_logistic(*stacked(fit_rows, chosen), l2=l2)
        x, y = stacked(select_rows, chosen)
        errors.append((torch.sigmoid(x.cpu() @ weight + bias) - y.cpu()).abs().mean().item())
    best = min(range(len(options)), key=errors.__getitem__)
    chosen, l2 = options[best]
    weight, bias = fit_logistic(*stacked(range(len(train)), chosen), l2=l2)
    probe = ProbeGuardrail(guard, [layers[i] for i in chosen], weight, bias, {}, settings)

    test = [queries[i] for i in held_out]
    exact_test = [result.scores for result in guard.score_prefixes(test, method=method)]
    probe_test = [result.scores for result in probe.score_prefixes(test)]
    probe.agreement = {
        **agreement(probe_test, exact_test),
        "layers": probe.layers,
        "l2": l2,
        "selection_mae": {
            f"{[layers[i] for i in chosen]} l2={l2}": error for (chosen, l2), error in zip(options, errors)
        },
        "fitted_on": len(train),
        "floor": {"auroc": settings.min_auroc, "mae": settings.max_mae},
    }
    _enforce(probe, settings)
    return probe


def _enforce(probe: ProbeGuardrail, settings: ProbeSettings) -> None:
    figures = probe.agreement
    below = []
    if figures["auroc"] is None:
        below.append("AUROC of flagged cannot be measured (the held-out exact scores hold only one class)")
    elif figures["auroc"] < settings.min_auroc:
        below.append(f"AUROC {figures['auroc']:.4f} < {settings.name('min_auroc')}={settings.min_auroc}")
    if figures["mae"] > settings.max_mae:
        below.append(f"MAE {figures['mae']:.4f} > {settings.name('max_mae')}={settings.max_mae}")
    probe.agreement["accepted"] = not below
    if below and not settings.allow_disagreement:
        raise STARDSSError(
            f"The probe on guard {probe.guard.name!r} does not follow its exact scores closely enough: "
            f"{'; '.join(below)} ({format_agreement(figures)}). Score without the probe (exact), fit it on more "
            f"of the data ({settings.name('sample')}={settings.sample}), or set "
            f"{settings.name('allow_disagreement')}=True to use it anyway.",
            arguments=tuple(settings.name(k) for k in ("min_auroc", "max_mae", "sample", "allow_disagreement")),
        )


# -- reaching it from a dataset ----------------------------------------------------------------------------------


def sample_queries(dataset, tokenizer, chunk_size: int, unit: str, settings: ProbeSettings) -> list[PrefixQuery]:
    """The responses of `settings.sample` examples of `dataset` drawn at random (`settings.seed`), cut into chunks as
    scoring cuts them."""

    fmt = dataset_format(dataset.column_names)
    indices = sorted(random.Random(settings.seed).sample(range(len(dataset)), min(settings.sample, len(dataset))))
    queries = []
    for index in indices:
        for turn, context, response in response_turns(dataset[index], fmt, index):
            ends = chunk_ends(response, chunk_size, unit, tokenizer)
            queries.append(PrefixQuery(context, response, ends, label=f"Example {index} turn {turn}"))
    return queries


def deferred_probe(build_guard, guard_id: str, dataset, tokenizer, chunk_size: int, unit: str, settings):
    """`(build, id)` for `score_dataset`, as `families.deferred_guardrail` gives for the exact guard: `build` loads
    the guard and fits its probe on a sample of `dataset` only if something is left to score."""

    def build() -> ProbeGuardrail:
        guard = build_guard()
        queries = sample_queries(dataset, tokenizer, chunk_size, unit, settings)
        return fit_probe(guard, queries, settings)

    return build, probe_id(guard_id, settings)
