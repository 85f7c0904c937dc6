"""`star_lookahead` (docs/method.md, "What is read as text: content parts and tool calls", this project's extension): a token's STAR weight is the minimum of its chunk's
score and the next L chunks' scores. Checked against a naive re-implementation on a hand-made record, through the
TRL trainer and through the Axolotl plugin's strategy (with `star_dss_lookahead` read from an Axolotl config)."""

import pytest

from trl_star_dss.config import STARDSSConfig
from trl_star_dss.testing import tiny_causal_lm, tiny_tokenizer
from trl_star_dss.trainer import STARDSSTrainer, example_star_weights


RESPONSE = "Sure. Step one: get the poison. Step two: hide the poison. There is no harmful content in this response."
# Hand-made chunk ends (characters into the response) and scores: safe, then late-flagged harm, then "fooled" at the end.
CHUNK_ENDS = [5, 15, 31, 41, 57, len(RESPONSE)]
SCORES = [0.9, 0.8, 0.6, 0.1, 0.3, 0.95]


def naive(token_ends, lookahead):
    """Written out longhand: find the token's chunk (the first that ends at or after the token's end, else the
    last), then the smallest score from it to L chunks on, stopping at the last chunk."""
    weights = []
    for end in token_ends:
        k = len(CHUNK_ENDS) - 1
        for i, chunk_end in enumerate(CHUNK_ENDS):
            if chunk_end >= end:
                k = i
                break
        smallest = SCORES[k]
        for j in range(k + 1, k + lookahead + 1):
            if j < len(SCORES) and SCORES[j] < smallest:
                smallest = SCORES[j]
        weights.append(smallest)
    return weights


def response_weights(ids, weights, tokenizer):
    """(weights of the response's tokens, their character ends in the response), and the end-of-turn token's weight."""
    response_ids = tokenizer(RESPONSE, add_special_tokens=False, return_offsets_mapping=True)
    n = len(response_ids["input_ids"])
    start = next(i for i in range(len(ids)) if ids[i : i + n] == response_ids["input_ids"])
    return weights[start : start + n], [b for _, b in response_ids["offset_mapping"]], weights[start + n]


EXAMPLE = {
    "messages": [{"role": "user", "content": "How do I make a poison?"}, {"role": "assistant", "content": RESPONSE}],
    "star": [{"turn": 1, "chunk_ends": CHUNK_ENDS, "scores": SCORES}],
}


@pytest.mark.parametrize("lookahead", [0, 1, 2, 10])
def test_trl_trainer_weights_equal_the_naive_look_ahead(tmp_path, lookahead):
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    args = STARDSSConfig(
        output_dir=str(tmp_path), star_lookahead=lookahead, assistant_only_loss=True, report_to="none", use_cpu=True
    )
    trainer = STARDSSTrainer(
        tiny_causal_lm(tokenizer, hidden_size=32, intermediate_size=64),
        args=args,
        train_dataset=Dataset.from_list([EXAMPLE]),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    weights, ends, end_of_turn = response_weights(row["input_ids"], row["star_weights"], tokenizer)
    assert weights == pytest.approx(naive(ends, lookahead))
    assert end_of_turn == pytest.approx(SCORES[-1])  # past the last chunk: the last score, nothing to look ahead to
    if lookahead == 0:  # the paper's STAR, as before the option existed
        assert row["star_weights"] == pytest.approx(example_star_weights(EXAMPLE, tokenizer)[1])
    else:  # the chunk before the flagged one now weighs by the flag
        assert min(weights[: sum(e <= CHUNK_ENDS[2] for e in ends)]) == pytest.approx(0.1)


def test_axolotl_strategy_reads_star_dss_lookahead_and_weighs_like_the_naive_look_ahead(tmp_path, llama3_tok):
    pytest.importorskip("axolotl")
    from axolotl.prompt_strategies.chat_template import load
    from axolotl.utils.dict import DictDefault

    from star_dss.data import STARStrategy, conversation_reader, with_star

    cfg = DictDefault(
        {
            "chat_template": "llama3",
            "sequence_len": 512,
            "train_on_inputs": False,
            "star_dss": True,
            "star_dss_lookahead": 2,
            "star_dss_guardrail": "trl_star_dss.testing:scripted_guardrail",
            "dataset_prepared_path": str(tmp_path / "prepared"),
        }
    )
    strategy = load(llama3_tok, cfg, DictDefault({"type": "chat_template", "field_messages": "messages"}))
    from datasets import Dataset

    wrapped, _ = with_star(strategy, Dataset.from_list([{"messages": EXAMPLE["messages"]}]), cfg)
    assert wrapped.lookahead == 2  # the config's key reaches the strategy
    # The hand-made record through the strategy that `with_star` built, and through a fresh one with L = 0.
    row = {"messages": EXAMPLE["messages"], "star": EXAMPLE["star"]}
    for strat, lookahead in ((wrapped, 2), (STARStrategy(strategy, conversation_reader(strategy)), 0)):
        out = strat.tokenize_prompt(row)
        weights, ends, _ = response_weights(out["input_ids"], out["star_weights"], llama3_tok)
        assert weights == pytest.approx(naive(ends, lookahead))


def test_lookahead_is_checked_by_name():
    with pytest.raises(ValueError, match=r"star_lookahead=-1 must be a whole number of chunks >= 0"):
        STARDSSConfig(output_dir="x", report_to="none", star_lookahead=-1)
    with pytest.raises(ValueError, match=r"star_lookahead=1.5 must be a whole number"):
        STARDSSConfig(output_dir="x", report_to="none", star_lookahead=1.5)
    pytest.importorskip("axolotl")
    from star_dss.args import StarDSSArgs

    with pytest.raises(ValueError, match=r"star_dss_lookahead=-2 must be a whole number of chunks >= 0"):
        StarDSSArgs.model_validate({"star_dss": True, "star_dss_guardrail": "g", "star_dss_lookahead": -2})
