"""Train `STARDSSTrainer` for two steps under one engine and write what the tests compare (tests/core/test_engines.py).

    python tests/core/distributed_train.py OUT one BATCH CASE           (one process)
    torchrun --nproc_per_node 2 tests/core/distributed_train.py OUT zero3 BATCH CASE
    torchrun --nproc_per_node 2 tests/core/distributed_train.py OUT fsdp2 BATCH CASE

OUT holds `model` and `ref_model` (tiny Llamas saved with their tokenizer) and `data` (a scored dataset). CASE is a
way users take the reference under a sharding engine (docs/training.md, "DeepSpeed ZeRO-3 and FSDP"): `precompute`
(a full finetune with `precompute_ref_log_probs`), `lora` (adapters off) or `ref_model` (a separate reference,
another model). It writes `OUT/ENGINE/CASE/result.json` (the logged steps, the number of processes, the share of
the weights each holds, the keys of the precomputed reference's cache) and saves the model with `trainer.save_model`
to `OUT/ENGINE/CASE/model`. One case a process: Accelerate allows one DeepSpeed configuration a process.
"""

import json
import os
import sys


def configure(engine: str) -> dict:
    """The `STARDSSConfig` fields that select the engine, and the process state it needs on a machine without GPU."""
    if engine == "one":
        return {"use_cpu": True}
    from accelerate import PartialState

    # Accelerate only names a backend for DeepSpeed and FSDP when it finds a GPU; on CPU it would run DeepSpeed with
    # `num_processes=1` over a 2-process gloo group (docs/training.md, "What blocks ZeRO-3 and FSDP on CPU"). A state
    # built first with the gloo backend, and kept (`use_configured_state`), gives them the real process group.
    if engine == "zero3":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        zero3 = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
        return {
            "accelerator_config": {"use_configured_state": True},
            "deepspeed": {
                "zero_optimization": zero3,
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
            },
        }
    if engine == "fsdp2":
        from accelerate.utils import DistributedType

        state = PartialState(backend="gloo")
        # Accelerate turns FSDP on only over GPU-like process types; the gloo group of CPU processes stands in.
        state.distributed_type = DistributedType.MULTI_GPU
        return {
            "accelerator_config": {"use_configured_state": True},
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "reshard_after_forward": True,
            },
        }
    raise SystemExit(f"unknown engine {engine!r}")


def local_share(model) -> float:
    """The share of the model's weights that this process holds: 1 unsharded, about 1/2 sharded over 2 processes."""
    local = full = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_tensor"):  # ZeRO-3: this process's partition of a flattened weight
            local, full = local + parameter.ds_tensor.numel(), full + parameter.ds_numel
        elif hasattr(parameter, "to_local"):  # FSDP2: a DTensor sharded along its first dimension
            local, full = local + parameter.to_local().numel(), full + parameter.numel()
        else:
            local, full = local + parameter.numel(), full + parameter.numel()
    return local / full


def main(out: str, engine: str, batch: int, case: str) -> None:
    engine_args = configure(engine)
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from trl_star_dss import STARDSSConfig, STARDSSTrainer

    directory = os.path.join(out, engine, case)
    args = STARDSSConfig(
        output_dir=directory,
        max_steps=2,
        per_device_train_batch_size=batch,
        learning_rate=1e-2,
        optim="sgd",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        bf16=False,  # float32 everywhere, so one process and two agree to rounding
        shuffle_dataset=False,
        assistant_only_loss=True,
        dataloader_drop_last=True,
        precompute_ref_log_probs=case == "precompute",
        **engine_args,
    )
    # Loaded after the config exists, as a user's script does: ZeRO-3 then partitions it while it loads.
    ref_model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "ref_model")) if case == "ref_model" else None
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = STARDSSTrainer(
        os.path.join(out, "model"),
        args=args,
        train_dataset=load_from_disk(os.path.join(out, "data")),
        ref_model=ref_model,
        peft_config=lora if case == "lora" else None,
    )
    trainer.train()
    share = local_share(trainer.model_wrapped)
    trainer.save_model(os.path.join(directory, "model"))
    if trainer.accelerator.is_main_process:
        with open(os.path.join(directory, "result.json"), "w") as f:
            steps = [h for h in trainer.state.log_history if "loss" in h]
            cache = os.path.join(directory, "ref_logps")  # one entry, named by `reference.reference_key`
            keys = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
            result = {"steps": steps, "processes": trainer.accelerator.num_processes, "local_share": share}
            json.dump({**result, "ref_logps_keys": keys}, f)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
