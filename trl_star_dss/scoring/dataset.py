"""STAR scoring: cut every assistant response into chunks, score each prefix with a guardrail, store the scores.

Scores are stored with the dataset in a tokenizer-independent form, one record per scored assistant turn in the
column `star`:

    {"turn": i, "chunk_ends": [c_1, ..., c_K], "scores": [s_1, ..., s_K]}

`turn` indexes `messages` (or `completion` for prompt/completion data), `c_k` is the character offset in the
response text where chunk k ends and `s_k` is the guard's P(safe) of `response[:c_k]`. Every token whose text ends
in (c_{k-1}, c_k] takes `s_k` (`token_scores`), so the scores survive re-tokenization, truncation and packing, and
map back exactly to the policy tokenizer's chunks when it is the tokenizer used here (docs/method.md, "STAR: a safety score for every prefix of a response").
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..errors import STARDSSError
from ..formats import STAR_COLUMN, dataset_format, example_columns, example_hash, response_turns
from ..storage import save_dataset_atomic, write_text_atomic
from .audit import AUDIT_VERSION, Auditor, count_findings
from .chunks import check_chunking, chunk_ends, unit_ends  # noqa: F401 (public here too)
from .fingerprint import completes_id
from .guardrail import Guardrail, PrefixQuery
from .probe import PROBE_FILE, format_agreement


_SETTINGS_FILE = "star_settings.json"
AUDIT_FILE = "audit.jsonl"


# -- datasets ------------------------------------------------------------------------------------------------------


@dataclass
class ScoringSummary:
    """What a scoring run did. `below_half_share` is the share of response units (tokens or words) with STAR < 0.5,
    `flagged` the examples whose lowest STAR is < 0.5, `context_cut` those whose guard context was cut."""

    examples: int = 0
    turns: int = 0
    chunks: int = 0
    guard_tokens: int = 0
    units: int = 0
    units_below_half: int = 0
    flagged: int = 0
    context_cut: int = 0
    scored_now: int = 0
    seconds: float = 0.0
    audit: dict[str, int] | None = None  # findings per kind (None: no audit); the records are `findings`
    audited_examples: int = 0  # examples with at least one finding
    audit_seconds: float = 0.0  # spent auditing in this run
    findings: list[dict] = field(default_factory=list, repr=False)  # written to `audit.jsonl`, not summary.json
    probe: dict | None = None  # a probe's agreement with exact scores (`probe.fit_probe`), also in `probe.json`

    @property
    def below_half_share(self) -> float:
        return self.units_below_half / self.units if self.units else 0.0

    def format(self) -> str:
        return (
            f"examples {self.examples} (scored now {self.scored_now}, from cache {self.examples - self.scored_now}) | "
            f"turns {self.turns} | chunks {self.chunks} | guard tokens {self.guard_tokens} | "
            f"response units with STAR < 0.5: {100 * self.below_half_share:.1f}% | "
            f"flagged examples (min STAR < 0.5): {self.flagged} | context cut: {self.context_cut} | "
            f"time {self.seconds:.1f}s"
            + ("" if self.audit is None else f"\n{self.format_audit()}")
            + ("" if self.probe is None else f"\n{format_agreement(self.probe)}")
        )

    def format_audit(self) -> str:
        counts = ", ".join(f"{kind} {n}" for kind, n in (self.audit or {}).items())
        return f"audit: {counts} (in {self.audited_examples} of {self.examples} examples; records in {AUDIT_FILE})"


class STARScorer:
    """Scores examples: chunking with the policy tokenizer, then the guardrail on every prefix."""

    def __init__(
        self,
        guardrail: Guardrail,
        tokenizer=None,
        chunk_size: int = 5,
        unit: str = "token",
        method: str = "fast",
        audit: bool = True,
    ):
        check_chunking(chunk_size, unit, tokenizer)
        self.guardrail, self.tokenizer = guardrail, tokenizer
        self.chunk_size, self.unit, self.method = chunk_size, unit, method
        self.auditor = Auditor.for_guardrail(guardrail, tokenizer) if audit else None

    def score_examples(self, examples: Sequence[dict], fmt: str, indices: Sequence[int]) -> list[dict]:
        """One record per example: `star` (per turn chunk ends and scores), its `audit` findings (with an auditor)
        and what the summary needs."""
        queries, owners = [], []
        for example, index in zip(examples, indices):
            for turn, context, response in response_turns(example, fmt, index):
                ends = chunk_ends(response, self.chunk_size, self.unit, self.tokenizer)
                queries.append(PrefixQuery(context, response, ends, label=f"Example {index} turn {turn}"))
                owners.append((index, turn, self._units(response, ends)))
        results = self.guardrail.score_prefixes(queries, method=self.method)
        records = {
            index: _empty_record(index, example_hash(example, fmt)) for example, index in zip(examples, indices)
        }
        for query, (index, turn, units), result in zip(queries, owners, results):
            record = records[index]
            record["star"].append({"turn": turn, "chunk_ends": query.ends, "scores": result.scores})
            record["context_cut"] |= result.context_cut
            record["guard_tokens"] += result.guard_tokens
            record["units"] += sum(units)
            record["units_below_half"] += sum(n for n, score in zip(units, result.scores) if score < 0.5)
        if self.auditor is not None:
            for example, index in zip(examples, indices):
                start = time.perf_counter()
                records[index]["audit"] = [
                    finding
                    for column, messages in example_columns(example, fmt)
                    for finding in self.auditor.audit_messages(index, column, messages)
                ]
                records[index]["audit_seconds"] = time.perf_counter() - start
        return [records[index] for index in indices]

    def _units(self, response: str, ends: list[int]) -> list[int]:
        """How many units (tokens or words) each chunk holds."""
        counts = [0] * len(ends)
        for end in unit_ends(response, self.unit, self.tokenizer):
            counts[min(bisect.bisect_left(ends, end), len(ends) - 1)] += 1
        return counts


def _empty_record(index: int, digest: str) -> dict:
    return {
        "index": index,
        "hash": digest,
        "star": [],
        "context_cut": False,
        "guard_tokens": 0,
        "units": 0,
        "units_below_half": 0,
    }


def score_dataset(
    dataset,
    guardrail: Guardrail | Callable[[], Guardrail],
    tokenizer=None,
    chunk_size: int = 5,
    unit: str = "token",
    output_dir: str | None = None,
    method: str = "fast",
    batch_size: int = 16,
    shard_size: int = 64,
    overwrite: bool = False,
    guardrail_id: str | None = None,
    progress: bool = True,
    distributed: bool = True,
    audit: bool = True,
    output_name: str = "output_dir",
):
    """Score every trained assistant turn of `dataset` and return `(scored_dataset, summary)`.

    The scored dataset is `dataset` with a `star` column. With `output_dir`, work is saved in shards of
    `shard_size` examples as it finishes: an interrupted run started again resumes where it stopped, a finished
    run is loaded without any guard forward, and the scored dataset is saved to `output_dir/dataset`
    (`datasets.load_from_disk`). Under `accelerate launch` the processes split the shards and the main process
    merges them. The cache is named by the guard's `id` (`Guardrail.id`: for a guard from `load_guardrail`, the id
    `star-dss score` and both trainers use for the same spec and settings), or by `guardrail_id` when given.
    `guardrail` may be a zero-argument function that builds it, so a fully cached run never loads the guard; then
    `guardrail_id` (`families.deferred_guardrail` gives both) is required. `output_name` is how errors name the
    directory (the caller's setting: `star_scores_dir`, `--output`). `distributed=False` scores
    everything in this process even under `accelerate launch` (for callers that run on one process only, such as
    Axolotl's dataset preparation).

    `audit` (on by default) looks through every message of every example for what could steer the guard or the
    policy (`audit.Auditor`: special-token strings of the guard's or `tokenizer`'s vocabulary, invisible characters,
    imitation of the guard's template). The summary carries the counts and the records (`summary.findings`), which
    are also written to `output_dir/audit.jsonl`. Nothing is dropped: the findings are for the user to read.
    """
    start_time = time.perf_counter()
    fmt = dataset_format(dataset.column_names)
    check_chunking(chunk_size, unit, tokenizer)
    guardrail_id, aliases = _cache_id(guardrail, guardrail_id)
    settings = _settings(dataset, fmt, guardrail_id, tokenizer, chunk_size, unit, audit)
    rank, world, barrier = _distributed() if distributed else (0, 1, lambda: None)
    if world > 1 and output_dir is None:
        raise STARDSSError(
            f"Scoring under {world} processes needs output_dir: the processes share their work through it. "
            "Pass output_dir (`--output`), or run one process."
        )
    if output_dir is not None:
        _check_settings(
            output_dir,
            settings,
            overwrite,
            is_main=rank == 0,
            barrier=barrier,
            aliases=aliases,
            output_name=output_name,
        )
    run = _Run(dataset, fmt, settings, output_dir, output_name, shard_size, rank, world)
    scorer = functools.partial(_scorer, run, guardrail, tokenizer, method, audit)
    records, work = _score_shards(run, scorer, batch_size, progress and rank == 0)
    if world > 1:
        records, work = _merge_processes(run, work, barrier)
    flat = [record for s in sorted(records) for record in records[s]]
    summary = _summarize(flat, time.perf_counter() - start_time, audit=audit, **work)
    summary.probe = run.probe or _read_probe(output_dir)
    scored = dataset.remove_columns([STAR_COLUMN]) if STAR_COLUMN in dataset.column_names else dataset
    scored = scored.add_column(STAR_COLUMN, [record["star"] for record in flat])
    if output_dir is not None and rank == 0:
        _save_outputs(output_dir, scored, summary, audit)
    if world > 1:
        barrier()
    return scored, summary


def _read_probe(output_dir: str | None) -> dict | None:
    """The agreement figures of the probe whose scores are cached in `output_dir` (a run that scored nothing now)."""
    path = None if output_dir is None else os.path.join(output_dir, PROBE_FILE)
    if path is None or not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _cache_id(guardrail, guardrail_id: str | None) -> tuple[str, tuple[str, ...]]:
    """The id that names the cache (`guardrail_id` when given, else the guard's `id`) and the earlier names of the
    same guard's scores that are read as its own."""
    if not isinstance(guardrail, Guardrail):
        if guardrail_id is None:
            raise STARDSSError("guardrail_id is required when `guardrail` is a function that builds the guardrail.")
        return guardrail_id, ()
    if guardrail_id is not None:
        return guardrail_id, ()
    # What this function named a guard object's scores before guards carried an id (issue 25): such a cache is read
    # as this guard's and its settings file rewritten with its id.
    alias = f"{guardrail.name}|T={getattr(guardrail, 'temperature', None)}" + (
        f"|controversial={guardrail.controversial}" if hasattr(guardrail, "controversial") else ""
    )
    return guardrail.id, (alias,)


def _settings(dataset, fmt: str, guardrail_id: str, tokenizer, chunk_size: int, unit: str, audit: bool) -> dict:
    """What the cached scores depend on: a cache made with other settings is never mixed in (`_check_settings`)."""
    tokenizer_id = _tokenizer_id(tokenizer) if tokenizer is not None else None
    return {
        "guardrail": guardrail_id,
        "chunk_size": chunk_size,
        "unit": unit,
        "policy_tokenizer": tokenizer_id if unit == "token" else None,
        "format": fmt,
        "num_examples": len(dataset),
        # The audit's findings depend on its rules, the guard (named above) and the policy tokenizer's specials.
        "audit": {"version": AUDIT_VERSION, "policy_tokenizer": tokenizer_id} if audit else None,
    }


@dataclass
class _Run:
    """One scoring run: the data, its settings, where shards go, and which shards this process scores."""

    dataset: object
    fmt: str
    settings: dict
    output_dir: str | None
    output_name: str
    shard_size: int
    rank: int
    world: int
    probe: dict | None = None  # a probe's agreement figures, once its guard is built (`_scorer`)

    @property
    def shard_dir(self) -> str | None:
        return None if self.output_dir is None else os.path.join(self.output_dir, "shards")

    @property
    def num_shards(self) -> int:
        return (len(self.dataset) + self.shard_size - 1) // self.shard_size

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, len(self.dataset))


def _scorer(run: _Run, guardrail, tokenizer, method: str, audit: bool) -> STARScorer:
    """The scorer, built when the first shard needs it (a fully cached run never loads the guard)."""
    guard = guardrail if isinstance(guardrail, Guardrail) else guardrail()
    if run.output_dir is not None and guard.id != run.settings["guardrail"]:
        if completes_id(run.settings["guardrail"], guard.id):
            # A hub guard downloaded just now: its id names the commit it was loaded at, and so do these scores.
            run.settings["guardrail"] = guard.id
            write_text_atomic(os.path.join(run.output_dir, _SETTINGS_FILE), json.dumps(run.settings, indent=2))
    # A probe's agreement figures are saved with its scores (issue 38; docs/method.md, "Probe").
    run.probe = getattr(guard, "agreement", None)
    if run.probe is not None and run.output_dir is not None:
        write_text_atomic(os.path.join(run.output_dir, PROBE_FILE), json.dumps(run.probe, indent=2))
    return STARScorer(guard, tokenizer, run.settings["chunk_size"], run.settings["unit"], method, audit)


def _score_shards(run: _Run, make_scorer, batch_size: int, progress: bool) -> tuple[dict[int, list[dict]], dict]:
    """This process's shards: read from the cache where they are (checked against the data), scored otherwise (and
    saved as each finishes). Returns the records by shard and what this process did in this run."""
    records: dict[int, list[dict]] = {}
    todo = []
    for s in range(run.rank, run.num_shards, run.world):
        cached = _read_shard(run.shard_dir, s) if run.shard_dir else None
        if cached is not None:
            _check_hashes(cached, run.dataset, run.fmt, run.output_dir, run.output_name)
            records[s] = cached
        else:
            todo.append(s)
    work = {"scored_now": 0, "guard_tokens": 0, "audit_seconds": 0.0}
    bar = _progress(sum(hi - lo for lo, hi in map(run.bounds, todo)), progress)
    scorer = None
    for s in todo:
        scorer = scorer or make_scorer()
        shard, (first, last) = [], run.bounds(s)
        for lo in range(first, last, batch_size):
            hi = min(lo + batch_size, last)
            shard += scorer.score_examples(list(run.dataset.select(range(lo, hi))), run.fmt, range(lo, hi))
            if bar is not None:
                bar.update(hi - lo)
        if run.shard_dir:
            lines = "".join(json.dumps(r) + "\n" for r in shard)
            write_text_atomic(os.path.join(run.shard_dir, f"shard-{s:06d}.jsonl"), lines)
        records[s] = shard
        work["scored_now"] += len(shard)
        work["guard_tokens"] += sum(record["guard_tokens"] for record in shard)
        work["audit_seconds"] += sum(record.get("audit_seconds", 0.0) for record in shard)
    if bar is not None:
        bar.close()
    return records, work


def _merge_processes(run: _Run, work: dict, barrier) -> tuple[dict[int, list[dict]], dict]:
    """Every shard is on disk: the main process merges them, and the work counts of all processes."""
    write_text_atomic(os.path.join(run.shard_dir, f"work-{run.rank}.json"), json.dumps(work))
    barrier()
    records = {s: _read_shard(run.shard_dir, s) for s in range(run.num_shards)}
    total = dict.fromkeys(work, 0)
    for r in range(run.world):
        with open(os.path.join(run.shard_dir, f"work-{r}.json")) as handle:
            for key, value in json.load(handle).items():
                total[key] += value
    return records, total


def _save_outputs(output_dir: str, scored, summary: ScoringSummary, audit: bool) -> None:
    save_dataset_atomic(scored, scored_dataset_path(output_dir))
    if audit:
        lines = "".join(json.dumps(finding, ensure_ascii=False) + "\n" for finding in summary.findings)
        write_text_atomic(os.path.join(output_dir, AUDIT_FILE), lines)
    saved = {k: v for k, v in asdict(summary).items() if k != "findings"}
    write_text_atomic(os.path.join(output_dir, "summary.json"), json.dumps(saved, indent=2))


def _tokenizer_id(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return f"{getattr(tokenizer, 'name_or_path', '')}|{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def _distributed():
    """(rank, world size, barrier) under `accelerate launch` / torchrun; (0, 1, no-op) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    import torch
    from accelerate import PartialState

    # Without an accelerator, accelerate only starts the gloo process group when asked for CPU explicitly.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    state = PartialState(cpu=not has_accelerator)
    return state.process_index, state.num_processes, state.wait_for_everyone


def _named(output_name: str, output_dir: str) -> str:
    """The directory as the user set it: `star_scores_dir='d'` (the errors also carry `output_name` in their
    `arguments`, for a front end that names it otherwise)."""
    return f"{output_name}={output_dir!r}"


def _check_settings(
    output_dir: str,
    settings: dict,
    overwrite: bool,
    is_main: bool,
    barrier,
    aliases=(),
    output_name: str = "output_dir",
) -> None:
    path = os.path.join(output_dir, _SETTINGS_FILE)
    existing, renamed = None, False
    if os.path.exists(path):
        with open(path) as handle:
            existing = json.load(handle)
        existing.setdefault("audit", None)  # written before audits existed: scores without one
        if existing.get("guardrail") in aliases:  # the same guard under its earlier name: recorded under its id
            existing["guardrail"], renamed = settings["guardrail"], True
    if existing is not None and existing != settings and not overwrite:
        changed = {k: (existing.get(k), v) for k, v in settings.items() if existing.get(k) != v}
        earlier = ""
        if "guardrail" in changed and "|T=" in str(existing.get("guardrail")):
            earlier = (
                " Its guard id is the form `score_dataset` wrote for a guard object before guards carried "
                "an id: run that `score_dataset` call again with the same guard (it reads the scores without "
                "a guard forward and records the guard's id), then this."
            )
        elif "guardrail" in changed:
            earlier = _guard_change(path, existing["guardrail"], settings["guardrail"])
        raise STARDSSError(
            f"{_named(output_name, output_dir)} holds STAR scores made with other settings ({changed}, as (stored, "
            f"now)).{earlier} Scores made with different settings are never mixed: choose another {output_name}, or "
            "delete those scores and score again (score_dataset(overwrite=True), `star-dss score --overwrite`, or "
            "delete the directory).",
            arguments=(output_name,),
        )
    barrier()
    if is_main:
        if overwrite and existing is not None:
            shutil.rmtree(os.path.join(output_dir, "shards"), ignore_errors=True)
            if os.path.exists(os.path.join(output_dir, PROBE_FILE)):  # figures of the scores just deleted
                os.remove(os.path.join(output_dir, PROBE_FILE))
        os.makedirs(os.path.join(output_dir, "shards"), exist_ok=True)
        if existing != settings or renamed:
            write_text_atomic(path, json.dumps(settings, indent=2))
    barrier()


def _guard_change(path: str, stored: str, now: str) -> str:
    """What the error adds when the stored scores name the same guard spec with another fingerprint (issue 33), or
    with none (an id of an earlier release, written before ids said what the guard is)."""
    try:
        before, after = json.loads(stored), json.loads(now)
    except (TypeError, ValueError):
        return ""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    strip = ("fingerprint",)
    if {k: v for k, v in before.items() if k not in strip} != {k: v for k, v in after.items() if k not in strip}:
        return ""
    if "fingerprint" not in before:
        return (
            " Those scores were made by an earlier release, whose guard ids did not yet say what the guard is (its "
            "files, hub commit or code), so it cannot be told whether this guard made them. If the guard has not "
            f"changed since, keep them by writing the id above as the `guardrail` entry of {path!r}; otherwise "
            "score again."
        )
    return (
        f" The guard {after.get('guardrail')} has changed since those scores were made (its files, hub commit or "
        "code differ), so they are not its scores."
    )


def _read_shard(shard_dir: str, s: int) -> list[dict] | None:
    path = os.path.join(shard_dir, f"shard-{s:06d}.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _check_hashes(records: list[dict], dataset, fmt: str, output_dir: str, output_name: str = "output_dir") -> None:
    for record in records:
        if record["hash"] != example_hash(dataset[record["index"]], fmt):
            raise STARDSSError(
                f"{_named(output_name, output_dir)} holds scores of another dataset: example {record['index']} "
                f"differs from the one scored there. Choose another {output_name}, or delete those scores "
                "(score_dataset(overwrite=True), `star-dss score --overwrite`, or delete the directory).",
                arguments=(output_name,),
            )


def _summarize(
    records: list[dict], seconds: float, scored_now: int, guard_tokens: int, audit_seconds: float, audit: bool
) -> ScoringSummary:
    summary = ScoringSummary(
        examples=len(records),
        seconds=seconds,
        scored_now=scored_now,
        guard_tokens=guard_tokens,
        audit_seconds=audit_seconds,
    )
    if audit:
        summary.findings = [finding for record in records for finding in record["audit"]]
        summary.audit = count_findings(summary.findings)
        summary.audited_examples = sum(bool(record["audit"]) for record in records)
    for record in records:
        scores = [score for turn in record["star"] for score in turn["scores"]]
        summary.turns += len(record["star"])
        summary.chunks += len(scores)
        summary.units += record["units"]
        summary.units_below_half += record["units_below_half"]
        summary.flagged += min(scores) < 0.5
        summary.context_cut += record["context_cut"]
    return summary


def scored_dataset_path(output_dir: str) -> str:
    """Where `score_dataset` saves the scored dataset in its `output_dir`."""
    return os.path.join(output_dir, "dataset")


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="STAR scoring", unit="ex")
