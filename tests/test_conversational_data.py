"""Conversational and nested data (#25): TRL's conversational jsonl, verl-style parquet (a `prompt` of message
structs, `reward_model.ground_truth`, `data_source`, `extra_info`) and a `datasets` folder, for `sse-rl train`
(prompt ids are the chat template's, the reward sees the answer as text), `sse-rl sft` and `distill` (TRL's
conversational examples, loss on the completion's tokens only), and `sse-rl eval` (--problem-column/--answer-column).
A template field that is not text fails naming the row and the field, at recipe validation."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sse_rl.config import DistillRecipe, EvalRecipe, Recipe, RecipeError, SFTRecipe, load_recipe, validate
from sse_rl.config.distill import DistillDataConfig
from sse_rl.data import encode_prompts, load_prompts
from sse_rl.tokenizer import build_tiny_tokenizer

SYSTEM = "You are a careful solver."
# (question, gold): verl's ground truths are text in one row and a number in another
PROBLEMS = [("What is 2 + 3?", "5"), ("What is 6 * 7?", 42), ("Compute 9 - 4.", "5")]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The same problems as TRL conversational jsonl, verl-style parquet and a `datasets` parquet folder."""
    root = tmp_path_factory.mktemp("data")
    trl_rows = [{"prompt": user(q), "completion": [{"role": "assistant", "content": f"\\boxed{{{a}}}"}],
                 "solution": a} for q, a in PROBLEMS]
    (root / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({
        "data_source": ["gsm8k"] * len(PROBLEMS),
        "prompt": pa.array([user(q) for q, _ in PROBLEMS], type=pa.list_(message)),
        "ability": ["math"] * len(PROBLEMS),
        "reward_model": pa.array([{"style": "rule", "ground_truth": str(a)} for _, a in PROBLEMS],
                                 type=pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        "extra_info": pa.array([{"index": i, "answer": f"\\boxed{{{a}}}"} for i, (_, a) in enumerate(PROBLEMS)],
                               type=pa.struct([("index", pa.int64()), ("answer", pa.string())])),
    })
    pq.write_table(table, root / "verl.parquet")
    (root / "hub").mkdir()
    datasets.Dataset.from_list(table.to_pylist()).to_parquet(str(root / "hub" / "train.parquet"))
    return {"trl": str(root / "trl.jsonl"), "verl": str(root / "verl.parquet"), "hub": str(root / "hub")}


# ---------------------------------------------------------------------------------------------------------------
# GRPO


@pytest.mark.parametrize("kind, answer_column", [("trl", "solution"), ("verl", "reward_model.ground_truth"),
                                                 ("hub", "reward_model.ground_truth")])
def test_grpo_prompt_ids_are_the_chat_templates_and_the_reward_sees_the_answer(files, tokenizer, kind,
                                                                              answer_column):
    from sse_rl.rewards.math_reward import math_accuracy

    prompts = load_prompts(files[kind], split="train", subset="", template="{prompt}", answer_column=answer_column,
                           tokenizer=tokenizer, system_prompt=SYSTEM)
    prompts = encode_prompts(prompts, tokenizer, 1000, files[kind])
    for prompt, (question, gold) in zip(prompts, PROBLEMS, strict=True):
        messages = [{"role": "system", "content": SYSTEM}, *user(question)]
        assert prompt.messages == messages
        assert prompt.ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert prompt.columns["answer"] == str(gold)  # text, whatever the file's type
        graded = math_accuracy(prompts=[prompt.text] * 2, completions=[f"\\boxed{{{gold}}}", "\\boxed{1}"],
                               answer=[prompt.columns["answer"]] * 2)
        assert graded == [1.0, 0.0]
    if kind != "trl":  # top-level columns reach the rewards as the file holds them, nested ones as objects
        assert prompts[1].columns["reward_model"] == {"style": "rule", "ground_truth": "42"}
        assert prompts[1].columns["data_source"] == "gsm8k" and prompts[1].columns["extra_info"]["index"] == 1


def test_grpo_text_prompt_takes_the_system_prompt_and_nested_fields(files, tokenizer):
    (prompt, *_) = load_prompts(files["verl"], split="train", subset="", template="Q{extra_info.index}: {ability}",
                                answer_column="reward_model.ground_truth", tokenizer=tokenizer, chat_template=True,
                                system_prompt=SYSTEM)
    assert prompt.text == tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, *user("Q0: math")], tokenize=False, add_generation_prompt=True)


def grpo_recipe(tmp_path: Path, data: str, *overrides: str) -> tuple[Recipe, list[str]]:
    from sse_rl.config import parse_recipe

    return parse_recipe(None, [f"out_dir={tmp_path / 'run'}", "model.init.preset=sse-h-tiny",
                               "reward.functions=[{spec: math_accuracy}]", f"data.train={data}", *overrides])


@pytest.mark.parametrize("row, template, says", [
    ({"problem": {"text": "1+1"}, "answer": "2"}, "{problem}", "row 1: field 'problem' must be a string, got dict"),
    ({"problem": ["1", "+1"], "answer": "2"}, "{problem}", "row 1: field 'problem' must be a string, got list"),
    ({"prompt": user("1+1"), "answer": "2"}, "Solve: {prompt}", "row 1: field 'prompt' holds chat messages"),
    ({"problem": "1+1"}, "{problem}", "row 1: missing field 'answer'"),
])
def test_a_template_field_that_is_not_text_fails_validation_naming_row_and_field(tmp_path, row, template, says):
    good = {"problem": "2+2", "prompt": "2+2", "answer": "4"}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecipeError, match=f"data.train: dataset {data} {says}".replace("+", r"\+")):
        validate(*grpo_recipe(tmp_path, str(data), f"data.prompt_template={template!r}"))
    assert not (tmp_path / "run").exists()


def test_messages_with_their_own_system_turn_and_a_system_prompt_fail(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "system", "content": "s"}, *user("1+1")], "answer": "2"}) + "\n")
    with pytest.raises(RecipeError, match="row 0: the prompt's messages have a system turn of their own"):
        validate(*grpo_recipe(tmp_path, str(data), "data.prompt_template='{prompt}'", "data.system_prompt=Be brief."))


def test_text_prompt_with_a_system_prompt_needs_the_chat_template(tmp_path, files):
    with pytest.raises(RecipeError, match="row 0: a system prompt is set but the prompt is plain text"):
        validate(*grpo_recipe(tmp_path, files["verl"], "data.prompt_template='{ability}'",
                              "data.answer_column=reward_model.ground_truth", "data.system_prompt=Be brief."))


# ---------------------------------------------------------------------------------------------------------------
# SFT and distill: TRL's conversational examples, loss on the completion


def spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return list(zip(starts, starts[1:]))


def assert_trains_on_completions(trainer, tokenizer, system: str = "") -> None:
    """Every packed sequence is a problem's chat prompt (as the chat template renders it) then its completion, and
    the labels are exactly the completion's tokens."""
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    expected = {}
    for question, gold in PROBLEMS:
        head = [{"role": "system", "content": system}] if system else []
        prompt = tokenizer.apply_chat_template([*head, *user(question)], add_generation_prompt=True)["input_ids"]
        expected[tuple(prompt)] = tokenizer(f"\\boxed{{{gold}}}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    seen = set()
    for s, e in spans(batch["position_ids"]):
        prompt = next(p for p in expected if ids[s:s + len(p)].tolist() == list(p))
        completion = expected[prompt]
        assert ids[s + len(prompt):e].tolist() == completion
        assert (labels[s:s + len(prompt)] == -100).all()
        assert labels[s + len(prompt):e].tolist() == completion
        seen.add(prompt)
    assert len(seen) == len(PROBLEMS)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer) -> str:
    from sse_rl.init_model import init_model

    path = tmp_path_factory.mktemp("policy")
    tokenizer.save_pretrained(path)
    init_model("sse-h-tiny", path, tokenizer=str(path), seed=0)
    return str(path)


@pytest.mark.parametrize("kind, overrides", [
    ("trl", ["data.prompt_template='{prompt}'", "data.response_column=completion"]),
    ("verl", ["data.prompt_template='{prompt}'", "data.response_column=extra_info.answer"]),
])
def test_sft_trains_on_the_conversational_completion(files, tokenizer, policy_dir, tmp_path, kind, overrides):
    from sse_rl.sft import build_trainer

    recipe = validate(*load_recipe_raw(tmp_path, files[kind], overrides, SFTRecipe))
    trainer = build_trainer(recipe, policy_dir, tmp_path / "out")
    assert_trains_on_completions(trainer, tokenizer, SYSTEM)


def load_recipe_raw(tmp_path: Path, data: str, overrides: list[str], cls: type) -> tuple:
    from sse_rl.config import parse_recipe

    return parse_recipe(None, [f"out_dir={tmp_path / 'run'}", f"data.train={data}", f"model.path={tmp_path}",
                               f"data.system_prompt={SYSTEM}", "train.token_budget=512", "train.batch_tokens=512",
                               *overrides], cls)


def test_sft_messages_column_is_a_whole_conversation(files, tokenizer, policy_dir, tmp_path):
    """data.text_column holding messages: TRL's conversational language modeling, loss on every token."""
    from sse_rl.sft import build_trainer

    rows = [json.loads(line) for line in Path(files["trl"]).read_text().splitlines()]
    data = tmp_path / "messages.jsonl"
    data.write_text("".join(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    recipe = load_recipe(None, [f"out_dir={tmp_path / 'run'}", f"data.train={data}", "model.path=unused",
                                "data.text_column=messages", "train.token_budget=512", "train.batch_tokens=512"],
                         SFTRecipe)
    batch = next(iter(build_trainer(recipe, policy_dir, tmp_path / "out").get_train_dataloader()))
    texts = {tokenizer.decode(batch["input_ids"][0][s:e]) for s, e in spans(batch["position_ids"])}
    assert texts == {tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows}
    starts = batch["position_ids"][0] == 0
    assert (batch["labels"][0][~starts] == batch["input_ids"][0][~starts]).all()


def test_sft_rows_of_two_kinds_fail_naming_the_row(tmp_path):
    data = tmp_path / "mixed.jsonl"
    rows = [{"prompt": user("1+1"), "completion": "2"}, {"prompt": "2+2", "completion": "4"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecipeError, match="data.train: row 1 of .*mixed.jsonl is a text prompt/completion example "
                                          "but row 0 is a conversational prompt/completion one"):
        validate(*load_recipe_raw(tmp_path, str(data), ["data.prompt_template='{prompt}'",
                                                        "data.response_column=completion", "data.system_prompt=",
                                                        "data.chat_template=false"], SFTRecipe))
    messages = tmp_path / "messages.jsonl"
    rows = [{"messages": user("1+1")}, {"messages": "1+1=2"}]
    messages.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecipeError, match="row 1 of .*messages.jsonl is a text text example but row 0 is a "
                                          "conversational messages one"):
        validate(*load_recipe_raw(tmp_path, str(messages), ["data.text_column=messages", "data.system_prompt="],
                                  SFTRecipe))


def test_distill_trains_on_the_conversational_completion(files, tokenizer, policy_dir, tmp_path):
    """`sse-rl distill`'s data: verl parquet (and the same rows as a `datasets` folder, held out) through
    build_datasets into the logits stage's trainer."""
    from sse_rl.distill import DistillTrainer, build_datasets, stage_config
    from sse_rl.init_model import init_model
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    tokenizer.save_pretrained(teacher)
    init_model("qwen3-tiny", teacher, tokenizer=str(teacher), seed=0)
    data = DistillDataConfig(train=files["verl"], eval=files["hub"], eval_split="train", prompt_template="{prompt}",
                             response_column="extra_info.answer", system_prompt=SYSTEM)
    recipe = DistillRecipe(out_dir=str(tmp_path / "run"), data=data)
    recipe.train.token_budget = recipe.train.batch_tokens = 512
    train, held_out = build_datasets(recipe, policy_dir)
    assert held_out == train  # the held-out rows through `datasets` (a hub id's path) give the same examples
    trainer = DistillTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir), args=stage_config(recipe, "logits", tmp_path, True,
                                                                                 False),
        train_dataset=datasets.Dataset.from_list(train), processing_class=tokenizer,
        teacher=AutoModelForCausalLM.from_pretrained(teacher), stage="logits", options=recipe.logits)
    assert_trains_on_completions(trainer, tokenizer, SYSTEM)


# ---------------------------------------------------------------------------------------------------------------
# eval


def test_eval_reads_verl_parquet_by_dotted_columns(files, tokenizer):
    from sse_rl.eval import Problem, load_problems_file
    from sse_rl.eval.runner import build_prompt

    problems = load_problems_file(files["verl"], "prompt", "reward_model.ground_truth")
    assert problems[1] == Problem("2", user("What is 6 * 7?"), "42")
    text, ids = build_prompt(problems[1].problem, tokenizer, "ignored for messages", system_prompt=SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, *user("What is 6 * 7?")]
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    with pytest.raises(ValueError, match=r"verl.parquet row 1: field 'reward_model.answer' is missing"):
        load_problems_file(files["verl"], "prompt", "reward_model.answer")


def test_eval_command_takes_the_column_flags(files, tokenizer, tmp_path, monkeypatch):
    """`sse-rl eval --data-file verl.parquet --problem-column prompt --answer-column reward_model.ground_truth`: the
    recipe validates, and the run's prompts are the chat template's (the engine replaced by an echo of the gold)."""
    from sse_rl.eval.cli import build_parser, recipe_fields
    from sse_rl.eval.engines import Generation
    from sse_rl.eval.runner import run_eval

    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--data-file", files["verl"], "--problem-column", "prompt",
            "--answer-column", "reward_model.ground_truth", "--samples", "1", "--out", str(tmp_path / "out"),
            "--no-progress"]
    from sse_rl.config import build_recipe

    recipe = validate(*build_recipe(EvalRecipe, recipe_fields(build_parser().parse_args(argv))))
    golds = {tuple(tokenizer.apply_chat_template(user(q), add_generation_prompt=True)["input_ids"]): str(a)
             for q, a in PROBLEMS}

    def echo(requests, sampling):
        for i, request in enumerate(requests):
            yield i, Generation(f"\\boxed{{{golds[tuple(request.prompt_token_ids)]}}}", 3, "stop")

    results = run_eval(recipe, generate=echo)
    assert results["benchmarks"]["verl"]["metrics"]["avg"] == 1.0
    with pytest.raises(RecipeError, match="data_files: .*verl.parquet row 1: field 'problem' is missing"):
        validate(*build_recipe(EvalRecipe, recipe_fields(build_parser().parse_args(argv[:4]))))
