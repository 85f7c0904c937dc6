"""STAR weights in Axolotl's data pipeline: scored before tokenization, attached during it, carried through its
truncation, packing and collation.

The seam is Axolotl's own: a dataset `type:` may name a `DatasetWrappingStrategy`, which Axolotl hands the raw
dataset to tokenize (`axolotl.utils.data.wrappers._handle_loaded_strategy`). `type: star_dss.chat_template` and
`type: star_dss.alpaca` (`chat_template.py`, `alpaca.py`) load Axolotl's own strategy and wrap it in
`STARWrapping`: each raw example is read as its conversation through that strategy (so Axolotl's field mappings,
role names and system prompts apply), scored (or looked up in `star_dss_scores_path`), and its tokens get
`star_weights` next to `input_ids` and `labels`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

# Axolotl 0.21's `axolotl.datasets` and `axolotl.utils.data.wrappers` import each other: a fresh
# `import axolotl.datasets` fails, so the data package is loaded first, the order Axolotl itself loads them in.
import axolotl.utils.data  # noqa: F401
from axolotl.datasets import wrap_dataset_for_tokenized_prompt
from axolotl.prompt_tokenizers import DatasetWrappingStrategy

from trl_star_dss.collator import TOKEN_COLUMNS
from trl_star_dss.config import SCORED_SHAPINGS
from trl_star_dss.errors import STARDSSError
from trl_star_dss.formats import STAR_COLUMN, check_star_example, dataset_format
from trl_star_dss.scoring.startup import score_for_training
from trl_star_dss.special_tokens import content_special_token_rule
from trl_star_dss.weights import rejected, rejection_report, token_weights

from .args import NAMES, SCORES_PATH
from .args import settings as star_settings


# Under `axolotl.`: Axolotl's logging shows INFO from its own namespace only.
LOG = logging.getLogger("axolotl.integrations.star_dss")

# Rejection sampling's counts, one file per dataset and settings, beside the prepared data: a run that reuses the
# prepared data (`axolotl preprocess`, then `axolotl train`) still reports what was kept.
REJECTION_DIR = "star_dss_rejection"
# The counts files this process wrote (and logged) while it prepared data: the trainer does not say them again.
_PREPARED_HERE: set[str] = set()


def prepared_root(cfg) -> str:
    from axolotl.common.const import DEFAULT_DATASET_PREPARED_PATH

    return cfg.get("dataset_prepared_path") or DEFAULT_DATASET_PREPARED_PATH


def rejection_file(cfg, ds_cfg, tokenizer_name: str) -> Path:
    """Where the rejection counts of one dataset entry (as configured, with these STAR settings and tokenizer) go."""
    entry = {k: v for k, v in dict(ds_cfg).items() if v is not None}
    digest = json.dumps(
        [entry, asdict(star_settings(cfg)), cfg.get(SCORES_PATH), tokenizer_name], sort_keys=True, default=str
    )
    return Path(prepared_root(cfg)) / REJECTION_DIR / f"{hashlib.md5(digest.encode()).hexdigest()[:16]}.json"


def rejection_counts(cfg, tokenizer_name: str) -> tuple[tuple[int, int] | None, bool]:
    """((kept, total) over the training datasets, from the files written while they were prepared, or None when a
    dataset's count is missing; whether this process prepared (and said) them)."""
    files = [rejection_file(cfg, ds_cfg, tokenizer_name) for ds_cfg in cfg.get("datasets") or []]
    if not files or not all(f.is_file() for f in files):
        return None, False
    counts = [json.loads(f.read_text()) for f in files]
    return (sum(k for k, _ in counts), sum(t for _, t in counts)), any(str(f) in _PREPARED_HERE for f in files)


class STARWrapping(DatasetWrappingStrategy):
    """Axolotl's strategy for a dataset entry, with STAR scores read or computed from the raw dataset before it is
    tokenized (`with_star`), and `star_weights` added while it is (`STARStrategy`)."""

    def __init__(self, inner, cfg, ds_cfg):
        self.inner, self.cfg, self.ds_cfg = inner, cfg, ds_cfg

    def wrap_dataset(self, dataset, process_count=None, keep_in_memory=False, **kwargs):
        strategy, dataset = with_star(self.inner, dataset, self.cfg)
        if getattr(strategy, "rejection", None) is not None:
            kept, total = strategy.rejection
            path = rejection_file(self.cfg, self.ds_cfg, self.inner.tokenizer.name_or_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([kept, total]))
            _PREPARED_HERE.add(str(path))
            LOG.info(rejection_report(kept, total, star_settings(self.cfg).rejection_threshold)[0])
        return wrap_dataset_for_tokenized_prompt(
            strategy, dataset, process_count=process_count, keep_in_memory=keep_in_memory, **kwargs
        )


# -- the conversation of a raw example, read through Axolotl's own strategy ---------------------------------------


def conversation_reader(strategy):
    """A function `row -> [{"role", "content"}, ...]` for an Axolotl prompt strategy: chat templates read the turns
    the way they render them; instruction types (alpaca & co) become one user turn and one assistant turn."""
    from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy
    from axolotl.prompt_tokenizers import InstructionPromptTokenizingStrategy

    if isinstance(strategy, ChatTemplateStrategy):

        def read(row):
            turns = strategy.get_conversation_thread(row)
            # Tool calls are what a calling turn says (docs/method.md, "What is read as text: content parts and tool calls"): kept for scoring and weighting.
            return [
                {
                    "role": t["role"],
                    "content": t.get("content") or "",
                    **({"tool_calls": t["tool_calls"]} if t.get("tool_calls") else {}),
                    **({"name": t["name"]} if t.get("name") else {}),
                }
                for t in turns
            ]

        return read
    if isinstance(strategy, InstructionPromptTokenizingStrategy):

        def read(row):
            instruction, extra, response = strategy.parse_instruction_fields(row)[:3]
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

        return read
    raise STARDSSError(
        f"STAR-DSS cannot read the conversations of a {type(strategy).__name__} dataset. Use `type: chat_template` "
        "(messages) or `type: alpaca`, or score a converted copy with `star-dss score` and train on that."
    )


def with_star(strategy, dataset, cfg):
    """(wrapped strategy, dataset with a `star` column): scores for every example, then the strategy that turns
    them into per-token weights while it tokenizes. Shapings that read no scores (`deep_token`, `sft`; docs/method.md
    1.3) get the content rule only: nothing is scored, the strategy and the dataset stay Axolotl's."""
    values, scores_path = star_settings(cfg), cfg.get(SCORES_PATH)
    scored = values.shaping in SCORED_SHAPINGS
    try:
        read = conversation_reader(strategy)
    except ValueError:
        if scored:
            raise
        return strategy, dataset  # no conversations, so no message content to check either (as in the TRL trainer)
    conversations = [read(row) for row in dataset]
    kept = content_special_token_rule(
        conversations, strategy.tokenizer, values.content_special_tokens, NAMES["content_special_tokens"]
    )
    if len(kept) < len(conversations):
        LOG.warning(
            f"star_dss_content_special_tokens: drop: {len(conversations) - len(kept)} of {len(conversations)} "
            "examples hold the policy's special-token strings and are not trained."
        )
        dataset, conversations = dataset.select(kept), [conversations[i] for i in kept]
    if not scored:
        if values.guardrail or scores_path:
            LOG.info(
                f"star_dss_shaping={values.shaping!r} reads no STAR scores: the data is not scored "
                "(star_dss_guardrail / star_dss_scores_path are not used)."
            )
        return strategy, dataset
    records = _look_up(conversations, scores_path) if scores_path else _score(conversations, strategy.tokenizer, cfg)
    for index, (messages, star) in enumerate(zip(conversations, records)):  # the column is input (issue 25)
        check_star_example({"messages": messages, STAR_COLUMN: star}, "messages", index)
    threshold = values.rejection_threshold if values.shaping == "rejection_sampling" else None
    wrapped = STARStrategy(strategy, read, threshold, values.star_lookahead)
    if threshold is not None:
        wrapped.rejection = (sum(not rejected(r, threshold) for r in records), len(records))
    return wrapped, dataset.add_column(STAR_COLUMN, records)


def _score(conversations: list, tokenizer, cfg) -> list:
    import torch
    from datasets import Dataset

    values = star_settings(cfg)
    # One cache per dataset and scoring settings (beside the prepared data unless `star_dss_scores_dir` says where):
    # an interrupted preprocess resumes where it stopped, and a config naming another guard scores into its own
    # directory.
    key = json.dumps(
        [
            conversations,
            values.guardrail,
            values.guardrail_family,
            values.guardrail_temperature,
            values.guardrail_controversial,
            values.star_chunk_size,
            values.star_unit,
            tokenizer.name_or_path,
            *(
                [values.star_probe, values.star_probe_sample]  # probe scores are cached apart from exact ones
                if values.star_probe
                else []
            ),
        ],
        sort_keys=True,
    )
    root = values.star_scores_dir or os.path.join(prepared_root(cfg), "star_scores")
    # Axolotl prepares data on one process while the others wait, so this process scores everything.
    scored, summary = score_for_training(
        Dataset.from_dict({"messages": conversations}),
        tokenizer,
        values,
        output_dir=os.path.join(root, hashlib.md5(key.encode()).hexdigest()[:16]),
        output_name=NAMES["star_scores_dir"],
        distributed=False,
        log=False,
        names=NAMES,
    )
    LOG.info(f"STAR scoring: {summary.format()}")  # in Axolotl's log namespace
    if summary.audited_examples:
        LOG.warning(
            f"{summary.audited_examples} training examples have audit findings; read them before training: "
            f"{summary.format_audit()}"
        )
    if torch.cuda.is_available():  # the guard is gone; give its memory back before the policy loads
        torch.cuda.empty_cache()
    return list(scored[STAR_COLUMN])


def _key(messages: list[dict]) -> str:
    # System turns are left out: Axolotl may add a default system prompt that the scored copy did not have.
    return json.dumps([(m["role"], m["content"]) for m in messages if m["role"] != "system"])


def _load_scored(path: str):
    from datasets import load_from_disk

    from trl_star_dss.scoring import scored_dataset_path

    return load_from_disk(scored_dataset_path(path) if os.path.isdir(scored_dataset_path(path)) else path)


def scored_messages(row: dict, fmt: str) -> tuple[list[dict], int]:
    """A scored row as one list of messages, and where its `star` turns start in it: `messages` as they are; a
    prompt/completion row as its prompt then its completion, plain strings (the Alpaca output of `star-dss score
    --prompt-column instruction --input-column input --completion-column output`) as one user and one assistant
    message, as the plugin reads an `alpaca` dataset (`conversation_reader`)."""
    if fmt == "messages":
        return row["messages"], 0
    prompt, completion = row["prompt"], row["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    return prompt + completion, len(prompt)


def _look_up(conversations: list, path: str) -> list:
    """Each conversation's scores from a `star-dss score` output, matched by content (not by position, which
    Axolotl's shuffling, sharding and subsampling change), turn numbers moved to this conversation's turns."""
    scored = _load_scored(path)
    if STAR_COLUMN not in scored.column_names:
        raise STARDSSError(
            f"star_dss_scores_path={path!r} has no `{STAR_COLUMN}` column. Make it with `star-dss score`."
        )
    fmt = dataset_format(scored.column_names)
    table = {}
    for row in scored:
        messages, offset = scored_messages(row, fmt)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        table[_key(messages)] = [(assistant.index(offset + r["turn"]), r) for r in row[STAR_COLUMN]]
    records, missing = [], 0
    for messages in conversations:
        found = table.get(_key(messages))
        if found is None:
            missing += 1
            continue
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        records.append([{**r, "turn": assistant[k]} for k, r in found])
    if missing:
        raise STARDSSError(
            f"{missing} of {len(conversations)} training conversations have no scores in "
            f"star_dss_scores_path={path!r}. Score the same data with `star-dss score` (the turns must match after Axolotl's field mappings), or set "
            "star_dss_guardrail to score here."
        )
    return records


# -- tokenization with weights ------------------------------------------------------------------------------------


class STARStrategy:
    """An Axolotl prompt strategy that also returns `star_weights`, one per token of `input_ids`.

    The tokens are Axolotl's own. They are decoded and re-tokenized with character offsets (checked to give the
    same ids), each turn's content is found in that text in order, and the tokens from a scored response up to the
    next turn take the response's chunk scores (`weights.token_weights`); the others weigh 1.
    """

    supports_batched = False  # one row at a time: the weights need the row and its tokens together

    def __init__(self, inner, read, threshold: float | None = None, lookahead: int = 0):
        self.inner, self.read, self.threshold, self.lookahead = inner, read, threshold, lookahead
        self.rejection: tuple[int, int] | None = None  # rejection sampling's (kept, total), set by `with_star`
        filter_rows = getattr(inner, "filter_rows", None)
        if threshold is not None:  # rejection sampling drops whole examples before tokenizing them

            def keep(row):
                return not rejected(row[STAR_COLUMN], threshold) and (filter_rows is None or filter_rows(row))

            self.filter_rows = keep
        else:
            self.filter_rows = filter_rows

    def __getattr__(self, name):  # everything else is the wrapped object's
        if name == "inner":  # not set yet (unpickling in a worker process): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def tokenize_prompt(self, row: dict) -> dict:
        records = row[STAR_COLUMN]
        row = {k: v for k, v in row.items() if k != STAR_COLUMN}
        tokenized = dict(self.inner.tokenize_prompt(row))
        tokenized["star_weights"] = self.token_weights(self.read(row), records, tokenized["input_ids"])
        return tokenized

    def token_weights(self, messages: list[dict], records: list[dict], input_ids: list[int]) -> list[float]:
        tokenizer = self.inner.tokenizer
        text = tokenizer.decode(input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"] != list(input_ids):
            raise STARDSSError(
                "Decoding a tokenized example and tokenizing the text again gives other tokens, so STAR weights cannot "
                f"be placed on Axolotl's tokens (tokenizer {tokenizer.name_or_path!r}). Use a fast tokenizer whose "
                "decode/encode round-trips (byte-level BPE such as Llama 3, Qwen, SmolLM)."
            )
        # Instruction types rewrite the user turn: the responses are then found from the end (`rewritten_prompt`).
        return token_weights(
            text, encoded["offset_mapping"], messages, records, rewritten_prompt=True, lookahead=self.lookahead
        )


__all__ = ["TOKEN_COLUMNS", "STARStrategy", "STARWrapping", "conversation_reader", "with_star"]
