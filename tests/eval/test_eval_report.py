"""Reports and comparisons from metrics, and the `sse-rl eval` argument handling (no engine)."""
import json

import pytest
from sse_rl.eval import ProblemSamples, compare, compute_metrics
from sse_rl.config import EvalRecipe, RecipeError, build_recipe, validate
from sse_rl.eval.cli import build_parser, main, recipe_fields
from sse_rl.eval.report import load_results, metrics_from_dict, write_report

CONFIG = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 64, "samples": 2}


def _run(tmp_path, name, flags):
    """A run folder whose one benchmark has problems with the given per-sample correctness."""
    problems = [ProblemSamples(f"q{i}", "1", f, ["1" if ok else "2" for ok in f], [7] * len(f), [False] * len(f))
                for i, f in enumerate(flags)]
    metrics = compute_metrics(problems)
    write_report(tmp_path / name, f"models/{name}", CONFIG, {"aime24": (metrics, problems)})
    return tmp_path / name, metrics


def test_results_round_trip_and_files(tmp_path):
    run, metrics = _run(tmp_path, "a", [[True, False], [False, False]])
    results = load_results(run)
    assert metrics_from_dict(results["benchmarks"]["aime24"]["metrics"]) == metrics
    assert [r["correct"] for r in results["benchmarks"]["aime24"]["problems"]] == [1, 0]
    summary = (run / "summary.md").read_text()
    assert "| aime24 | 2 | 25.0 |" in summary and "pass@2" in summary
    assert (run / "aime24.png").stat().st_size > 10_000


def test_compare_table_and_plot(tmp_path):
    a, _ = _run(tmp_path, "base", [[True, False], [False, False]])
    b, _ = _run(tmp_path, "grpo", [[True, True], [True, False]])
    table = compare([a, b], tmp_path / "cmp")
    rows = [line for line in table.splitlines() if line.startswith(("| base", "| grpo"))]
    # run, model, n, avg@n, SE problems, SE samples, pass@1, pass@2, maj@n, ...
    assert [r.split(" | ")[3] for r in rows] == ["25.0", "75.0"]
    assert [r.split(" | ")[7] for r in rows] == ["50.0", "100.0"]
    assert (tmp_path / "cmp" / "compare.md").read_text() == table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least two"):
        compare([a])
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        compare([a, tmp_path / "nothing"])


def test_cli_compare_prints_table(tmp_path, capsys):
    a, _ = _run(tmp_path, "base", [[True, False]])
    b, _ = _run(tmp_path, "grpo", [[True, True]])
    assert main(["--compare", str(a), str(b)]) == 0
    assert "| grpo | `models/grpo` | 2 | 100.0 |" in capsys.readouterr().out


def _recipe(argv):
    recipe, errors = build_recipe(EvalRecipe, recipe_fields(build_parser().parse_args(argv)))
    assert not errors
    return recipe


def test_cli_arguments_to_recipe():
    recipe = _recipe(["--model", "ckpt", "--data-file", "x/aime24.jsonl", "y/hard.parquet", "--samples", "8",
                      "--max-tokens", "128", "--top-p", "1.0"])
    assert recipe.sources() == [("aime24", "x/aime24.jsonl"), ("hard", "y/hard.parquet")]
    assert (recipe.samples, recipe.max_tokens, recipe.top_p, recipe.temperature) == (8, 128, 1.0, 0.6)
    assert str(recipe.out_dir()) == "runs/eval/ckpt"
    default = _recipe(["--model", "org/ckpt/"])
    assert default.sources() == [("aime24", None), ("aime25", None)] and str(default.out_dir()) == "runs/eval/ckpt"
    assert default == EvalRecipe(model="org/ckpt/")  # the flags' defaults are the recipe's


@pytest.mark.parametrize("argv, messages", [
    ([], ["model: required", "--compare RUN1 RUN2"]),
    (["--model", "m", "--samples", "0", "--top-p", "0"], ["samples: must be >= 1, got 0",
                                                          "top_p: must be > 0, got 0.0"]),
    (["--model", "m", "--benchmarks", "a,b", "--data-file", "f.jsonl"], ["one name per file"]),
    (["--model", "m", "--data-file", "a/x.jsonl", "b/x.jsonl"], ["benchmarks: names must be distinct"]),
    (["--model", "/no/such/model", "--benchmarks", "aime2099"],
     ["model: '/no/such/model' does not exist", "benchmarks: unknown benchmark 'aime2099'"]),
], ids=["no-model", "bounds", "names-vs-files", "duplicate-names", "missing-inputs"])
def test_cli_rejects_bad_arguments(argv, messages, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    assert not (tmp_path / "out").exists()


def test_resume_refuses_changed_generation_settings(tmp_path, shared_data):
    files = [str(shared_data / "aime24.jsonl")]
    base = {"model": str(tmp_path), "data_files": files, "out": str(tmp_path / "run"), "max_tokens": 64}
    validate(*build_recipe(EvalRecipe, base))  # a fresh folder
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({**base, "seed": 0, "temperature": 0.6, "top_p": 0.95,
                                                              "top_k": 0, "instruction": EvalRecipe().instruction}))
    (tmp_path / "run" / "completions.jsonl").write_text("")
    with pytest.raises(RecipeError, match="resume: .*completions.jsonl already holds completions: pass --resume"):
        validate(*build_recipe(EvalRecipe, base))
    validate(*build_recipe(EvalRecipe, {**base, "samples": 8, "resume": True}))  # more samples: same samples
    with pytest.raises(RecipeError, match="resume: cannot resume .*max_tokens: 64 -> 128"):
        validate(*build_recipe(EvalRecipe, {**base, "max_tokens": 128, "resume": True}))
