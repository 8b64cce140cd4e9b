"""`sse-rl sft` and `sse-rl distill` read local data files as GRPO does: values as written, numbers as text, and
errors that name the file and line."""
import json

import pytest

from sse_rl.config import RecipeError, SFTDataConfig
from sse_rl.config.distill import DistillDataConfig, DistillRecipe
from sse_rl.tokenizer import build_tiny_tokenizer

ROWS = [{"problem": "1+1", "solution": "2"}, {"problem": "6*7", "solution": 42}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_rows_keep_string_completions_beside_a_number(tmp_path):
    from sse_rl.sft import build_examples

    data = SFTDataConfig(train=_write_jsonl(tmp_path / "d.jsonl", ROWS), chat_template=False)
    assert build_examples(data, tokenizer=None) == [{"prompt": "1+1", "completion": "2"},
                                                    {"prompt": "6*7", "completion": "42"}]


def test_sft_bad_file_names_file_and_line(tmp_path):
    from sse_rl.sft import build_examples

    (tmp_path / "d.jsonl").write_bytes(b'{"problem": "1+1", "solution": "2"}\n{"problem": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl line 2: not UTF-8"):
        build_examples(SFTDataConfig(train=str(tmp_path / "d.jsonl"), chat_template=False), tokenizer=None)


def test_sft_null_response_names_the_row(tmp_path):
    from sse_rl.sft import build_examples

    data = SFTDataConfig(train=_write_jsonl(tmp_path / "d.jsonl", [*ROWS, {"problem": "x", "solution": None}]),
                         chat_template=False)
    with pytest.raises(ValueError, match=r"row 2 of .*d\.jsonl has no column 'solution'"):
        build_examples(data, tokenizer=None)


def test_distill_bad_held_out_file_is_a_recipe_error_naming_file_and_line(tmp_path):
    from sse_rl.distill import build_datasets

    (tmp_path / "held_out.jsonl").write_text('{"problem": "1+1", "solution": "2"}\n{"problem": \n')
    data = DistillDataConfig(train=_write_jsonl(tmp_path / "d.jsonl", ROWS), eval=str(tmp_path / "held_out.jsonl"))
    build_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(RecipeError, match=r"held_out\.jsonl line 2: not valid JSON"):
        build_datasets(DistillRecipe(data=data), str(tmp_path / "tok"))
