"""Recipe schema: YAML + overrides, every error reported at once and naming its key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sse_rl.config import Recipe, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MINIMAL = ["out_dir=runs/x", "data.train=train.jsonl", "model.path=some/model",
           "reward.functions=[{spec: math_accuracy}]"]


def test_minimal_recipe_gets_schema_defaults():
    recipe = load_recipe(None, MINIMAL)
    assert recipe.algo.loss_agg == "dapo" and recipe.algo.clip_eps_high == 0.28 and recipe.algo.kl_coef == 0.0
    assert recipe.reward.functions[0].spec == "math_accuracy" and recipe.reward.functions[0].weight == 1.0


def test_overrides_parse_yaml_scalars_and_list_indices():
    recipe = load_recipe(None, MINIMAL + ["train.lr=1e-6", "rollout.group_size=4", "algo.dynamic_sampling=false",
                                          "reward.functions.0.weight=0.5", "model.init.preset=sse-h-tiny"])
    assert recipe.train.lr == 1e-6 and isinstance(recipe.train.lr, float)
    assert recipe.rollout.group_size == 4 and recipe.algo.dynamic_sampling is False
    assert recipe.reward.functions[0].weight == 0.5
    assert recipe.model.init is not None and recipe.model.init.preset == "sse-h-tiny"


def test_call_seeds_differ_between_calls_and_engines_and_fit_torch():
    """Every rollout call of a run (step, round; eval -1) gets its own seed, engine i of a call seed + i: no two
    (call, engine) pairs may share a random stream, and every seed must be one `torch.manual_seed` accepts."""
    import torch

    from sse_rl.controller import call_seed

    calls = [(step, rnd) for step in range(1, 200) for rnd in range(4)] + [(-1,)]
    seeds = [call_seed(0, *c) + engine for c in calls for engine in range(8)]
    assert len(set(seeds)) == len(seeds)
    assert call_seed(0, 1, 0) == call_seed(0, 1, 0) != call_seed(1, 1, 0)
    torch.manual_seed(max(seeds))


def test_aux_loss_coef_defaults_to_the_policy_and_is_bounded():
    assert load_recipe(None, MINIMAL).algo.aux_loss_coef is None  # None = the policy config's weight
    assert load_recipe(None, MINIMAL + ["algo.aux_loss_coef=0"]).algo.aux_loss_coef == 0.0
    with pytest.raises(RecipeError, match="algo.aux_loss_coef: must be >= 0, got -0.1"):
        load_recipe(None, MINIMAL + ["algo.aux_loss_coef=-0.1"])


def test_all_errors_at_once_each_naming_its_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": "runs/x", "model": {"path": "m"}, "data": {"train": "t.jsonl", "promt_template": "{q}"},
        "reward": {"functions": [{"spec": "math_accuracy", "weight": "heavy"}], "accuracy": 3},
        "algo": {"loss_agg": "token_mean", "clip_eps_low": 1.5}, "rollout": {"group_size": 1},
        "train": {"lr": -1.0, "steps": "ten"},
    }))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    keys = [e.split(":")[0] for e in info.value.errors]
    assert keys == ["data.promt_template", "rollout.group_size", "reward.functions.0.weight", "algo.loss_agg",
                    "algo.clip_eps_low", "train.steps", "train.lr", "reward.accuracy"], info.value.errors
    text = str(info.value)
    assert "valid keys of data: train, train_split" in text
    assert "must be one of 'dapo', 'grpo', 'dr_grpo', got 'token_mean'" in text
    assert "train.lr: must be > 0, got -1.0" in text and "expected int, got str 'ten'" in text


def test_missing_required_fields_and_bad_override():
    with pytest.raises(RecipeError) as info:
        load_recipe(None, [])
    assert [e.split(":")[0] for e in info.value.errors] == ["out_dir", "data.train", "model.path", "reward.functions"]
    with pytest.raises(RecipeError, match="overrides are key=value"):
        load_recipe(None, MINIMAL + ["train.lr"])
    with pytest.raises(RecipeError, match="reward.functions.5: no such entry"):
        load_recipe(None, MINIMAL + ["reward.functions.5.weight=1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe("nope.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    recipe = load_recipe(None, MINIMAL + ["algo.kl_coef=0.001"])
    path = tmp_path / "config.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


# GRPO recipes (the *_sft ones follow the SFT schema: tests/sft; the *distill* ones the distill schema:
# tests/distill); the bench recipe gets its policy and prompts from
# bench/bench_grpo_step.py, so they are given here.
SET_BY_BENCH = {"bench_grpo_step.yaml": ["model.path=some/model", "data.train=prompts.jsonl"]}


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.glob("*.yaml")
                                         if not p.stem.endswith("_sft") and "distill" not in p.stem),
                         ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path, ["out_dir=runs/check", *SET_BY_BENCH.get(path.name, [])])
    assert isinstance(recipe, Recipe) and recipe.train.steps >= 1


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert {"tiny_cpu.yaml", "sse_h_2b_grpo.yaml"} <= names, names


def test_math_recipe_template_renders_the_boxed_instruction():
    recipe = load_recipe(RECIPES / "sse_h_2b_grpo.yaml")
    text = recipe.data.prompt_template.format(problem="What is 1+1?")
    assert text == "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert recipe.rollout.group_size == 8 and recipe.rollout.max_tokens == 32768 and recipe.train.steps == 230
    assert recipe.train.lr == 1e-6 and recipe.train.prompts_per_step == 128


def test_colocation_keys_resolve_and_check():
    from sse_rl.config import resolve_sync_method

    gpu = [*MINIMAL, "rollout.num_gpus_per_engine=0.4", "train.num_gpus_per_trainer=0.5"]
    assert resolve_sync_method(load_recipe(None, gpu)) == "cuda_ipc"
    assert resolve_sync_method(load_recipe(None, MINIMAL)) == "object_store"
    # a second engine has no trainer rank to pair with: auto falls back to the object store
    assert resolve_sync_method(load_recipe(None, [*gpu, "rollout.num_engines=2"])) == "object_store"
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [*MINIMAL, "rollout.weight_sync=cuda_ipc", "rollout.sleep_level=1"])
    assert {e.split(":")[0] for e in err.value.errors} == {"rollout.weight_sync", "rollout.sleep_level"}
    with pytest.raises(RecipeError, match="rollout.weight_sync: collective needs"):
        load_recipe(None, [*MINIMAL, "rollout.weight_sync=collective", "train.num_gpus_per_trainer=1"])
    assert resolve_sync_method(load_recipe(None, [*MINIMAL, "rollout.weight_sync=collective"])) == "collective"
    with pytest.raises(RecipeError, match="rollout.sleep_level: must be <= 2"):
        load_recipe(None, [*gpu, "rollout.sleep_level=3"])


def test_checkpoint_every_needs_gradient_checkpointing():
    recipe = load_recipe(None, [*MINIMAL, "model.gradient_checkpointing=true", "model.checkpoint_every=2"])
    assert recipe.model.checkpoint_every == 2
    with pytest.raises(RecipeError, match="model.checkpoint_every: 2 picks the blocks"):
        load_recipe(None, [*MINIMAL, "model.checkpoint_every=2"])
    with pytest.raises(RecipeError, match="model.checkpoint_every: must be >= 1"):
        load_recipe(None, [*MINIMAL, "model.gradient_checkpointing=true", "model.checkpoint_every=0"])
