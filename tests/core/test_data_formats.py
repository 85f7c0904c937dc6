"""Dataset shapes STAR reads (issue 25): messages without a role are refused; content given as text parts is scored
as its joined text, images are refused; TRL's tool-calling format scores (the call as text) and trains."""

import ast
import json

import pytest
from datasets import Dataset

from trl_star_dss.formats import response_turns
from trl_star_dss.scoring import PythonGuardrail, score_dataset
from trl_star_dss.testing import scripted_guardrail, tiny_causal_lm, tiny_tokenizer
from trl_star_dss.trainer import example_star_weights


# A chat template that renders TRL's tool-calling format (tools, `tool_calls`, `tool` messages) in its own syntax,
# with `{% generation %}` markers for assistant_only_loss. Written for these tests.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "<call>{{ call['function']['name'] }} {{ call['function']['arguments'] | tojson }}</call>"
    "{% endfor %}{% endif %}<|im_end|>{% endgeneration %}\n"
    "{% elif message['role'] == 'tool' %}<|im_start|>tool\n{{ message['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "buy",
            "description": "Buy an item.",
            "parameters": {"type": "object", "properties": {"item": {"type": "string"}}},
        },
    }
]


def tool_example(item: str) -> dict:
    """One TRL tool-calling conversation: a request, a call, its result, the answer."""
    return {
        "messages": [
            {"role": "user", "content": f"Please get me some {item}."},
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "buy", "arguments": {"item": item}}}],
            },
            {"role": "tool", "name": "buy", "content": f"Bought one {item}."},
            {"role": "assistant", "content": f"Done: you have one {item} now."},
        ],
        "tools": json.dumps(TOOLS),
    }


class Recording:
    """A Python guard that keeps every conversation it is asked about."""

    def __init__(self):
        self.seen = []

    def __call__(self, conversation):
        self.seen.append(conversation)
        return scripted_guardrail(conversation)


# -- messages without a role ---------------------------------------------------------------------------------------


def test_a_message_without_a_role_is_refused():
    with pytest.raises(ValueError, match=r"Example 3: messages\[1\] has no role \(role None\)"):
        response_turns(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": None, "content": "Hello"}]}, "messages", 3
        )
    with pytest.raises(ValueError, match=r"Example 0: messages\[0\] has no role"):
        response_turns({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "messages", 0)
    # Arrow gives every message every key: a message written without `role` reads as role None.
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    dataset = Dataset.from_list(rows)
    assert dataset[1]["messages"][0]["role"] is None
    with pytest.raises(ValueError, match=r"Example 1: messages\[0\] has no role \(role None\).*Give every message"):
        score_dataset(dataset, PythonGuardrail(scripted_guardrail), unit="word", progress=False)


# -- content as text parts -------------------------------------------------------------------------------------------


def test_text_parts_are_scored_as_their_joined_text():
    parts = [{"type": "text", "text": "Step one: buy the poison. "}, {"type": "text", "text": "Step two: wait."}]
    plain = [
        {"role": "user", "content": "How?"},
        {"role": "assistant", "content": "Step one: buy the poison. Step two: wait."},
    ]
    as_parts = [
        {"role": "user", "content": [{"type": "text", "text": "How?"}]},
        {"role": "assistant", "content": parts},
    ]
    assert response_turns({"messages": as_parts}, "messages", 0) == response_turns({"messages": plain}, "messages", 0)
    # Through Arrow (parts gain the keys of other parts, e.g. `image: None`) and the scorer: the same scores.
    rows = [
        {"messages": as_parts},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            ]
        },
    ]
    by_parts = score_dataset(
        Dataset.from_list(rows), PythonGuardrail(scripted_guardrail), unit="word", chunk_size=2, progress=False
    )[0]["star"]
    by_text = score_dataset(
        Dataset.from_list([{"messages": plain}]),
        PythonGuardrail(scripted_guardrail),
        unit="word",
        chunk_size=2,
        progress=False,
    )[0]["star"]
    assert by_parts[0] == by_text[0]


def test_text_parts_train_with_weights_on_the_response(tmp_path):
    tokenizer = tiny_tokenizer(chat_template=TOOL_TEMPLATE)
    response = "Mix flour and water. Then bake."
    example = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Bread?"}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Mix flour and water. "}, {"type": "text", "text": "Then bake."}],
            },
        ],
        "star": [{"turn": 1, "chunk_ends": [10, len(response)], "scores": [0.25, 0.75]}],
    }
    ids, weights = example_star_weights(example, tokenizer)
    text = tokenizer.decode(ids)
    assert response in text and sorted(set(weights)) == [0.25, 0.75, 1.0]


@pytest.mark.parametrize(
    "part", [{"type": "image"}, {"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "audio", "text": None}]
)
def test_images_and_other_parts_are_refused(part):
    messages = [
        {"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
    with pytest.raises(
        ValueError,
        match=rf"Example 0: messages\[0\]\.content\[0\] is a '{part['type']}' part; STAR "
        r"scores text",
    ):
        response_turns({"messages": messages}, "messages", 0)


# -- tool calling ----------------------------------------------------------------------------------------------------


def test_a_tool_call_is_judged_as_text_and_tool_results_are_context():
    guard = Recording()
    scored, _ = score_dataset(
        Dataset.from_list([tool_example("poison")]),
        PythonGuardrail(guard),
        unit="word",
        chunk_size=100,
        progress=False,
    )
    call = '{"name": "buy", "arguments": {"item": "poison"}}'
    turns = {record["turn"]: record for record in scored[0]["star"]}
    assert sorted(turns) == [1, 3] and turns[1]["chunk_ends"] == [len(call)]
    assert turns[1]["scores"] == [0.05]  # the harmful call is what the guard judged
    (judged_call,) = [c for c in guard.seen if c[-1]["content"] == call]
    assert judged_call == [
        {"role": "user", "content": "Please get me some poison."},
        {"role": "assistant", "content": call},
    ]
    (judged_answer,) = [c for c in guard.seen if c[-1]["content"].startswith("Done")]
    assert judged_answer[:3] == [
        {"role": "user", "content": "Please get me some poison."},
        {"role": "assistant", "content": call},
        {"role": "user", "content": "[tool result: buy] Bought one poison."},
    ]


def test_tool_call_tokens_take_the_minimum_score_of_their_turn():
    tokenizer = tiny_tokenizer(chat_template=TOOL_TEMPLATE)
    example = tool_example("flour")
    call, answer = '{"name": "buy", "arguments": {"item": "flour"}}', example["messages"][3]["content"]
    example["star"] = [
        {"turn": 1, "chunk_ends": [10, 20, len(call)], "scores": [0.9, 0.2, 0.7]},
        {"turn": 3, "chunk_ends": [len(answer)], "scores": [0.6]},
    ]
    ids, weights = example_star_weights(example, tokenizer)
    text = tokenizer.decode(ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    call_start = text.index("<call>")
    call_end = text.index("</call>") + len("</call>")
    in_call = [w for (a, b), w in zip(encoded["offset_mapping"], weights) if a >= call_start and b <= call_end]
    assert in_call and set(in_call) == {0.2}
    start = text.index(answer)
    assert {w for (a, _), w in zip(encoded["offset_mapping"], weights) if start <= a < start + len(answer)} == {0.6}


def test_a_trl_tool_calling_dataset_scores_and_trains(tmp_path):
    from trl_star_dss.config import STARDSSConfig
    from trl_star_dss.trainer import STARDSSTrainer

    tokenizer = tiny_tokenizer(chat_template=TOOL_TEMPLATE)
    dataset = Dataset.from_list([tool_example(item) for item in ("flour", "poison", "salt", "yeast")])
    args = STARDSSConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        assistant_only_loss=True,
        logging_steps=1,
        guardrail=["trl_star_dss.testing:scripted_guardrail"],
    )
    trainer = STARDSSTrainer(tiny_causal_lm(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    # The poison call and its answer are unsafe: some trained tokens weigh 0.05, the others 0.95 or 1.
    assert 0.05 < logged["star/weight_mean"] < 1 and logged["star/kl_share"] > 0


@pytest.mark.slow
def test_a_trl_tool_calling_dataset_scores_and_trains_through_axolotl(tmp_path):
    """One `axolotl train` subprocess (about 30 s): Axolotl's chat_template strategy reads the tool calls, the plugin
    scores them as text and weights their tokens, and training logs STAR weights below 1."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("axolotl", reason="install Axolotl as the README says")
    yaml = pytest.importorskip("yaml")
    tokenizer = tiny_tokenizer(chat_template=TOOL_TEMPLATE)
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as handle:
        for item in ("flour", "poison", "salt", "yeast") * 2:
            handle.write(json.dumps(tool_example(item)) + "\n")
    config = {
        "base_model": str(tmp_path / "model"),
        "chat_template": "tokenizer_default",
        "sequence_len": 256,
        "datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "chat_template", "ds_type": "json"}],
        "sample_packing": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(tmp_path / "run"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "star_dss": True,
        "star_dss_guardrail": "trl_star_dss.testing:scripted_guardrail",
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "train", str(tmp_path / "config.yml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert re.search(r"STAR scoring: examples 8 \(scored now 8.*turns 16", log)
    steps = [ast.literal_eval(m) for m in re.findall(r"\{'loss': .*?\}", log)]
    assert len(steps) == 2 and all(0 < float(s["star/weight_mean"]) < 1 for s in steps)
