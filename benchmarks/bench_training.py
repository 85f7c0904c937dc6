"""STAR-DSS training step vs plain SFT, side by side in one process (README, Performance).

    python benchmarks/bench_training.py                      # CPU, 4-layer Llama-shaped model, 32k vocabulary
    python benchmarks/bench_training.py --threads 1 --rounds 2   # steadier on cores another process also uses
    python benchmarks/bench_training.py --device cuda --dtype bfloat16 --attn flash_attention_2 \
        --layers 16 --hidden 2048 --intermediate 8192 --heads 32 --vocab 128256 --seq-len 2048   # Llama-3.2-1B dims

Every run trains a freshly initialised model of the same shape (same seed) on the same synthetic, pre-tokenized data:
random token ids, the first quarter of each sequence a prompt (labels -100), the response scored in 5-token chunks,
its first half safe (STAR weight in [0.5, 1]) and its second half unsafe ([0, 0.5)), so half the trained tokens go to
the KL term. Runs:

  SFT                              shaping="sft", full finetune                  (baseline of the rows below it)
  STAR-DSS k2, precomputed ref     precompute_ref_log_probs=True: no reference model during training
  STAR-DSS full KL, frozen copy    kl_estimator="full": a frozen copy of the model, vocabulary-wide KL
  SFT + LoRA                       shaping="sft" with a LoRA adapter             (baseline of the row below it)
  STAR-DSS k2, LoRA-off ref        the reference is the same model with its adapters disabled (a 2nd forward)

Step time is the median of `--steps` optimizer steps (of every round) after `--warmup` untimed ones: a TrainerCallback
around each step, CUDA synchronised. Gradient checkpointing is on by default, as in TRL's SFTConfig. The precomputed
run's reference pass is a one-time cost over its whole dataset (here exactly the steps trained), reported apart.

Peak memory covers building the model and trainer (so a frozen reference copy counts) and training. On CUDA it is
`torch.cuda.max_memory_allocated`, exact. On CPU it is the peak increase of the process RSS, sampled every 5 ms by a
thread after returning freed heap to the OS: approximate (short spikes can be missed, allocator slack is counted).
The last line is `overhead <STAR-DSS k2 precomputed step time / SFT step time>`, for scripts to read.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import tempfile
import threading
import time
import warnings


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub

import datasets
import psutil
import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, PrinterCallback, TrainerCallback

from trl_star_dss import STARDSSConfig, STARDSSTrainer
from trl_star_dss.testing import tiny_tokenizer


CHUNK = 5  # the paper's M: one STAR score per 5 response tokens

# (name, STARDSSConfig fields, LoRA?, the run its ratios are taken against)
RUNS = [
    ("SFT", {"shaping": "sft"}, False, "SFT"),
    ("STAR-DSS k2, precomputed ref", {"kl_estimator": "k2", "precompute_ref_log_probs": True}, False, "SFT"),
    ("STAR-DSS full KL, frozen copy", {"kl_estimator": "full"}, False, "SFT"),
    ("SFT + LoRA", {"shaping": "sft"}, True, "SFT + LoRA"),
    ("STAR-DSS k2, LoRA-off ref", {"kl_estimator": "k2"}, True, "SFT + LoRA"),
]


def make_dataset(args) -> Dataset:
    """Pre-tokenized examples of exactly `seq_len` tokens, so every step sees the same number of tokens."""
    g = torch.Generator().manual_seed(0)
    n, prompt = (args.warmup + args.steps) * args.batch, args.seq_len // 4
    ids = torch.randint(10, args.vocab, (n, args.seq_len), generator=g)  # 0-9: tiny_tokenizer()'s special tokens
    labels = ids.clone()
    labels[:, :prompt] = -100
    chunks = -(-(args.seq_len - prompt) // CHUNK)
    scores = torch.rand(n, chunks, generator=g) * 0.5
    scores[:, : chunks // 2] += 0.5  # the response turns unsafe half way
    weights = torch.cat([torch.ones(n, prompt), scores.repeat_interleave(CHUNK, dim=1)], dim=1)[:, : args.seq_len]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "star_weights": weights.tolist()})


def make_model(args):
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=False,
        bos_token_id=0,
        pad_token_id=2,
        eos_token_id=4,  # tiny_tokenizer()'s, so TRL does not rewrite the config
    )
    torch.manual_seed(0)  # the same initial weights in every run
    with torch.device(args.device):  # built in place and in its dtype: flash_attention_2 checks the dtype at build
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=args.attn, dtype=getattr(torch, args.dtype)
        )


class TimedTrainer(STARDSSTrainer):
    """Times the one-time reference pass of `precompute_ref_log_probs` (it runs inside `__init__`)."""

    precompute_s = 0.0

    def _with_ref_logps(self, dataset, dataset_name):
        start = time.perf_counter()
        try:
            return super()._with_ref_logps(dataset, dataset_name)
        finally:
            self.precompute_s += time.perf_counter() - start


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: forward(s), backward and optimizer update; not data loading or logging."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self.start)


class PeakMemory:
    """Peak memory added while the block runs, in bytes: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:  # give the previous run's freed heap back to the OS, or it would hide this run's growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        process = psutil.Process()
        self.base = self.peak = process.memory_info().rss
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, process.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.used = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.used = max(self.peak, psutil.Process().memory_info().rss) - self.base


def run(args, dataset, fields: dict, lora: bool) -> dict:
    from peft import LoraConfig

    cuda = args.device.startswith("cuda")
    timer = StepTimer(torch.cuda.synchronize if cuda else lambda: None)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(args.device) as memory:
        config = STARDSSConfig(
            output_dir=output_dir,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=args.batch,
            learning_rate=1e-4,
            max_length=args.seq_len,
            logging_steps=args.warmup + args.steps,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=not cuda,
            bf16=args.dtype == "bfloat16",
            seed=0,
            gradient_checkpointing=args.gradient_checkpointing == "on",
            dataloader_drop_last=True,
            **fields,
        )
        # The labels already mask the prompt, so no chat template is involved; the tokenizer only gives pad/EOS ids.
        trainer = TimedTrainer(
            make_model(args),
            args=config,
            train_dataset=dataset,
            processing_class=tiny_tokenizer(),
            peft_config=peft_config,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts in the output
        trainer.train()
        one_time = trainer.precompute_s
        del trainer
    return {"steps": timer.times[args.warmup :], "memory": memory.used, "one_time": one_time}


def reference_pass(args, dataset) -> tuple[float, float]:
    """Seconds of the one-time reference pass (`precompute_ref_log_probs`): first run, then the same run again,
    which reads `<output_dir>/ref_logps/` instead of running the reference."""
    seconds = []
    with tempfile.TemporaryDirectory() as output_dir:
        for _ in range(2):
            config = STARDSSConfig(
                output_dir=output_dir,
                per_device_eval_batch_size=args.batch,
                max_length=args.seq_len,
                report_to="none",
                use_cpu=not args.device.startswith("cuda"),
                disable_tqdm=True,
                bf16=args.dtype == "bfloat16",
                precompute_ref_log_probs=True,
            )
            trainer = TimedTrainer(
                make_model(args), args=config, train_dataset=dataset, processing_class=tiny_tokenizer()
            )
            seconds.append(trainer.precompute_s)
            del trainer
    return seconds[0], seconds[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"], help="on: TRL's default")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier when shared")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all runs, pooling steps (for a shared machine)")
    args = parser.parse_args()
    # Keep the output to the table: no progress bars, info logs or library deprecation notices.
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:  # several threads on cores another process also uses wait on each other at every op
        torch.set_num_threads(args.threads)

    dataset = make_dataset(args)
    params = sum(p.numel() for p in make_model(args).parameters())
    print(
        f"device {args.device} ({torch.get_num_threads()} threads), {args.dtype}, attn {args.attn}, gradient "
        f"checkpointing {args.gradient_checkpointing}; Llama {args.layers}x{args.hidden} (ffn {args.intermediate}, "
        f"{args.heads} heads), vocab {args.vocab}, {params / 1e6:.1f}M params; batch {args.batch} x {args.seq_len} "
        f"tokens; median of {args.steps} steps after {args.warmup} warm-up, x{args.rounds} rounds",
        flush=True,
    )

    # Rounds run the list again and pool the timed steps: on a shared machine, load that drifts over minutes then
    # falls on every run instead of on whichever ran while it lasted.
    results = {name: {"steps": [], "memory": 0, "one_time": []} for name, *_ in RUNS}
    for round_ in range(args.rounds):
        for name, fields, lora, _ in RUNS:
            r, pooled = run(args, dataset, fields, lora), results[name]
            pooled["steps"] += r["steps"]
            pooled["memory"] = max(pooled["memory"], r["memory"])
            pooled["one_time"].append(r["one_time"])
            print(f"  round {round_ + 1}: {name}: {statistics.median(r['steps']):.3f} s/step", flush=True)
    for r in results.values():
        r["step"], r["one_time"] = statistics.median(r["steps"]), statistics.median(r["one_time"])

    memory_kind = "CUDA max allocated" if args.device == "cuda" else "RSS increase, approx."
    print(
        f"\n{'run':<31} {'step s':>7} {'(min-max)':>13} {'x base':>6} {'peak MiB':>9} {'x base':>6} "
        f"{'one-time s':>10}  base"
    )
    for name, _, _, base in RUNS:
        r, b = results[name], results[base]
        spread = f"({min(r['steps']):.2f}-{max(r['steps']):.2f})"
        one_time = f"{r['one_time']:.2f}" if r["one_time"] else "-"
        print(
            f"{name:<31} {r['step']:>7.3f} {spread:>13} {r['step'] / b['step']:>6.2f} {r['memory'] / 2**20:>9.0f} "
            f"{r['memory'] / b['memory']:>6.2f} {one_time:>10}  {base}"
        )
    print(f"(peak memory: {memory_kind}; one-time: the precomputed run's reference pass over its dataset)")
    first, cached = reference_pass(args, dataset)
    print(
        f"reference pass over {len(dataset)} examples: first run {first:.2f} s, same run again (cached) {cached:.2f} s"
    )
    print(f"overhead {results['STAR-DSS k2, precomputed ref']['step'] / results['SFT']['step']:.2f}")


if __name__ == "__main__":
    main()
