"""rollout.state_dtype: the engines' SSE state-cache dtype (issue #27), checked by the schema and passed to vLLM as
its mamba_ssm_cache_dtype."""
from __future__ import annotations

import pytest

from sse_rl.actors import engine_spec
from sse_rl.config import RecipeError, load_recipe

MINIMAL = ["out_dir=runs/x", "data.train=train.jsonl", "model.path=some/model",
           "reward.functions=[{spec: math_accuracy}]"]


@pytest.mark.parametrize("value", ["auto", "float32", "bfloat16"])
def test_state_dtype_reaches_the_engine_spec(value: str) -> None:
    recipe = load_recipe(None, [*MINIMAL, f"rollout.state_dtype={value}"])
    assert engine_spec(recipe, "some/model").mamba_ssm_cache_dtype == value


def test_default_keeps_the_fp32_state() -> None:
    assert engine_spec(load_recipe(None, MINIMAL), "some/model").mamba_ssm_cache_dtype == "auto"


def test_a_bad_state_dtype_is_refused_by_its_key() -> None:
    with pytest.raises(RecipeError, match="rollout.state_dtype: must be one of 'auto', 'float32', 'bfloat16', "
                                          "got 'float16'"):
        load_recipe(None, [*MINIMAL, "rollout.state_dtype=float16"])
