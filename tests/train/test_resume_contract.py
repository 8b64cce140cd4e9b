"""Resume is a contract: a changed recipe is refused or accepted and recorded, a used out_dir is never truncated, and a
damaged newest checkpoint is skipped with the reason. `sse-rl train` up to the point where the policy would be built."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sse_rl import checkpoint, train
from sse_rl.config import load_recipe, write_recipe
from sse_rl.metrics_log import RECIPE_CHANGES_FILE

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml")


class PolicyReached(Exception):
    """Raised in place of building the policy: everything before it (the resume checks) has run."""


@pytest.fixture
def stop_at_policy(monkeypatch):
    def stop(recipe, run_dir):
        raise PolicyReached

    monkeypatch.setattr(train, "build_policy", stop)


def _fake_weights(path: Path) -> None:
    (path / "model").mkdir()
    (path / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    (path / checkpoint.TRAINER_FILE).write_bytes(b"t" * 500)


def _run_with_checkpoints(run_dir: Path, *steps: int) -> None:
    write_recipe(load_recipe(TINY, [f"out_dir={run_dir}"]), run_dir)
    for step in steps:
        checkpoint.save(run_dir, step, _fake_weights, {"sampler": {"epoch": 0, "position": step}}, keep=5)


def test_changed_recipe_is_refused_with_the_changed_keys(tmp_path):
    run = tmp_path / "run"
    _run_with_checkpoints(run, 2)
    config = (run / "config.yaml").read_text()
    with pytest.raises(SystemExit) as info:
        train.main([TINY, f"out_dir={run}", "train.lr=0.5", "rollout.group_size=4"])
    message = str(info.value)
    assert "train.lr: 0.001 -> 0.5" in message and "rollout.group_size: 8 -> 4" in message
    assert "step_000002" in message and "--accept-changes" in message and "\n  out_dir" not in message
    assert (run / "config.yaml").read_text() == config and not (run / RECIPE_CHANGES_FILE).exists()


def test_accepted_changes_apply_and_are_recorded(tmp_path, stop_at_policy):
    run = tmp_path / "run"
    _run_with_checkpoints(run, 2)
    with pytest.raises(PolicyReached):
        train.main([TINY, f"out_dir={run}", "train.lr=0.5", "--resume", "--accept-changes"])
    rows = [json.loads(line) for line in (run / RECIPE_CHANGES_FILE).read_text().splitlines()]
    assert rows == [{"step": 2, "key": "train.lr", "old": 0.001, "new": 0.5}]
    assert load_recipe(run / "config.yaml", []).train.lr == 0.5  # the run directory describes what is trained now
    assert checkpoint.load_recipe(run / "checkpoints" / "step_000002")["train"]["lr"] == 0.001


def test_same_recipe_elsewhere_resumes_without_changes(tmp_path, stop_at_policy):
    run = tmp_path / "run"
    _run_with_checkpoints(run, 2)
    moved = tmp_path / "moved"
    run.rename(moved)  # out_dir is where the run lives, not part of what was trained
    with pytest.raises(PolicyReached):
        train.main([TINY, f"out_dir={moved}", "--resume"])
    assert not (moved / RECIPE_CHANGES_FILE).exists()


def test_used_out_dir_without_checkpoint_is_kept_unless_overwrite(tmp_path, stop_at_policy):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/reward": 0.1}\n{"step": 1, "reward/mean": 0.2}\n')
    (run / "checkpoints" / "step_000002.tmp").mkdir(parents=True)  # killed during its first save
    with pytest.raises(SystemExit, match=r"holds an earlier run \(metrics.jsonl, checkpoints\).*--overwrite"):
        train.main([TINY, f"out_dir={run}"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(PolicyReached):
        train.main([TINY, f"out_dir={run}", "--overwrite"])
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_overwrite_never_deletes_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    _run_with_checkpoints(run, 2)
    with pytest.raises(SystemExit, match="--overwrite: .* holds checkpoint step_000002"):
        train.main([TINY, f"out_dir={run}", "--overwrite"])
    assert checkpoint.latest(run).name == "step_000002"


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "model" / "model.safetensors").write_bytes(b"w" * 10),
     "model/model.safetensors has 10 bytes, the manifest says 1000"),
    (lambda p: (p / checkpoint.TRAINER_FILE).unlink(), "trainer.pt is missing"),
    (lambda p: (p / checkpoint.STATE_FILE).write_text("x" + (p / checkpoint.STATE_FILE).read_text()[1:]),
     "state.json is garbled"),
    (lambda p: (p / checkpoint.MANIFEST_FILE).unlink(), "no manifest.json"),
], ids=["truncated-weights", "missing-trainer", "garbled-state", "no-manifest"])
def test_damaged_newest_checkpoint_falls_back_and_says_why(tmp_path, stop_at_policy, caplog, damage, reason):
    run = tmp_path / "run"
    _run_with_checkpoints(run, 2, 4)
    damage(run / "checkpoints" / "step_000004")
    with caplog.at_level(logging.WARNING, logger="sse_rl.train"), pytest.raises(PolicyReached):
        train.main([TINY, f"out_dir={run}", "--resume"])
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_000004'}: {reason}" in caplog.text
    assert checkpoint.latest(run).name == "step_000002"
    assert (run / "checkpoints" / "step_000004").is_dir()  # kept for inspection


def test_resume_with_every_checkpoint_damaged_names_them(tmp_path):
    run = tmp_path / "run"
    _run_with_checkpoints(run, 2)
    (run / "checkpoints" / "step_000002" / checkpoint.TRAINER_FILE).unlink()
    with pytest.raises(SystemExit, match=r"no intact checkpoint.*\n  skipped .*step_000002: trainer.pt is missing"):
        train.main([TINY, f"out_dir={run}", "--resume"])


def test_pruning_keeps_intact_checkpoints_only_and_a_resave_replaces_a_damaged_one(tmp_path):
    _run_with_checkpoints(tmp_path, 2, 4)
    (tmp_path / "checkpoints" / "step_000004" / checkpoint.TRAINER_FILE).unlink()
    checkpoint.save(tmp_path, 3, _fake_weights, {}, keep=1)  # resumed from 2: the damaged 4 is not counted
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]
    assert checkpoint.latest(tmp_path).name == "step_000003"
    checkpoint.save(tmp_path, 4, _fake_weights, {}, keep=1)
    assert checkpoint.latest(tmp_path).name == "step_000004"
    assert checkpoint.scan(tmp_path)[1] == [] and checkpoint.load_recipe(checkpoint.latest(tmp_path)) is not None


def _trainer_state(lr: float, steps_done: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """An AdamW + LambdaLR (halving each step) as the trainer builds them, stepped `steps_done` times."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    for _ in range(steps_done):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_resume_trains_with_the_recipes_lr(tmp_path):
    optimizer, scheduler = _trainer_state(1e-3, 3)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": checkpoint.rng_state()}, tmp_path / checkpoint.TRAINER_FILE)
    stored_lr = optimizer.param_groups[0]["lr"]

    same_opt, same = _trainer_state(1e-3, 0)  # unchanged recipe: exactly the stored state
    same_opt.load_state_dict(checkpoint.load_trainer(tmp_path, same))
    assert same_opt.param_groups[0]["lr"] == stored_lr and same.state_dict() == scheduler.state_dict()

    new_opt, new = _trainer_state(0.5, 0)  # train.lr=0.5 accepted: the schedule follows it
    new_opt.load_state_dict(checkpoint.load_trainer(tmp_path, new))
    assert new.last_epoch == 3 and new_opt.param_groups[0]["lr"] == 0.5 * 0.5 ** 3 == new.get_last_lr()[0]
    new_opt.step()
    new.step()
    assert new_opt.param_groups[0]["lr"] == 0.5 * 0.5 ** 4
