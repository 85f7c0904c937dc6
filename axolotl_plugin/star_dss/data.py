"""STAR weights in Axolotl's data pipeline: scored before tokenization, attached during it, carried through its
truncation, packing and collation.

Axolotl has no hook between loading a raw dataset and tokenizing it, so while STAR-DSS prepares the datasets it
swaps in, for that call only, the one function every prompt strategy goes through
(`axolotl.utils.data.wrappers.wrap_dataset_for_tokenized_prompt`) and adds the STAR settings to the prepared
dataset's cache key. Each raw example is read as its conversation through the strategy itself (so Axolotl's field
mappings, role names and system prompts apply), scored (or looked up in `star_dss_scores_path`), and its tokens get
`star_weights` next to `input_ids` and `labels`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os

from trl_star_dss.special_tokens import content_special_token_rule
from trl_star_dss.collator import TOKEN_COLUMNS
from trl_star_dss.config import SCORED_SHAPINGS
from trl_star_dss.formats import STAR_COLUMN, check_star_example
from trl_star_dss.weights import rejected, rejection_report, token_weights

from .args import settings as star_settings

# Under `axolotl.`: Axolotl's logging shows INFO from its own namespace only.
LOG = logging.getLogger("axolotl.integrations.star_dss")

# Config keys that change the prepared dataset: Axolotl's cache key gets them while STAR-DSS prepares data.
HASH_FIELDS = ("star_dss", "star_dss_guardrail", "star_dss_guardrail_family", "star_dss_guardrail_temperature",
               "star_dss_guardrail_controversial",
               "star_dss_chunk_size", "star_dss_scores_path", "star_dss_scores_fingerprint", "star_dss_shaping",
               "star_dss_rejection_threshold", "star_dss_content_special_tokens")  # fmt: skip
# Beside a prepared dataset (inside its directory): what rejection sampling kept while preparing it, so a run that
# reuses the prepared data (`axolotl preprocess`, then `axolotl train`) still reports it.
REJECTION_FILE = "star_dss_rejection.json"
# Where `load_star_datasets` leaves the counts for the trainer's metrics: {split: [kept, total]}. Not a `star_dss_*`
# key: the plugin sets it, users never do.
REJECTION_CFG_KEY = "_star_dss_rejection"


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def load_star_datasets(cfg, preprocess: bool = False):
    """Axolotl's own `load_datasets`, with STAR weights attached to every tokenized training example."""
    from axolotl.common.datasets import load_datasets
    from axolotl.utils.data import sft, shared, wrappers

    values = star_settings(cfg)
    scored = values["shaping"] in SCORED_SHAPINGS
    if not scored and (values["guardrail"] or values["scores_path"]):
        LOG.info(f"star_dss_shaping={values['shaping']!r} reads no STAR scores: the data is not scored "
                 "(star_dss_guardrail / star_dss_scores_path are not used).")  # fmt: skip
    if cfg.get("star_dss_scores_path"):
        cfg["star_dss_scores_fingerprint"] = _scores_fingerprint(cfg["star_dss_scores_path"])
    original = wrappers.wrap_dataset_for_tokenized_prompt
    counts: list[tuple[int, int]] = []  # rejection sampling's (kept, total) per dataset of the split being prepared

    def wrap(prompt_tokenizer, dataset, **kwargs):
        strategy, dataset = with_star(prompt_tokenizer, dataset, cfg)
        if getattr(strategy, "rejection", None) is not None:
            counts.append(strategy.rejection)
        return original(strategy, dataset, **kwargs)

    load_split, reports = sft._load_tokenized_prepared_datasets, {}

    def load_and_count(tokenizer, split_cfg, split="train", *args, **kwargs):
        counts.clear()
        result = load_split(tokenizer, split_cfg, split, *args, **kwargs)
        reports[split] = _rejection_counts(split_cfg, tokenizer, split, counts)
        return result

    extra_fields = shared.DATASET_HASH_CONFIG_EXTRA_FIELDS + HASH_FIELDS
    rejecting = values["shaping"] == "rejection_sampling"
    with _swapped(wrappers, "wrap_dataset_for_tokenized_prompt", wrap), \
            _swapped(shared, "DATASET_HASH_CONFIG_EXTRA_FIELDS", extra_fields), \
            _swapped(sft, "_load_tokenized_prepared_datasets", load_and_count if rejecting else load_split):  # fmt: skip
        meta = load_datasets(cfg=cfg)
    if scored and meta.train_dataset is not None and "star_weights" not in meta.train_dataset.column_names:
        raise ValueError(
            "The prepared training dataset has no `star_weights` column: it was loaded already tokenized, or its "
            "dataset type does not tokenize through a prompt strategy. Use `type: chat_template` (or an instruction "
            "type such as alpaca) on the raw data, and delete stale prepared data under dataset_prepared_path."
        )
    if rejecting:
        reports = {split: found for split, found in reports.items() if found is not None}
        for split, (kept, total) in reports.items():
            message, _ = rejection_report(kept, total, values["rejection_threshold"])
            LOG.info(message + (" in the test datasets" if split == "test" else ""))
        cfg[REJECTION_CFG_KEY] = reports
    return meta


def _rejection_counts(cfg, tokenizer, split: str, counts: list[tuple[int, int]]) -> tuple[int, int] | None:
    """[kept, total] of rejection sampling over one split's datasets: counted now when they were prepared now (and
    written beside the prepared dataset), else read from beside the prepared dataset Axolotl reused."""
    from axolotl.utils.data import shared

    configs = cfg.datasets if split == "train" else cfg.test_datasets
    # The path Axolotl itself saves and loads the split at (the STAR settings are in its hash while this runs).
    path = shared.get_prepared_dataset_path(cfg, shared.generate_dataset_hash_from_config(
        cfg, configs, tokenizer.name_or_path)) / REJECTION_FILE  # fmt: skip
    if counts:
        found = [sum(kept for kept, _ in counts), sum(total for _, total in counts)]
        if path.parent.is_dir():  # not when Axolotl saved nothing (`skip_prepare_dataset`)
            path.write_text(json.dumps(found))
        return found
    return json.loads(path.read_text()) if path.is_file() else None


# -- the conversation of a raw example, read through Axolotl's own strategy ---------------------------------------


def conversation_reader(strategy):
    """A function `row -> [{"role", "content"}, ...]` for an Axolotl prompt strategy: chat templates read the turns
    the way they render them; instruction types (alpaca & co) become one user turn and one assistant turn."""
    from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy
    from axolotl.prompt_tokenizers import InstructionPromptTokenizingStrategy

    if isinstance(strategy, ChatTemplateStrategy):

        def read(row):
            turns = strategy.get_conversation_thread(row)
            # Tool calls are what a calling turn says (docs/method.md 1.5): kept for scoring and weighting.
            return [{"role": t["role"], "content": t.get("content") or "",
                     **({"tool_calls": t["tool_calls"]} if t.get("tool_calls") else {}),
                     **({"name": t["name"]} if t.get("name") else {})} for t in turns]  # fmt: skip

        return read
    if isinstance(strategy, InstructionPromptTokenizingStrategy):

        def read(row):
            instruction, extra, response = strategy.parse_instruction_fields(row)[:3]
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

        return read
    raise ValueError(
        f"STAR-DSS cannot read the conversations of a {type(strategy).__name__} dataset. Use `type: chat_template` "
        "(messages) or an instruction type (alpaca, ...), or score a converted copy with `star-dss score` and train "
        "on that."
    )


def with_star(strategy, dataset, cfg):
    """(wrapped strategy, dataset with a `star` column): scores for every example, then the strategy that turns
    them into per-token weights while it tokenizes. Shapings that read no scores (`deep_token`, `sft`; docs/method.md
    1.3) get the content rule only: nothing is scored, the strategy and the dataset stay Axolotl's."""
    values = star_settings(cfg)
    scored = values["shaping"] in SCORED_SHAPINGS
    try:
        read = conversation_reader(strategy)
    except ValueError:
        if scored:
            raise
        return strategy, dataset  # no conversations, so no message content to check either (as in the TRL trainer)
    conversations = [read(row) for row in dataset]
    kept = content_special_token_rule(conversations, strategy.tokenizer, values["content_special_tokens"],
                                      "star_dss_content_special_tokens")  # fmt: skip
    if len(kept) < len(conversations):
        LOG.warning(f"star_dss_content_special_tokens: drop: {len(conversations) - len(kept)} of {len(conversations)} "
                    "examples hold the policy's special-token strings and are not trained.")  # fmt: skip
        dataset, conversations = dataset.select(kept), [conversations[i] for i in kept]
    if not scored:
        return strategy, dataset
    if values["scores_path"]:
        records = _look_up(conversations, values["scores_path"])
    else:
        records = _score(conversations, strategy.tokenizer, values, cfg)
    for index, (messages, star) in enumerate(zip(conversations, records)):  # the column is input (issue 25)
        check_star_example({"messages": messages, STAR_COLUMN: star}, "messages", index)
    threshold = values["rejection_threshold"] if values["shaping"] == "rejection_sampling" else None
    wrapped = STARStrategy(strategy, read, threshold, values["star_lookahead"])
    if threshold is not None:
        wrapped.rejection = (sum(not rejected(r, threshold) for r in records), len(records))
    return wrapped, dataset.add_column(STAR_COLUMN, records)


def _score(conversations: list, tokenizer, values: dict, cfg) -> list:
    import torch
    from datasets import Dataset

    from trl_star_dss.scoring.families import deferred_guardrail, guard_options
    from trl_star_dss.scoring import score_dataset

    build, guard_id = deferred_guardrail(values["guardrail"], values["guardrail_family"], values["guardrail_temperature"],
                                         **guard_options(values["guardrail_controversial"]))  # fmt: skip
    # One cache per dataset and scoring settings, beside the prepared data: an interrupted preprocess resumes where
    # it stopped, and a config naming another guard scores into its own directory.
    key = json.dumps([conversations, guard_id, values["star_chunk_size"], tokenizer.name_or_path], sort_keys=True)
    directory = os.path.join(cfg.get("dataset_prepared_path") or "last_run_prepared", "star_scores",
                             hashlib.md5(key.encode()).hexdigest()[:16])  # fmt: skip
    # Axolotl prepares data on one process while the others wait, so this process scores everything.
    scored, summary = score_dataset(Dataset.from_dict({"messages": conversations}), build, tokenizer=tokenizer,
                                    chunk_size=values["star_chunk_size"], output_dir=directory, guardrail_id=guard_id,
                                    distributed=False)  # fmt: skip
    LOG.info(f"STAR scoring: {summary.format()}")
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


def _scores_fingerprint(path: str) -> str:
    return _load_scored(path)._fingerprint


def _look_up(conversations: list, path: str) -> list:
    """Each conversation's scores from a `star-dss score` output, matched by content (not by position, which
    Axolotl's shuffling, sharding and subsampling change), turn numbers moved to this conversation's turns."""
    scored = _load_scored(path)
    if STAR_COLUMN not in scored.column_names:
        raise ValueError(f"star_dss_scores_path={path!r} has no `{STAR_COLUMN}` column. Make it with `star-dss score`.")
    table = {}
    for row in scored:
        messages = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        offset = 0 if "messages" in row else len(row["prompt"])
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
        raise ValueError(
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
            raise ValueError(
                "Decoding a tokenized example and tokenizing the text again gives other tokens, so STAR weights cannot "
                f"be placed on Axolotl's tokens (tokenizer {tokenizer.name_or_path!r}). Use a fast tokenizer whose "
                "decode/encode round-trips (byte-level BPE such as Llama 3, Qwen, SmolLM)."
            )
        # Instruction types rewrite the user turn: the responses are then found from the end (`rewritten_prompt`).
        return token_weights(text, encoded["offset_mapping"], messages, records, rewritten_prompt=True,
                             lookahead=self.lookahead)  # fmt: skip


__all__ = ["TOKEN_COLUMNS", "STARStrategy", "conversation_reader", "load_star_datasets", "with_star"]
