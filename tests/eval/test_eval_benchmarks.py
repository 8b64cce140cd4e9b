"""Problem loading: shared AIME files, local jsonl/parquet, hub-style dataset folders, schema errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sse_rl.eval import BENCHMARKS, Problem, load_benchmark, load_problems_file, normalize_answer
from sse_rl.eval.benchmarks import HubSource, load_hub_source


def test_shared_aime_files_load(shared_data):
    for year in ("24", "25"):
        problems = load_benchmark(f"aime{year}", shared_data / f"aime{year}.jsonl")
        assert len(problems) == 30
        assert problems[0].id == f"20{year}-I-1" and problems[-1].id == f"20{year}-II-15"
        assert all(p.answer.isdigit() and 0 <= int(p.answer) <= 999 for p in problems)
    assert load_benchmark("aime24", shared_data / "aime24.jsonl")[0].answer == "204"


@pytest.mark.parametrize("raw, expected", [
    ("025", "25"), (33, "33"), (" 204 ", "204"), ("336^\\circ", "336"), ("336^{\\circ}", "336"), ("$70$", "70"),
    ("0", "0"), ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
], ids=str)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_and_parquet(tmp_path):
    rows = [{"id": "p1", "problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": 4}]
    jsonl = load_problems_file(_write_jsonl(tmp_path / "set.jsonl", rows))
    assert jsonl == [Problem("p1", "1+1?", "2"), Problem("2", "2+2?", "4")]  # missing id -> row number
    pq.write_table(pa.Table.from_pylist([{"id": "p1", "problem": "1+1?", "answer": "002"}]), tmp_path / "set.parquet")
    assert load_problems_file(tmp_path / "set.parquet") == [Problem("p1", "1+1?", "2")]


def test_schema_errors_name_file_row_and_field(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x", "answer": "1"}, {"question": "y", "answer": "2"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl row 2: field 'problem' is missing.*\['answer', 'question'\]"):
        load_problems_file(bad)
    empty_answer = _write_jsonl(tmp_path / "empty.jsonl", [{"problem": "x", "answer": " "}])
    with pytest.raises(ValueError, match=r"empty\.jsonl row 1: field 'answer' is missing or empty"):
        load_problems_file(empty_answer)
    (tmp_path / "broken.jsonl").write_text('{"problem": "x", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_problems_file(tmp_path / "broken.jsonl")
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "problem": "x", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match=r"dup\.jsonl row 2: duplicate id 'a'"):
        load_problems_file(dup)
    with pytest.raises(ValueError, match=r"expected a \.jsonl, \.json, \.parquet file"):
        load_problems_file(_write_jsonl(tmp_path / "x.txt", [{}]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems_file(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark 'aime99'.*aime24"):
        load_benchmark("aime99")


def test_hub_source_loading_with_configs(tmp_path):
    """The hub loader on a dataset folder laid out like opencompass/AIME2025 (two configs, split `test`)."""
    for part, answers in (("I", ["70", "588"]), ("II", ["336^\\circ", "62"])):
        folder = tmp_path / f"AIME2025-{part}"
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist([{"question": f"{part} q{i}", "answer": a} for i, a in enumerate(answers)]),
                       folder / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: AIME2025-I\n  data_files:\n  - split: test\n    path: AIME2025-I/*.parquet\n"
        "- config_name: AIME2025-II\n  data_files:\n  - split: test\n    path: AIME2025-II/*.parquet\n---\n")
    hub = BENCHMARKS["aime25"]
    local = [HubSource(str(tmp_path), s.split, s.problem_field, s.answer_field, s.id_field, s.config, s.id_prefix)
             for s in hub]
    problems = [p for source in local for p in load_hub_source(source)]
    assert [p.id for p in problems] == ["2025-I-1", "2025-I-2", "2025-II-1", "2025-II-2"]
    assert [p.answer for p in problems] == ["70", "588", "336", "62"]
    assert problems[2].problem == "II q0"
    wrong_field = HubSource(str(tmp_path), "test", "problem", "answer", config="AIME2025-I")
    with pytest.raises(ValueError, match=r"\(AIME2025-I\) split 'test' row 1: field 'problem' is missing"):
        load_hub_source(wrong_field)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty\.jsonl is empty"),
    ("latin1.jsonl", b'{"problem": "x", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n',
     r"latin1\.jsonl line 2: not UTF-8"),
    ("list.jsonl", b'{"problem": "x", "answer": "1"}\n[1]\n', r"list\.jsonl line 2: expected a JSON object"),
    ("garbage.parquet", b"PAR1", r"garbage\.parquet: not a readable parquet file"),
], ids=["empty", "not-utf8", "not-an-object", "not-parquet"])
def test_unreadable_files_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_problems_file(tmp_path / name)


def test_json_array_file_loads_like_jsonl(tmp_path):
    (tmp_path / "set.json").write_text(json.dumps([{"problem": "1+1?", "answer": 2}]))
    assert load_problems_file(tmp_path / "set.json") == [Problem("1", "1+1?", "2")]
