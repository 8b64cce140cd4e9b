"""`sse-rl train` up to the point where Ray would start: recipe errors, reward specs, --resume, policy building."""
from __future__ import annotations

from pathlib import Path

import pytest

from sse_rl.config import RecipeError, load_recipe
from sse_rl.train import build_policy, main

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml")


def test_bad_keys_and_values_fail_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as info:
        main([TINY, f"out_dir={out}", "algo.loss_agg=token_mean", "train.stepz=3", "rollout.temperature=-1"])
    assert [e.split(":")[0] for e in info.value.errors] == ["rollout.temperature", "algo.loss_agg", "train.stepz"]
    assert not out.exists()


def test_unknown_reward_is_reported_with_its_key(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"reward.functions.0.spec: reward 'no_such_pkg.mod:fn': no module named"):
        main([TINY, f"out_dir={out}", "reward.functions.0.spec=no_such_pkg.mod:fn"])
    assert not out.exists()


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="has no intact checkpoint to resume from"):
        main([TINY, f"out_dir={tmp_path / 'run'}", "--resume"])


def test_policy_is_built_once_from_the_recipe(tmp_path):
    recipe = load_recipe(TINY, [f"out_dir={tmp_path}"])
    path = Path(build_policy(recipe, tmp_path))
    assert path == tmp_path / "base_model"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_policy(recipe, tmp_path) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    from transformers import AutoConfig

    import sse_rl.models  # noqa: F401

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "sse_h" and config.vocab_size == 19 and config.eos_token_id == 1
