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


def test_a_non_finite_reward_is_an_error_unless_the_recipe_scores_it_0():
    assert load_recipe(None, MINIMAL).reward.non_finite == "error"
    assert load_recipe(None, [*MINIMAL, "reward.non_finite=zero"]).reward.non_finite == "zero"
    with pytest.raises(RecipeError, match="reward.non_finite: must be one of 'error', 'zero', got 'skip'"):
        load_recipe(None, [*MINIMAL, "reward.non_finite=skip"])


def test_overrides_parse_yaml_scalars_and_list_indices():
    recipe = load_recipe(None, MINIMAL + ["train.lr=1e-6", "rollout.group_size=4", "algo.dynamic_sampling=false",
                                          "reward.functions.0.weight=0.5", "model.init.preset=sse-h-tiny"])
    assert recipe.train.lr == 1e-6 and isinstance(recipe.train.lr, float)
    assert recipe.rollout.group_size == 4 and recipe.algo.dynamic_sampling is False
    assert recipe.reward.functions[0].weight == 0.5
    assert recipe.model.init is not None and recipe.model.init.preset == "sse-h-tiny"


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
    from sse_rl.config import write_recipe

    recipe = load_recipe(None, MINIMAL + ["algo.kl_coef=0.001"])
    write_recipe(recipe, tmp_path / "run")
    assert load_recipe(tmp_path / "run" / "config.yaml") == recipe


# GRPO recipes (the *_sft ones follow the SFT schema: tests/sft; the *distill* ones the distill schema:
# tests/distill)
@pytest.mark.parametrize("path", sorted(p for p in RECIPES.glob("*.yaml")
                                         if not p.stem.endswith("_sft") and "distill" not in p.stem),
                         ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path, ["out_dir=runs/check"])
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


# ---------------------------------------------------------------------------------------------------------------
# validate(): every check before any side effect, for each command


def test_validate_reports_recipe_and_input_errors_at_once(tmp_path):
    """Schema errors and problems with what the recipe names come in one error, each under its key."""
    from sse_rl.config import parse_recipe, validate

    recipe, errors = parse_recipe(RECIPES / "tiny_cpu.yaml", [
        f"out_dir={tmp_path / 'run'}", "train.stepz=3", "reward.functions.0.spec=no_such_pkg.mod:fn",
        f"data.train={tmp_path / 'aime24.jsonl'}", "data.eval=no_such_pkg.mod:rows", "model.init.preset=sse-h-huge",
        "eval.benchmark=aime2024"])
    with pytest.raises(RecipeError) as info:
        validate(recipe, errors)
    assert [e.split(":")[0] for e in info.value.errors] == [
        "train.stepz", "reward.functions.0.spec", "data.train", "data.eval", "data.train", "model.init.preset",
        "eval.benchmark"], info.value.errors
    text = str(info.value)
    assert "aime24.jsonl does not exist" in text and "looks like the evaluation benchmark 'aime24'" in text
    assert "'no_such_pkg.mod:rows': no module named 'no_such_pkg'" in text and "unknown preset 'sse-h-huge'" in text
    assert validate(*parse_recipe(RECIPES / "tiny_cpu.yaml")) == load_recipe(RECIPES / "tiny_cpu.yaml")


def test_validate_checks_the_model_and_the_validation_template(tmp_path):
    from sse_rl.config import parse_recipe, validate

    with pytest.raises(RecipeError) as info:
        validate(*parse_recipe(None, ["out_dir=runs/x", f"data.train={tmp_path}/../x.mod:rows",
                                      f"model.path={tmp_path / 'no_model'}", "reward.functions=[{spec: math_accuracy}]",
                                      "data.prompt_template='{problem} {hint}'", "eval.benchmark=aime24"]))
    assert [e.split(":")[0] for e in info.value.errors] == ["data.prompt_template", "data.train", "model.path"]
    assert "uses column 'hint', but eval.benchmark problems only have `problem`" in str(info.value)
    with pytest.raises(RecipeError, match="data.prompt_template: 'plain' uses no column"):
        load_recipe(None, [*MINIMAL, "data.prompt_template=plain"])


def test_bad_train_recipe_writes_nothing_and_starts_nothing(tmp_path):
    import ray

    from sse_rl.train import main

    out = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        main([str(RECIPES / "tiny_cpu.yaml"), f"out_dir={out}", "data.train=HuggingFaceH4/MATH-500",
              "eval.benchmark=missing.jsonl"])
    assert [e.split(":")[0] for e in info.value.errors] == ["data.train", "eval.benchmark"]
    assert not out.exists() and not ray.is_initialized()


def test_bad_sft_recipe_writes_nothing(tmp_path):
    from sse_rl.sft import main

    out = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        main([str(RECIPES / "tiny_teacher_sft.yaml"), f"out_dir={out}", "data.train=data/math500.jsonl",
              "model.init.tokenizer=no_such_pkg:build", "train.batch_tokens=1000"])
    assert [e.split(":")[0] for e in info.value.errors] == [
        "train.batch_tokens", "data.train", "data.train", "model.init.tokenizer"], info.value.errors
    assert not out.exists()


def test_bad_distill_recipe_writes_nothing(tmp_path):
    from sse_rl.distill import main

    out = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        main([str(RECIPES / "tiny_distill_cpu.yaml"), f"out_dir={out}", f"teacher.path={tmp_path / 'teacher'}",
              "data.train=aime25.jsonl", f"data.eval={tmp_path / 'held_out.jsonl'}", "logits.los=jsd"])
    assert [e.split(":")[0] for e in info.value.errors] == [
        "logits.los", "data.train", "data.eval", "data.train", "teacher.path"], info.value.errors
    assert not out.exists()


def test_bad_eval_settings_write_nothing_and_start_no_engine(tmp_path, capsys, monkeypatch):
    import sse_rl.eval.engines
    from sse_rl.eval.cli import main

    monkeypatch.setattr(sse_rl.eval.engines.Engines, "__init__", lambda *a: pytest.fail("an engine was started"))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "no_model"), "--data-file", str(tmp_path / "aime24.jsonl"), "--top-k", "-1",
              "--out", str(out)])
    err = capsys.readouterr().err
    for text in ("top_k: must be >= 0, got -1", "model: '", "data_files: ", "aime24.jsonl does not exist"):
        assert text in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# One config module: one sampling class, distinct names, a public API


def test_one_sampling_config_for_rollouts_evals_and_validation():
    import dataclasses

    import sse_rl.eval
    from sse_rl.config import EVAL_SAMPLING, EvalRecipe, SamplingConfig

    assert sse_rl.eval.SamplingConfig is SamplingConfig  # the class the GRPO controller hands the eval package
    assert EvalRecipe(model="m").sampling() == EVAL_SAMPLING == SamplingConfig(max_tokens=32768, temperature=0.6,
                                                                               top_p=0.95)
    rollout = SamplingConfig(n=8, max_tokens=16, temperature=1.0)
    assert (rollout.top_p, rollout.top_k) == (1.0, 0)  # no nucleus or top-k cut unless asked
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_k": -1}, {"max_tokens": 0}, {"n": 0}):
        with pytest.raises(ValueError, match="invalid sampling settings"):
            dataclasses.replace(rollout, **bad)


def test_config_classes_have_distinct_names_and_other_modules_use_its_public_api():
    """No two schema classes share a name (there was an EvalConfig in the recipe and one in the eval package), and
    nothing outside the sse_rl/config package imports its private helpers."""
    import ast
    import dataclasses
    import inspect

    import sse_rl.config as config

    classes = [c for _, c in inspect.getmembers(config, inspect.isclass) if dataclasses.is_dataclass(c)]
    assert len({c.__name__ for c in classes}) == len(classes) >= 25
    root = RECIPES.parent
    for path in [*root.glob("sse_rl/**/*.py"), *root.glob("eval/*.py"), *root.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "sse_rl.config":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(root)} imports {private} from sse_rl.config"
