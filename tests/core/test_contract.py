"""The host's options under each shaping (docs/training.md, "SFTConfig options and PEFT methods under each shaping"):
each SFTConfig / TrainingArguments option that changes the loss, the labels or the sequence layout, and each PEFT
method family, is honoured (a test shows its effect) or refused by name when the trainer is built."""

import contextlib
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, load_dataset

from trl_star_dss import star_weights_column
from trl_star_dss.config import STARDSSConfig
from trl_star_dss.contract import check_context_parallel
from trl_star_dss.errors import STARDSSError
from trl_star_dss.loss_mixin import STARLossMixin
from trl_star_dss.scoring import PythonGuardrail, score_dataset
from trl_star_dss.testing import scripted_guardrail, tiny_causal_lm, tiny_tokenizer
from trl_star_dss.trainer import STARDSSTrainer


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWN_LOSS = ("star_dss", "deep_token")  # the shapings that train this project's loss, not the host's cross-entropy
HOST_LOSS = ("sft", "rejection_sampling")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scored(tokenizer):
    dataset = load_dataset(
        "json", data_files=os.path.join(ROOT, "examples", "data", "toy_sample.jsonl"), split="train"
    )
    return score_dataset(dataset, PythonGuardrail(scripted_guardrail), tokenizer, chunk_size=5, progress=False)[0]


def build(tmp_path, dataset, tokenizer, peft_config=None, compute_loss_func=None, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=1,
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
    return STARDSSTrainer(
        tiny_causal_lm(tokenizer, seed=1),
        args=STARDSSConfig(**values),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        compute_loss_func=compute_loss_func,
    )


def first_log(trainer):
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("shaping", OWN_LOSS)
@pytest.mark.parametrize(
    "option, message",
    [
        (dict(loss_type="dft"), r"loss_type='dft' is refused with shaping='{}': .* Use loss_type='nll'"),
        (dict(label_smoothing_factor=0.1), r"label_smoothing_factor=0.1 is refused with shaping='{}'"),
        (dict(neftune_noise_alpha=5.0), r"neftune_noise_alpha=5.0 is refused with shaping='{}': NEFTune"),
    ],
)
def test_loss_options_are_refused_by_name_under_the_own_loss_shapings(
    tmp_path, tokenizer, scored, shaping, option, message
):
    with pytest.raises(STARDSSError, match=message.format(shaping)):
        build(tmp_path, scored, tokenizer, shaping=shaping, **option)


@pytest.mark.parametrize("shaping", OWN_LOSS)
def test_compute_loss_func_is_refused_under_the_own_loss_shapings(tmp_path, tokenizer, scored, shaping):
    def my_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.mean()

    with pytest.raises(STARDSSError, match=rf"compute_loss_func='my_loss' is refused with shaping='{shaping}'"):
        build(tmp_path, scored, tokenizer, compute_loss_func=my_loss, shaping=shaping)


@pytest.mark.slow
@pytest.mark.parametrize("shaping", HOST_LOSS)
def test_loss_options_act_under_the_host_loss_shapings(tmp_path, tokenizer, scored, shaping):
    # The host's own cross-entropy (SFTTrainer.compute_loss) trains these shapings: each option changes the first loss.
    def loss(name, **option):
        return first_log(build(tmp_path / name, scored, tokenizer, shaping=shaping, **option))["loss"]

    plain = loss("nll")
    for name, option in {
        "dft": dict(loss_type="dft"),
        "smoothing": dict(label_smoothing_factor=0.1),
        "neftune": dict(neftune_noise_alpha=5.0),
    }.items():
        assert loss(name, **option) != pytest.approx(plain, rel=1e-4), name


@pytest.mark.parametrize("shaping", ["sft", "rejection_sampling", "star_dss", "deep_token"])
def test_context_parallelism_is_refused_where_the_weights_would_not_follow(shaping):
    parallel = SimpleNamespace(cp_enabled=True, sp_enabled=False)
    if shaping in OWN_LOSS:
        with pytest.raises(
            STARDSSError, match=rf"Context or sequence parallelism .* refused with shaping='{shaping}'"
        ):
            check_context_parallel(shaping, parallel)
    else:  # the host's cross-entropy reads TRL's `shift_labels`
        check_context_parallel(shaping, parallel)
    check_context_parallel(shaping, SimpleNamespace(cp_enabled=False, sp_enabled=False))


@pytest.mark.parametrize("shaping", OWN_LOSS)
def test_virtual_token_peft_trains_its_prompt(tmp_path, tokenizer, scored, shaping):
    from peft import PromptEncoderConfig, PromptTuningConfig

    # Before the fix: "The size of tensor a (109) must match the size of tensor b (113)" (4 virtual tokens).
    for name, peft_config in {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    }.items():
        trainer = build(tmp_path / name, scored, tokenizer, peft_config=peft_config, shaping=shaping)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        after = dict(trainer.model.named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in before), name  # the prompt learned
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"]])).all() for h in logs)


def test_prefix_tuning_is_refused_by_name(tmp_path, tokenizer, scored):
    from peft import PrefixTuningConfig

    for shaping in ("sft", "star_dss"):
        with pytest.raises(
            STARDSSError, match=rf"PREFIX_TUNING \(prefix tuning\) is refused with shaping='{shaping}'"
        ):
            build(tmp_path, scored, tokenizer, shaping=shaping, peft_config=PrefixTuningConfig(task_type="CAUSAL_LM"))


def test_average_tokens_across_devices_scales_like_sft(monkeypatch):
    # SFTTrainer multiplies its token mean by the data-parallel size when `num_items_in_batch` counts every rank's
    # tokens (DDP averages the gradients); the STAR loss must do the same, and nothing without the option.
    host = STARLossMixin()
    host.accelerator = SimpleNamespace(num_processes=4)
    host.get_tp_size = lambda: 2
    total, mask = torch.tensor(12.0), torch.ones(2, 3, dtype=torch.bool)
    for average, expected in ((True, 12.0 / 6 * 2), (False, 12.0 / 6)):
        host.args = SimpleNamespace(average_tokens_across_devices=average)
        assert host.token_mean(total, mask, num_items_in_batch=torch.tensor(6)).item() == pytest.approx(expected)
    assert host.token_mean(total, mask).item() == pytest.approx(2.0)  # no `num_items_in_batch`: the local mean


@pytest.mark.parametrize("shaping", OWN_LOSS)
def test_activation_offloading_wraps_the_star_loss(tmp_path, tokenizer, scored, shaping):
    # TRL's offloading context (`SFTTrainer.training_step`) needs an accelerator device; on CPU it fails for every
    # shaping, `sft` included. What is ours to show: the STAR loss runs inside the context TRL enters.
    trainer = build(tmp_path, scored, tokenizer, shaping=shaping)
    inside = []

    @contextlib.contextmanager
    def offloading():
        inside.append(True)
        yield
        inside.append(False)

    trainer.maybe_activation_offload_context = offloading()
    star_loss = trainer.star_loss

    def recorded(*args, **kwargs):
        assert inside == [True]
        return star_loss(*args, **kwargs)

    trainer.star_loss = recorded
    trainer.train()
    assert inside == [True, False]


def test_liger_layer_kernels_reach_the_star_forward(tmp_path, tokenizer, scored, monkeypatch):
    # liger-kernel needs Triton (a GPU): a stand-in records what the host asks of it. TRL applies its layer kernels
    # only (fused_linear_cross_entropy off), so the STAR loss keeps the fused LM head and runs through the kernels.
    calls = {"config": None, "norm": 0}

    def apply(model, **config):
        calls["config"] = config
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                forward = module.forward

                def counted(*args, _forward=forward, **kwargs):
                    calls["norm"] += 1
                    return _forward(*args, **kwargs)

                module.forward = counted

    liger = types.ModuleType("liger_kernel.transformers")
    liger._apply_liger_kernel_to_instance = apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger)
    monkeypatch.setattr("transformers.integrations.liger.is_liger_kernel_available", lambda: True)
    plain = first_log(build(tmp_path / "plain", scored, tokenizer))
    kernels = first_log(build(tmp_path / "liger", scored, tokenizer, use_liger_kernel=True))
    assert calls["config"] == {"fused_linear_cross_entropy": False} and calls["norm"] > 0
    assert kernels["loss"] == pytest.approx(plain["loss"], rel=1e-6)


@pytest.mark.parametrize("shaping", OWN_LOSS)
def test_assistant_only_loss_decides_the_trained_tokens(tmp_path, tokenizer, scored, shaping):
    # TRL builds the labels; the STAR weights follow them (prompt tokens weigh 1 when they are trained).
    trained = {}
    for only in (True, False):
        trainer = build(tmp_path / str(only), scored, tokenizer, shaping=shaping, assistant_only_loss=only)
        rows = trainer.train_dataset
        trained[only] = sum(sum(label != -100 for label in row["labels"]) for row in rows)
        if shaping == "star_dss":
            assert all(len(row["star_weights"]) == len(row["input_ids"]) for row in rows)
    assert trained[False] > trained[True] > 0


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_packing_strategies_carry_every_weight(tmp_path, tokenizer, scored, strategy):
    # Rows of 64 tokens for examples of about 100: `bfd_split` and `wrapped` carry the overflow into other rows (before
    # the fix, every example was cut to 64 tokens first); `bfd` truncates by design, so it gets rows that fit.
    plain = build(tmp_path / "plain", scored, tokenizer, max_length=None)
    length = 256 if strategy == "bfd" else 64
    packed = build(tmp_path / strategy, scored, tokenizer, packing=True, packing_strategy=strategy, max_length=length)

    def trained_weights(dataset):
        return sorted(
            round(w, 6) for row in dataset for w, label in zip(row["star_weights"], row["labels"]) if label != -100
        )

    for row in packed.train_dataset:
        assert len(row["star_weights"]) == len(row["input_ids"]) == len(row["labels"])
    assert trained_weights(packed.train_dataset) == trained_weights(plain.train_dataset)
    assert torch.isfinite(torch.tensor(first_log(packed)["loss"]))


def pretokenized(scored, tokenizer):
    return star_weights_column(scored, tokenizer).select_columns(["input_ids", "star_weights"])


SKIP = dict(dataset_kwargs={"skip_prepare_dataset": True}, assistant_only_loss=False)


def test_pretokenized_dataset_with_the_public_weights_column_trains(tmp_path, tokenizer, scored):
    rows = pretokenized(scored, tokenizer)
    trained = build(tmp_path / "skip", rows, tokenizer, per_device_train_batch_size=len(rows), **SKIP)
    # Without labels every token is trained; the first token of each row is never a label.
    expected = sum(sum(w[1:]) for w in rows["star_weights"]) / sum(len(w) - 1 for w in rows["star_weights"])
    assert first_log(trained)["star/weight_mean"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda e: {"star_weights": e["star_weights"][:-3]},
            r"Example 0 of the train dataset has \d+ `star_weights` ",
        ),
        (lambda e: {"star_weights": [5.0] * len(e["input_ids"])}, r"`star_weights` value of 5.0, outside \[0, 1\]"),
    ],
)
def test_pretokenized_weights_are_checked_like_the_star_column(tmp_path, tokenizer, scored, skip, change, message):
    # Before: a shorter column failed in the loss with a bare shape error; weights of 5.0 trained (a negative KL term).
    rows = pretokenized(scored, tokenizer).map(change)
    with pytest.raises(STARDSSError, match=message):
        build(tmp_path, rows, tokenizer, **(SKIP if skip else dict(assistant_only_loss=False)))


def test_pretokenized_dataset_errors_name_the_weights_column(tmp_path, tokenizer, scored):
    rows = pretokenized(scored, tokenizer)
    with pytest.raises(STARDSSError, match=r"no `star_weights` column.*trl_star_dss.star_weights_column"):
        build(tmp_path, rows.remove_columns("star_weights"), tokenizer, **SKIP)
    with pytest.raises(STARDSSError, match=r"rejection_sampling' needs each response's whole-response score"):
        build(tmp_path, rows, tokenizer, shaping="rejection_sampling", **SKIP)
    # deep_token and sft read no weights
    build(tmp_path, rows.remove_columns("star_weights"), tokenizer, shaping="deep_token", **SKIP)
    with pytest.raises(STARDSSError, match=r"Example 0 has `input_ids` that are not the tokens"):
        star_weights_column(scored.add_column("input_ids", [[1, 2]] + rows["input_ids"][1:]), tokenizer)
    with pytest.raises(STARDSSError, match=r"star_weights_column needs the dataset's `star` column"):
        star_weights_column(Dataset.from_list([{"prompt": "a", "completion": "b"}]), tokenizer)
