"""Datasets from local files, prompt templates, row errors, and the epoch-exact resumable sampler."""
from __future__ import annotations

import json

import pytest

from sse_rl.data import EpochSampler, check_not_benchmark, encode_prompts, load_prompts

ROWS = [{"problem": "1+1", "answer": "2", "level": 1}, {"problem": "2+3", "answer": "5", "level": 2}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    kw = {"split": "train", "subset": "", "template": "Q: {problem} (level {level})", "answer_column": "answer"}
    a, b = load_prompts(jsonl, **kw), load_prompts(str(parquet), **kw)
    assert [p.text for p in a] == [p.text for p in b] == ["Q: 1+1 (level 1)", "Q: 2+3 (level 2)"]
    assert a[1].columns == {**ROWS[1], "answer": "5"} and a[1].index == 1


def test_answer_column_is_exposed_as_answer(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "x", "solution": "42"}])
    (p,) = load_prompts(path, split="train", subset="", template="{question}", answer_column="solution")
    assert p.columns["answer"] == "42" and p.columns["solution"] == "42"


def test_missing_field_names_row_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"problem": "3+4", "answer": None, "level": 1}])
    with pytest.raises(ValueError, match=r"row 1: missing field 'answer'"):
        load_prompts(path, split="train", subset="", template="{problem}", answer_column="answer")
    with pytest.raises(ValueError, match=r"row 0: missing field 'question'"):
        load_prompts(path, split="train", subset="", template="{question}", answer_column="answer")
    kept = load_prompts(path, split="train", subset="", template="{problem}", answer_column="answer",
                        drop_incomplete=True)
    assert [p.index for p in kept] == [0]
    with pytest.raises(ValueError, match="uses no column"):
        load_prompts(path, split="train", subset="", template="plain", answer_column="answer")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"), split="train", subset="", template="{p}", answer_column="a")


def test_benchmarks_are_refused_for_training():
    for name in ("../shared/data/aime24.jsonl", "HuggingFaceH4/MATH-500", "data/math500.jsonl"):
        with pytest.raises(ValueError, match="evaluation benchmark"):
            check_not_benchmark(name)
    check_not_benchmark("../shared/data/math_train.jsonl")
    check_not_benchmark("agentica-org/DeepScaleR-Preview-Dataset")


def test_sampler_each_index_once_per_epoch_and_new_order_each_epoch():
    sampler = EpochSampler(10, seed=3)
    drawn = sampler.take(7) + sampler.take(7) + sampler.take(6)
    first, second = drawn[:10], drawn[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 10


def test_sampler_resume_continues_exactly():
    reference = EpochSampler(13, seed=1)
    expected = [reference.take(5) for _ in range(6)]
    resumed = EpochSampler(13, seed=1)
    got = [resumed.take(5) for _ in range(3)]
    state = resumed.state_dict()
    fresh = EpochSampler(13, seed=1)
    fresh.load_state_dict(state)
    got += [fresh.take(5) for _ in range(3)]
    assert got == expected
    with pytest.raises(ValueError, match="same data and seed"):
        EpochSampler(12, seed=1).load_state_dict(state)


def test_encode_prompts_drops_prompts_too_long_for_the_engine(tmp_path):
    from sse_rl.tasks.max_digit import build_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "max(1,2,3)=", "answer": "3"},
                                               {"problem": "max(1,2,3,4,5,6)=", "answer": "6"}])
    prompts = load_prompts(path, split="train", subset="", template="{problem}", answer_column="answer")
    kept = encode_prompts(prompts, tok, max_tokens=12, source=path)
    assert [p.index for p in kept] == [0] and kept[0].ids == tok("max(1,2,3)=")["input_ids"] and len(kept[0].ids) == 11
    with pytest.raises(ValueError, match="every prompt is longer than 5 tokens"):
        encode_prompts(prompts, tok, max_tokens=5, source=path)


def test_one_integer_answer_leaves_string_answers_strings(tmp_path):
    rows = [{"problem": "a", "answer": "7"}, {"problem": "b", "answer": 42}, {"problem": "c", "answer": "x/2"}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    prompts = load_prompts(path, split="train", subset="", template="{problem}", answer_column="answer")
    assert [p.columns["answer"] for p in prompts] == ["7", "42", "x/2"]


BAD_FILES = [  # (name, bytes, the error it must raise)
    ("empty.jsonl", b"", r"empty\.jsonl is empty"),
    ("blank.jsonl", b"\n  \n", r"blank\.jsonl is empty"),
    ("broken.jsonl", b'{"problem": "a", "answer": "1"}\n\n{"problem": \n', r"broken\.jsonl line 3: not valid JSON"),
    ("latin1.jsonl", b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n',
     r"latin1\.jsonl line 2: not UTF-8 \(byte 0xe9\)"),
    ("list.jsonl", b'{"problem": "a"}\n[1, 2]\n', r"list\.jsonl line 2: expected a JSON object, got list"),
    ("array.json", b'[{"problem": "a", "answer": "1"},\n {"problem": ]', r"array\.json line 2: not valid JSON"),
    ("garbage.parquet", b"not parquet", r"garbage\.parquet: not a readable parquet file"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_data_file_names_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(tmp_path / name), split="train", subset="", template="{problem}", answer_column="answer")


def test_json_array_bom_and_jsonl_read_alike(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    kw = {"split": "train", "subset": "", "template": "{problem}", "answer_column": "answer"}
    a, b = load_prompts(str(tmp_path / "a.json"), **kw), load_prompts(str(tmp_path / "b.jsonl"), **kw)
    assert [p.columns for p in a] == [p.columns for p in b] == [dict(r) for r in ROWS]


def test_line_separators_inside_strings_are_text_not_line_ends(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"problem": "a\u2028b", "answer": "1"}\r\n{"problem": "c", "answer": "2"}\r\n')
    prompts = load_prompts(str(tmp_path / "d.jsonl"), split="train", subset="", template="{problem}",
                           answer_column="answer")
    assert [p.text for p in prompts] == ["a\u2028b", "c"]
