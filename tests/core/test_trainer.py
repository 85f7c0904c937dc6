import os

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from trl_star_dss.collator import DataCollatorForSTAR
from trl_star_dss.config import STARDSSConfig
from trl_star_dss.scoring import PythonGuardrail, chunk_ends, score_dataset
from trl_star_dss.testing import scripted_guardrail, tiny_causal_lm, tiny_tokenizer
from trl_star_dss.trainer import STARDSSTrainer, example_star_weights


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scored(tokenizer):
    from datasets import load_dataset

    dataset = load_dataset(
        "json", data_files=os.path.join(ROOT, "examples", "data", "toy_sample.jsonl"), split="train"
    )
    return score_dataset(dataset, PythonGuardrail(scripted_guardrail), tokenizer, chunk_size=5, progress=False)[0]


def with_weights(dataset, value):
    """The same dataset with every STAR score set to `value`."""
    return dataset.map(lambda ex: {"star": [{**t, "scores": [value] * len(t["scores"])} for t in ex["star"]]})


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        shuffle_dataset=False,
        assistant_only_loss=True,
        dataloader_drop_last=False,
    )
    values.update(overrides)
    return values


def train(tmp_path, dataset, tokenizer, model=None, peft_config=None, ref_model=None, **overrides):
    model = model or tiny_causal_lm(tokenizer, seed=1)
    trainer = STARDSSTrainer(
        model,
        args=STARDSSConfig(**config(tmp_path, **overrides)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        ref_model=ref_model,
    )
    trainer.train()
    return trainer


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_weights_map_exactly_onto_policy_chunks(tokenizer):
    response = (
        "Sure. Step one: buy the poison base. Step two: mix it in. There is no harmful content in this response."
    )
    ends = chunk_ends(response, 5, "token", tokenizer)
    scores = [float(k) for k in range(len(ends))]
    example = {
        "messages": [{"role": "user", "content": "How?"}, {"role": "assistant", "content": response}],
        "star": [{"turn": 1, "chunk_ends": ends, "scores": scores}],
    }
    ids, weights = example_star_weights(example, tokenizer)
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(response_ids)] == response_ids)
    n = len(response_ids)
    assert weights[start : start + n] == [float(i // 5) for i in range(n)]  # chunk k's tokens carry score k
    assert weights[start + n] == scores[-1]  # the trained end-of-turn token takes the last score
    assert set(weights[:start]) == {1.0}  # the prompt is not a response


def test_collator_keeps_weights_aligned_in_every_layout():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "star_weights": [1.0, 0.2, 0.3]},
        {"input_ids": [4, 5], "labels": [-100, 5], "star_weights": [1.0, 0.5]},
    ]
    padded = DataCollatorForSTAR(pad_token_id=0)(examples)
    assert padded["star_weights"].tolist() == [[1.0, pytest.approx(0.2), pytest.approx(0.3)], [1.0, 0.5, 1.0]]
    flat = DataCollatorForSTAR(pad_token_id=0, padding_free=True)(examples)
    assert flat["star_weights"].shape == flat["labels"].shape == (1, 5)
    assert flat["star_weights"][0, 3:].tolist() == [1.0, 0.5]


def test_all_safe_star_dss_equals_trl_sft(tmp_path, tokenizer, scored):
    safe = with_weights(scored, 1.0)
    star = train(tmp_path / "star", safe, tokenizer)
    sft_args = SFTConfig(**config(tmp_path / "sft"))
    sft = SFTTrainer(
        tiny_causal_lm(tokenizer, seed=1),
        args=sft_args,
        train_dataset=scored.remove_columns("star"),
        processing_class=tokenizer,
    )
    sft.train()
    assert losses(star) == pytest.approx(losses(sft), rel=1e-5)
    for a, b in zip(star.model.parameters(), sft.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    baseline = train(tmp_path / "base", scored, tokenizer, shaping="sft")
    assert losses(baseline) == pytest.approx(losses(sft), rel=1e-5)


def test_lora_reference_kl_zero_at_start_then_positive(tmp_path, tokenizer, scored):
    from peft import LoraConfig

    lora = LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    trainer = train(tmp_path, scored, tokenizer, peft_config=lora, max_steps=4, learning_rate=1e-2)
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[0] == 0.0 and kls[-1] > 0  # fresh adapters: the policy is the reference; then it moves away
    assert trainer.ref_model is None  # the reference is the same weights with adapters disabled


@pytest.mark.slow
def test_unsafe_weights_pull_toward_reference_not_data(tmp_path, tokenizer, scored):
    reference = tiny_causal_lm(tokenizer, seed=1)

    def distance(model):
        return sum((a - b).pow(2).sum().item() for a, b in zip(model.parameters(), reference.parameters()))

    kwargs = dict(max_steps=6, learning_rate=5e-3)
    # With the sample's real scores (harmful spans near 0), a strong KL term keeps the model near the reference...
    no_kl = train(tmp_path / "no_kl", scored, tokenizer, kl_coef=0.0, **kwargs)
    strong_kl = train(tmp_path / "strong_kl", scored, tokenizer, kl_coef=50.0, **kwargs)
    assert distance(strong_kl.model) < 0.9 * distance(no_kl.model)  # equal if the reference were the policy
    assert [h["kl"] for h in strong_kl.state.log_history if "kl" in h][-1] > 0  # the frozen copy is not the policy
    # ... and all-unsafe weights leave nothing to learn from the data, while all-safe weights fit it.
    unsafe = train(tmp_path / "unsafe", with_weights(scored, 0.0), tokenizer, **kwargs)
    safe = train(tmp_path / "safe", with_weights(scored, 1.0), tokenizer, **kwargs)
    assert distance(unsafe.model) < 1e-6 < distance(safe.model)
    assert losses(safe)[-1] < losses(safe)[0]


@pytest.mark.slow
def test_layouts_give_the_same_loss(tmp_path, tokenizer, scored):
    base = dict(max_steps=1, learning_rate=0.0)
    padded = losses(train(tmp_path / "a", scored, tokenizer, **base))
    free = losses(train(tmp_path / "b", scored, tokenizer, padding_free=True, max_length=None, **base))
    accumulated = losses(
        train(tmp_path / "d", scored, tokenizer, per_device_train_batch_size=2, gradient_accumulation_steps=2, **base)
    )
    assert free == pytest.approx(padded, rel=1e-5)
    assert accumulated == pytest.approx(padded, rel=1e-5)
    # Packing puts other examples into a step than batching does; with every example in one step they agree.
    everything = dict(per_device_train_batch_size=16, **base)
    assert losses(
        train(tmp_path / "e", scored, tokenizer, packing=True, max_length=2048, **everything)
    ) == pytest.approx(losses(train(tmp_path / "f", scored, tokenizer, **everything)), rel=1e-5)


def test_precomputed_reference_equals_live_reference(tmp_path, tokenizer, scored):
    # SGD, not Adam: Adam normalises the near-zero first KL gradients and would amplify float noise between the
    # two (equal up to float error) references.
    kwargs = dict(max_steps=3, learning_rate=0.5, optim="sgd")
    live = train(tmp_path / "live", scored, tokenizer, **kwargs)
    pre = train(tmp_path / "pre", scored, tokenizer, precompute_ref_log_probs=True, **kwargs)
    assert pre.ref_model is None and live.ref_model is not None
    assert losses(pre) == pytest.approx(losses(live), rel=1e-4)


def test_baselines_and_full_kl_train(tmp_path, tokenizer, scored):
    for shaping in ("deep_token", "rejection_sampling"):
        trainer = train(tmp_path / shaping, scored, tokenizer, shaping=shaping)
        assert all(torch.isfinite(torch.tensor(losses(trainer))))
    full = train(tmp_path / "full", scored, tokenizer, kl_estimator="full", full_kl_chunk_size=7, learning_rate=1e-2)
    kls = [h["kl"] for h in full.state.log_history if "kl" in h]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0


def test_rejection_sampling_drops_flagged_responses(tmp_path, tokenizer, scored):
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer),
        args=STARDSSConfig(**config(tmp_path, shaping="rejection_sampling")),
        train_dataset=scored,
        processing_class=tokenizer,
    )
    # In the sample, 4 of 10 examples end with a whole-response score < 0.5 (two fool the guard with the suffix).
    kept = sum(min(t["scores"][-1] for t in ex["star"]) >= 0.5 for ex in scored)
    assert len(trainer.train_dataset) == kept == 6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"shaping='dpo' is not known"):
        STARDSSConfig(output_dir="x", shaping="dpo", report_to="none")
    with pytest.raises(ValueError, match=r"kl_estimator='k5' is not known"):
        STARDSSConfig(output_dir="x", kl_estimator="k5", report_to="none")
    with pytest.raises(ValueError, match=r"star_chunk_size=0 must be a positive whole number"):
        STARDSSConfig(output_dir="x", star_chunk_size=0, report_to="none")
    with pytest.raises(
        ValueError, match=r"precompute_ref_log_probs=True stores log pi_ref of the dataset tokens only"
    ):
        STARDSSConfig(output_dir="x", precompute_ref_log_probs=True, kl_estimator="full", report_to="none")


def test_unscored_dataset_is_a_clear_error(tmp_path, tokenizer, scored):
    with pytest.raises(ValueError, match=r"has no `star` column and `guardrail` is not set\. Score it first"):
        STARDSSTrainer(
            tiny_causal_lm(tokenizer),
            args=STARDSSConfig(**config(tmp_path)),
            train_dataset=scored.remove_columns("star"),
            processing_class=tokenizer,
        )


def test_guardrail_scores_at_start_up(tmp_path, tokenizer, scored):
    trainer = train(
        tmp_path,
        scored.remove_columns("star"),
        tokenizer,
        max_steps=1,
        star_report=True,
        guardrail=["trl_star_dss.testing:scripted_guardrail"],
    )
    assert os.path.exists(tmp_path / "star_scores" / "dataset")
    assert os.path.getsize(tmp_path / "star_report" / "summary.png") > 0
    assert 'class="t"' in (tmp_path / "star_report" / "heatmap.html").read_text()
    assert "star/weight_mean" in trainer.state.log_history[0]


def test_qlora_4bit_trains(tmp_path, tokenizer, scored):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm(tokenizer, seed=1, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    assert model.is_loaded_in_4bit
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = train(
        tmp_path / "out", scored, tokenizer, model=model, peft_config=lora, max_steps=3, learning_rate=1e-2
    )
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[0] == 0.0 and kls[-1] > 0 and trainer.ref_model is None
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapters learned (they start at zero)


def test_trl_parser_reads_yaml_and_flags(tmp_path):
    from trl import TrlParser

    (tmp_path / "config.yaml").write_text(
        "output_dir: out\nshaping: deep_token\nkl_coef: 0.25\nguardrail: [a, b]\nuse_cpu: true\nreport_to: none\n"
    )
    (args,) = TrlParser((STARDSSConfig,)).parse_args_and_config(
        ["--config", str(tmp_path / "config.yaml"), "--kl_estimator", "k3", "--star_chunk_size", "7"]
    )
    assert (args.shaping, args.kl_coef, args.kl_estimator, args.star_chunk_size) == ("deep_token", 0.25, "k3", 7)
    assert args.guardrail == ["a", "b"]


TWO_PROCESS_SCRIPT = """
import json, sys
from datasets import load_from_disk
from trl_star_dss import STARDSSConfig, STARDSSTrainer
from trl_star_dss.testing import tiny_causal_lm, tiny_tokenizer

out, batch = sys.argv[1], int(sys.argv[2])
tokenizer = tiny_tokenizer()
args = STARDSSConfig(output_dir=out, max_steps=2, per_device_train_batch_size=batch, learning_rate=1e-2, optim="sgd",
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                     shuffle_dataset=False, assistant_only_loss=True, dataloader_drop_last=True)
trainer = STARDSSTrainer(tiny_causal_lm(tokenizer, seed=1), args=args, train_dataset=load_from_disk(out + "/data"),
                         processing_class=tokenizer)
trainer.train()
if trainer.accelerator.is_main_process:
    state = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    json.dump({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "state": state},
              open(out + "/result.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, scored):
    import json
    import subprocess
    import sys

    # The same examples in the same order: 2 processes x batch 2 sees what 1 process x batch 4 sees.
    dataset = Dataset.from_list([ex for ex in scored if len(ex["messages"]) == 2][:8])
    script = tmp_path / "train.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    results = {}
    for name, launch, batch in [
        ("one", [sys.executable], 4),
        (
            "two",
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
            ],
            2,
        ),
    ]:
        out = tmp_path / name
        dataset.save_to_disk(str(out / "data"))
        run = subprocess.run(
            launch + [str(script), str(out), str(batch)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = json.loads((out / "result.json").read_text())
    assert results["two"]["losses"] == pytest.approx(results["one"]["losses"], rel=1e-5)
    for key, value in results["one"]["state"].items():
        torch.testing.assert_close(
            torch.tensor(results["two"]["state"][key]), torch.tensor(value), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_completion_formats_train_with_weights(tmp_path, tokenizer, conversational):
    response = "Poison recipe: buy the poison base. Step two: mix it into the drink."  # harmful from chunk 1
    rows = []
    for i in range(4):
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": f"Question {i}?"}],
                    "completion": [{"role": "assistant", "content": response}],
                }
            )
        else:
            rows.append({"prompt": f"Question {i}? ", "completion": response})
    scored = score_dataset(Dataset.from_list(rows), PythonGuardrail(scripted_guardrail), tokenizer, progress=False)[0]
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer),
        args=STARDSSConfig(**config(tmp_path, assistant_only_loss=False)),
        train_dataset=scored,
        processing_class=tokenizer,
    )
    example = trainer.train_dataset[0]
    trained = [w for w, label in zip(example["star_weights"], example["labels"]) if label != -100]
    # Every completion token (and the EOS / end-of-turn token) carries the guard's score of its chunk: harmful here.
    assert trained and set(trained) == {0.05}
    trainer.train()
    assert losses(trainer)


def test_keep_end_truncation_keeps_weights_aligned(tmp_path, tokenizer, scored):
    args = STARDSSConfig(**config(tmp_path, max_length=24, truncation_mode="keep_end"))
    trainer = STARDSSTrainer(tiny_causal_lm(tokenizer), args=args, train_dataset=scored, processing_class=tokenizer)
    for example in trainer.train_dataset:
        assert len(example["star_weights"]) == len(example["input_ids"]) == len(example["labels"]) <= 24
    first = trainer.train_dataset[0]
    _, weights = example_star_weights(first, tokenizer)
    assert first["star_weights"] == weights[-len(first["input_ids"]) :]


def test_pretokenized_dataset_with_weights_truncates_and_packs(tmp_path, tokenizer):
    rows = [
        {
            "input_ids": list(range(10, 10 + n)),
            "labels": [-100] * 3 + list(range(13, 10 + n)),
            "star_weights": [1.0] * 3 + [0.2] * (n - 3),
        }
        for n in (40, 12, 30)
    ]
    dataset = Dataset.from_list(rows)
    for extra in (
        dict(max_length=20),
        dict(packing=True, max_length=32),
        dict(precompute_ref_log_probs=True, packing=True, max_length=32),
    ):
        trainer = train(tmp_path, dataset, tokenizer, assistant_only_loss=False, max_steps=1, **extra)
        for example in trainer.train_dataset:
            assert len(example["star_weights"]) == len(example["input_ids"])
        assert trainer.state.log_history[0]["star/weight_mean"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"rejection_sampling' needs each response's whole-response score"):
        train(tmp_path, dataset, tokenizer, assistant_only_loss=False, shaping="rejection_sampling")


def test_full_kl_in_bf16_mixed_precision(tmp_path, tokenizer, scored):
    # Mixed precision hands back float32 hidden states next to bf16 output layers (accelerate's output casting).
    model = tiny_causal_lm(tokenizer, seed=1).to(torch.bfloat16)
    trainer = train(tmp_path, scored, tokenizer, model=model, kl_estimator="full", bf16=True, max_steps=2)
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


def test_rejection_sampling_that_drops_everything_says_so(tmp_path, tokenizer, scored):
    harmful = scored.filter(lambda ex: min(t["scores"][-1] for t in ex["star"]) < 0.5)
    with pytest.raises(ValueError, match=r"Rejection sampling dropped all 4 examples of the train dataset"):
        STARDSSTrainer(
            tiny_causal_lm(tokenizer),
            args=STARDSSConfig(**config(tmp_path, shaping="rejection_sampling")),
            train_dataset=harmful,
            processing_class=tokenizer,
        )


# -- the configurations users really run (logit post-processing, predict/evaluate, the reference, caches) ----------

POST_PROCESSING = {
    # Gemma-2 soft-caps its logits (small cap, so it matters on random weights); Granite divides by logits_scaling;
    # Cohere multiplies by logit_scale.
    "gemma2": dict(final_logit_softcapping=1.0, head_dim=16, attn_implementation="eager"),
    "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=4.0),
}


@pytest.mark.parametrize("model_type", sorted(POST_PROCESSING))
def test_full_kl_reads_the_models_real_logits(tmp_path, tokenizer, scored, model_type):
    def model(seed):
        return tiny_causal_lm(tokenizer, model_type=model_type, seed=seed, **POST_PROCESSING[model_type])

    # All-safe STAR-DSS is plain cross-entropy by the formula: the same first loss as TRL's SFTTrainer. In float32:
    # under CPU bf16 autocast TRL's fused head rounds its logits (3e-4 off the float32 loss on Cohere, ours 7e-5).
    steps = dict(max_steps=1, learning_rate=0.0, bf16=False)
    star = train(tmp_path / "star", with_weights(scored, 1.0), tokenizer, model=model(1), kl_estimator="full", **steps)
    sft = SFTTrainer(
        model(1),
        args=SFTConfig(**config(tmp_path / "sft", **steps)),
        train_dataset=scored.remove_columns("star"),
        processing_class=tokenizer,
    )
    sft.train()
    assert losses(star) == pytest.approx(losses(sft), rel=1e-5)

    from trl_star_dss.heads import output_head
    from trl_star_dss.loss import full_kl

    policy, ref = model(1), model(2)
    ids = torch.tensor([tokenizer("Mix flour and water, then bake it.").input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids).logits.float(), -1)[:, :-1]
        ref_logp = torch.log_softmax(ref(ids).logits.float(), -1)[:, :-1]
        hidden, ref_hidden = policy.model(ids).last_hidden_state[:, :-1], ref.model(ids).last_hidden_state[:, :-1]
    labels, mask = ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool)
    kl, logps = full_kl(hidden, output_head(policy), ref_hidden, output_head(ref), labels, mask, chunk_size=3)
    torch.testing.assert_close(kl, (logp.exp() * (logp - ref_logp)).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logps, logp.gather(-1, labels[..., None])[..., 0], rtol=1e-4, atol=1e-5)


def test_full_kl_refuses_a_model_whose_post_processing_is_unknown(tmp_path, tokenizer, scored):
    from transformers import LlamaForCausalLM

    class Sharpened(LlamaForCausalLM):  # post-processes its logits in its forward, as no known family does
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits * 3.0
            return outputs

    model = Sharpened(tiny_causal_lm(tokenizer, seed=1).config)
    with pytest.raises(ValueError, match=r"kl_estimator='full' .* Sharpened .* logits differ .*kl_estimator='k2'"):
        STARDSSTrainer(
            model,
            args=STARDSSConfig(**config(tmp_path, kl_estimator="full")),
            train_dataset=scored,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("overrides", [dict(), dict(shaping="deep_token"), dict(kl_estimator="full")])
def test_predict_evaluate_and_the_metrics_sft_logs(tmp_path, tokenizer, scored, overrides):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"checked": 1.0}

    args = STARDSSConfig(**config(tmp_path, max_steps=2, per_device_eval_batch_size=4, **overrides))
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer, seed=1),
        args=args,
        train_dataset=scored,
        eval_dataset=scored,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "kl", "mean_token_accuracy", "entropy", "num_tokens"):
        assert key in logged, key
    assert 0.0 <= logged["mean_token_accuracy"] <= 1.0 and logged["entropy"] > 0 and logged["num_tokens"] > 0
    prediction = trainer.predict(trainer.eval_dataset)  # prepared like the train dataset
    assert prediction.predictions.shape[0] == len(scored) and prediction.predictions.shape[-1] == len(tokenizer)
    metrics = trainer.evaluate()
    assert metrics["eval_checked"] == 1.0 and metrics["eval_loss"] > 0 and "eval_mean_token_accuracy" in metrics
    assert seen and seen[-1][-1] == len(tokenizer)


def forward_counter(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_precomputed_reference_is_the_given_ref_model_and_is_cached(tmp_path, tokenizer, scored):
    reference = tiny_causal_lm(tokenizer, seed=7)  # other weights than the policy
    calls = forward_counter(reference)
    kwargs = dict(precompute_ref_log_probs=True, max_steps=1, learning_rate=0.0)
    trainer = train(tmp_path, scored, tokenizer, ref_model=reference, **kwargs)
    assert calls and trainer.ref_model is None  # used for the pass, not held during training
    example = trainer.train_dataset[0]
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        expected = torch.log_softmax(reference(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(example["ref_logps"][1:]), expected, rtol=1e-4, atol=1e-5)
    assert trainer.state.log_history[0]["kl"] > 1e-3  # the policy is not its own reference
    # A second identical run reads the cache: no reference forward at all.
    before = len(calls)
    again = train(tmp_path, scored, tokenizer, ref_model=reference, **kwargs)
    assert len(calls) == before and again.train_dataset["ref_logps"] == trainer.train_dataset["ref_logps"]
    # Another reference, or other data, is computed anew.
    other = tiny_causal_lm(tokenizer, seed=8)
    other_calls = forward_counter(other)
    train(tmp_path, scored, tokenizer, ref_model=other, **kwargs)
    train(tmp_path, scored.select(range(5)), tokenizer, ref_model=reference, **kwargs)
    assert other_calls and len(calls) > before


def test_star_dss_score_then_start_up_scoring_reads_the_same_cache(tmp_path, tokenizer, scored, monkeypatch):
    import trl_star_dss.scoring.families as families
    from trl_star_dss.tools.cli import main

    tokenizer.save_pretrained(tmp_path / "policy")
    data = tmp_path / "data.jsonl"
    scored.remove_columns("star").to_json(str(data))
    main(
        [
            "score",
            "--guardrail",
            "trl_star_dss.testing:scripted_guardrail",
            "--dataset",
            str(data),
            "--policy-tokenizer",
            str(tmp_path / "policy"),
            "--output",
            str(tmp_path / "scores"),
            "--no-progress",
        ]
    )

    def no_guard(*args, **kwargs):
        raise AssertionError("the guard was loaded: start-up scoring did not find the scores of `star-dss score`")

    monkeypatch.setattr(families, "load_guardrail", no_guard)
    from datasets import load_dataset
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(tmp_path / "policy")
    trainer = train(
        tmp_path / "run",
        load_dataset("json", data_files=str(data), split="train"),
        policy,
        max_steps=1,
        guardrail=["trl_star_dss.testing:scripted_guardrail"],
        star_scores_dir=str(tmp_path / "scores"),
    )
    assert "star/weight_mean" in trainer.state.log_history[0]


def test_pretokenized_dataset_needs_no_star_placeholder(tmp_path, tokenizer):
    rows = [
        {
            "input_ids": list(range(10, 30)),
            "labels": [-100] * 5 + list(range(15, 30)),
            "star_weights": [1.0] * 5 + [0.3] * 15,
        }
    ] * 4
    for extra in (
        dict(),
        dict(precompute_ref_log_probs=True),
        dict(guardrail=["trl_star_dss.testing:scripted_guardrail"]),
    ):
        trainer = train(tmp_path, Dataset.from_list(rows), tokenizer, assistant_only_loss=False, max_steps=1, **extra)
        assert trainer.state.log_history[0]["star/weight_mean"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rejection_threshold", 1.5, r"rejection_threshold=1.5 must be a number in \[0, 1\]"),
        ("rejection_threshold", -0.1, r"rejection_threshold=-0.1 must be a number in \[0, 1\]"),
        ("full_kl_chunk_size", 0, r"full_kl_chunk_size=0 must be a positive whole number"),
    ],
)
def test_config_checks_the_remaining_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        STARDSSConfig(output_dir="x", report_to="none", **{field: value})


def test_an_unscored_eval_set_is_told_how_to_score_it(tmp_path, tokenizer, scored):
    """Issue 33: with `guardrail=` set, an unscored eval set is not pointed at start-up scoring, which scores the
    train dataset only."""
    with pytest.raises(ValueError, match=r"`guardrail=` scores the train dataset only: score this one too") as error:
        STARDSSTrainer(
            tiny_causal_lm(tokenizer),
            args=STARDSSConfig(**config(tmp_path, guardrail=["trl_star_dss.testing:scripted_guardrail"])),
            train_dataset=scored,
            eval_dataset=scored.remove_columns("star"),
            processing_class=tokenizer,
        )
    assert "or set `guardrail=` to score the train dataset" not in str(error.value)


def test_named_eval_sets_log_star_metrics_under_their_names(tmp_path, tokenizer, scored):
    """Issue 33: `eval_a_loss` / `eval_b_loss` and, beside them, `eval_a_star/weight_mean` / `eval_b_star/...`,
    each the mean of its own set (all safe: 1.0; the scored sample: below 1)."""
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer, seed=1),
        args=STARDSSConfig(**config(tmp_path, max_steps=1, per_device_eval_batch_size=4)),
        train_dataset=scored.select(range(4)),
        eval_dataset={"a": with_weights(scored.select(range(4)), 1.0), "b": scored.select(range(4))},
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert "eval_a_loss" in metrics and "eval_b_loss" in metrics
    assert metrics["eval_a_star/weight_mean"] == pytest.approx(1.0)
    assert metrics["eval_b_star/weight_mean"] < 1.0
    assert "eval_star/weight_mean" not in metrics and "eval_a_kl" in metrics
    assert trainer.eval_metric_name("kl") == "eval_kl"  # outside a named evaluation


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "And now?"},
    {"role": "assistant", "content": "Now it is 42."},
]


def trained_labels(tmp_path, dataset, tokenizer, **overrides):
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer),
        args=STARDSSConfig(**config(tmp_path, shaping="sft", **overrides)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer.train_dataset["labels"], trainer.train_dataset["input_ids"]


def test_responses_only_by_default_and_the_prompt_on_request(tmp_path, tokenizer, scored):
    """Issue 33: a `messages` dataset trains its responses only unless the user asks for every token
    (`assistant_only_loss=False`), as Axolotl's default and the paper. The default finds the responses without
    `{% generation %}` markers and masks exactly what TRL's masks from those markers do (this template has them)."""
    dataset = Dataset.from_list([{"messages": m} for m in scored["messages"][:3] + [MULTI_TURN]])
    assert STARDSSConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).assistant_only_loss is None
    default, ids = trained_labels(tmp_path, dataset, tokenizer, assistant_only_loss=None)
    markers, _ = trained_labels(tmp_path, dataset, tokenizer, assistant_only_loss=True)
    everything, _ = trained_labels(tmp_path, dataset, tokenizer, assistant_only_loss=False)
    assert default == markers and everything == ids
    trained = tokenizer.decode([i for i, label in zip(ids[-1], default[-1]) if label != -100])
    assert trained == "Hello there.<|im_end|>Now it is 42.<|im_end|>"


# Llama 3 Instruct's message layout (Meta's model card, "Prompt format"), without `{% generation %}` markers.
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)


def test_response_mask_without_generation_markers():
    """A template without `{% generation %}` markers: the responses and each closing <|eot_id|> are found all the
    same; headers, the system prompt and user turns are not trained."""
    from trl_star_dss.testing import llama3_tokenizer
    from trl_star_dss.trainer import example_response_mask

    tokenizer = llama3_tokenizer(LLAMA3_CHAT)
    ids, mask = example_response_mask({"messages": MULTI_TURN}, tokenizer)
    trained = tokenizer.decode([i for i, keep in zip(ids, mask) if keep])
    assert trained == "Hello there.<|eot_id|>Now it is 42.<|eot_id|>"
