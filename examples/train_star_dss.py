"""Finetune a chat model with STAR-DSS (or one of the paper's baselines) under `accelerate launch`.

    # 1. score the data once with a guardrail (cached, resumable; several GPUs split the work)
    accelerate launch -m trl_star_dss.cli score --guardrail ibm-granite/granite-guardian-3.1-2b \
        --policy-tokenizer meta-llama/Llama-3.2-1B-Instruct --dataset purebad.jsonl --output runs/purebad-scored
    # 2. finetune (QLoRA on one GPU, or full finetuning on several)
    accelerate launch examples/train_star_dss.py --config examples/configs/llama3.2-1b-qlora.yaml
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_star_dss.py \
        --config examples/configs/llama3.2-1b-full.yaml

Every field of the YAML can be overridden on the command line (`--kl_coef 1.0`, `--shaping rejection_sampling`).
Set `guardrail:` instead of pointing `dataset_name` at scores to score at start-up.
"""

import torch
from accelerate import PartialState
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_star_dss import STARDSSConfig, STARDSSTrainer
from trl_star_dss.tools.loading import load_dataset_arg


def main():
    parser = TrlParser((ScriptArguments, STARDSSConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        "quantization_config": quantization_config,
        # A quantized model is placed whole on this process's device (no sharding of 4-bit weights).
        "device_map": {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
        if quantization_config is not None
        else None,
    }
    # A directory written by `star-dss score` (its `dataset/`), a local file, or a hub id.
    train_dataset = load_dataset_arg(script_args.dataset_name, script_args.dataset_train_split)

    trainer = STARDSSTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
