"""utils/generation_utils.py: token budgets, one batch's answers (cut at their budget and first EOS),
the resumable part files, batching by prompt length, and the generation benchmark that times
generate_batch. The inference scripts built on it are tested in test_inference.py."""

import argparse
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.cli import UserInputError
from utils.data_utils import encode_prompt
from utils.generation_utils import (
    OUTPUT_FILE,
    PartWriter,
    add_generation_args,
    generate_batch,
    generation_config,
    merge_parts,
    read_finished,
    token_budgets,
    validate_generation_args,
)
from utils.model.model_utils import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def generation_args(*argv):
    """The inference scripts' generation arguments, parsed and checked as they do it."""
    parser = add_generation_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model_name_or_path", "unused", "--output_dir", "unused", *argv])
    validate_generation_args(args)
    return args


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama, None, padding_side="left")


# ---- token budgets ----------------------------------------------------------------------------


def test_budgets_are_max_length_minus_the_prompt_or_max_new_tokens_never_beyond_the_context(model):
    context = model.config.max_position_embeddings
    assert context == 256
    prompts = [[0] * 5, [0] * 30, [0] * 200]
    assert token_budgets(prompts, generation_args("--max_length", "240"), model) == [235, 210, 40]
    # the default --max_length 512 is beyond the tiny model's context: the context bounds it
    assert token_budgets(prompts, generation_args(), model) == [251, 226, 56]
    assert token_budgets(prompts, generation_args("--max_new_tokens", "100"), model) == [100, 100, 56]


@pytest.mark.parametrize(
    "argv, prompt_length, message",
    [
        (["--max_length", "30"], 30, "prompt 1 has 30 tokens: --max_length 30 leaves no room to generate"),
        (["--max_new_tokens", "4"], 256, "prompt 1 has 256 tokens: the model's context leaves no room to generate"),
    ],
)
def test_a_prompt_that_leaves_no_room_is_refused_naming_it(model, argv, prompt_length, message):
    with pytest.raises(UserInputError) as err:
        token_budgets([[0] * 3, [0] * prompt_length], generation_args(*argv), model)
    assert str(err.value) == message


# ---- one batch --------------------------------------------------------------------------------


def greedy_tokens(model, prompt_ids, n):
    """n greedy tokens after one unpadded prompt, the whole sequence recomputed at each step: the
    reference the batched, left-padded, cached generate() is compared with."""
    sequence = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt_ids) :]


def expected_answer(tokenizer, tokens, budget, eos):
    """The answer generate_batch must give: the tokens up to the budget, cut before the first EOS,
    decoded without special tokens and without the space that joins it to the prompt."""
    kept = tokens[:budget]
    kept = kept[: kept.index(eos)] if eos in kept else kept
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return len(kept), text[1:] if text.startswith(" ") else text


def test_each_answer_stops_at_its_own_budget_and_before_its_first_eos(model, tokenizer):
    texts = ["Explain:", "The os module provides a portable way", "Describe a list of numbers."]
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    budgets = [3, 12, 10]
    reference = [greedy_tokens(model, ids, max(budgets)) for ids in prompts]
    config = generation_config(generation_args("--greedy"), model, tokenizer)
    assert config.do_sample is False and config.eos_token_id == tokenizer.eos_token_id

    # the model's own EOS, wherever greedy decoding meets it
    answers = generate_batch(model, tokenizer, prompts, budgets, config)
    assert answers == [expected_answer(tokenizer, r, b, config.eos_token_id)[1] for r, b in zip(reference, budgets)]

    # an EOS the second prompt's answer meets at its k-th token (its first occurrence), k < budget
    second = reference[1]
    k = next(i for i in range(2, len(second)) if second[i] not in second[:i])
    eos_config = copy.copy(config)
    eos_config.eos_token_id = second[k]
    expected = [expected_answer(tokenizer, r, b, second[k]) for r, b in zip(reference, budgets)]
    assert expected[0][0] == 3 and expected[1][0] == k < budgets[1]  # one budget cut, one EOS cut
    assert generate_batch(model, tokenizer, prompts, budgets, eos_config) == [text for _, text in expected]


# ---- resumable output -------------------------------------------------------------------------


def record(i):
    return {"instruction": f"prompt {i}", "answer": f"answer {i}"}


def test_only_whole_batches_count_and_the_merge_restores_prompt_order(tmp_path):
    """Batches of 2 over 5 prompts in length order [3, 1, 4, 0, 2]: batch 0 = prompts 3, 1; batch 1
    = prompts 4, 0; batch 2 = prompt 2."""
    first = PartWriter(str(tmp_path), 0)
    first.append(0, [3, 1], [record(3), record(1)])
    # killed while writing batch 1: one whole line, then a torn one
    half = {"index": 4, "batch": 1, "batch_size": 2, "attempt": first.attempt, **record(4)}
    first.file.write((json.dumps(half) + '\n{"index": 0, "batch": 1, "batch_si').encode())
    first.close()
    other = PartWriter(str(tmp_path), 1)
    other.append(2, [2], [record(2)])
    other.close()

    finished = read_finished(str(tmp_path))
    assert sorted(finished) == [0, 2]  # batch 1 has one of its two lines: not finished
    assert finished[0] == [(3, record(3)), (1, record(1))] and finished[2] == [(2, record(2))]
    with pytest.raises(RuntimeError, match=r"batches \[1\] have no complete output"):
        merge_parts(str(tmp_path), 5, 3)

    resumed = PartWriter(str(tmp_path), 0)  # a new attempt appends after the torn line
    assert resumed.attempt != first.attempt
    resumed.append(1, [4, 0], [record(4), record(0)])
    resumed.close()
    assert sorted(read_finished(str(tmp_path))) == [0, 1, 2]
    path = merge_parts(str(tmp_path), 5, 3)
    assert path == str(tmp_path / OUTPUT_FILE)
    lines = (tmp_path / OUTPUT_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record(i) for i in range(5)]  # each prompt once, in order
    assert sorted(p.name for p in tmp_path.iterdir()) == [OUTPUT_FILE]  # the part files are removed


# ---- generation speed -------------------------------------------------------------------------


def test_generation_batches_prompts_of_similar_length_and_keeps_the_prompt_order(tiny_llama, tmp_path, monkeypatch):
    import inference_generation_instruction
    from utils import generation_utils

    lines = ["A long prompt about lists, tuples, sets and dictionaries #### 1", "Hi #### 1",
             "Another long prompt about the os and shutil modules #### 1", "Yo #### 1"]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    widths, real = [], generation_utils.generate_batch

    def recording(model, tokenizer, prompt_ids, *rest):
        widths.append([len(ids) for ids in prompt_ids])
        return real(model, tokenizer, prompt_ids, *rest)

    monkeypatch.setattr(generation_utils, "generate_batch", recording)
    out = inference_generation_instruction.main(
        ["--model_name_or_path", tiny_llama, "--instruction_file", str(tmp_path / "prompts.txt"),
         "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "4", "--batch_size", "2"]
    )  # fmt: skip
    assert [max(w) - min(w) for w in widths] == [max(w) - min(w) for w in sorted(widths)]
    assert max(widths[0]) < min(widths[1])  # the two short prompts share a batch, the two long ones the other
    records = [json.loads(line) for line in open(out)]
    assert [r["instruction"] for r in records] == [line.split(" ####")[0] for line in lines]


def test_generation_benchmark_reports_tokens_per_second(tiny_llama, tmp_path):
    from scripts import benchmark_generation

    result = benchmark_generation.main(
        ["--model_name_or_path", tiny_llama, "--batch_sizes", "1,2", "--threads", "1", "--max_new_tokens", "4",
         "--repeats", "1", "--json", str(tmp_path / "gen.json")]
    )  # fmt: skip
    assert [(r["threads"], r["batch_size"]) for r in result["rows"]] == [(1, 1), (1, 2)]
    for row in result["rows"]:
        assert row["tokens_per_second"] == pytest.approx(row["batch_size"] * 4 / row["seconds_per_batch"], rel=0.05)
    assert json.loads((tmp_path / "gen.json").read_text())["rows"] == result["rows"]
