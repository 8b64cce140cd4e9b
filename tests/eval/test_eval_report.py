"""Reports and comparisons from metrics, and the `sse-rl eval` argument handling (no engine)."""
import json

import pytest
from sse_rl.eval import ProblemSamples, compare, compute_metrics
from sse_rl.eval.cli import build_parser, config_from_args, main
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


def test_cli_arguments_to_config():
    args = build_parser().parse_args(["--model", "ckpt", "--data-file", "x/aime24.jsonl", "y/hard.parquet",
                                      "--samples", "8", "--max-tokens", "128", "--top-p", "1.0"])
    config = config_from_args(args)
    assert config.sources() == [("aime24", "x/aime24.jsonl"), ("hard", "y/hard.parquet")]
    assert (config.samples, config.max_tokens, config.top_p, config.temperature) == (8, 128, 1.0, 0.6)
    assert str(config.out_dir()) == "runs/eval/ckpt"
    default = config_from_args(build_parser().parse_args(["--model", "org/ckpt/"]))
    assert default.sources() == [("aime24", None), ("aime25", None)] and str(default.out_dir()) == "runs/eval/ckpt"


@pytest.mark.parametrize("argv, message", [
    ([], "--model is required"),
    (["--model", "m", "--samples", "0"], "--samples must be >= 1"),
    (["--model", "m", "--benchmarks", "a,b", "--data-file", "f.jsonl"], "one name per file"),
    (["--model", "m", "--top-p", "0"], "invalid sampling settings"),
    (["--model", "m", "--data-file", "a/x.jsonl", "b/x.jsonl"], "benchmark names must be distinct"),
], ids=["no-model", "samples", "names-vs-files", "top-p", "duplicate-names"])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_resume_refuses_changed_generation_settings(tmp_path):
    from sse_rl.eval.runner import EvalConfig, check_run_config

    check_run_config(tmp_path, EvalConfig(model="m", out=str(tmp_path), max_tokens=64))
    assert json.loads((tmp_path / "config.json").read_text())["max_tokens"] == 64
    check_run_config(tmp_path, EvalConfig(model="m", out=str(tmp_path), max_tokens=64, samples=8, resume=True))
    with pytest.raises(ValueError, match="max_tokens: 64 -> 128"):
        check_run_config(tmp_path, EvalConfig(model="m", out=str(tmp_path), max_tokens=128, resume=True))
